"""qwen2vl-eval's throughput on the demo checkpoint against a plain unbucketed loop (one sample at a time, each
compiled for its own exact shapes — what a straightforward port does).

    qwen2vl-train --config configs/demo_cpu.py --workdir /tmp/qwen2vl-demo      # first: the demo checkpoint
    python bench/eval.py --workdir /tmp/qwen2vl-demo [--plain-samples 100]

Both run greedy decoding of the same held-out questions with the same weights and prompts and must give the same
answers. Writes bench/results/eval.json."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/qwen2vl-demo")
    parser.add_argument("--plain-samples", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import qwen2vl_jax
    from evaluation.data import open_eval_source
    from evaluation.runner import MAX_NEW_TOKENS, evaluate, prepare, read_lines
    from qwen2vl_jax.buckets import Ladders
    from qwen2vl_jax.compiles import CompileCounter
    from qwen2vl_jax.processing import Processor

    checkpoint, data_dir = os.path.join(args.workdir, "export"), os.path.join(args.workdir, "data")
    spec = "tfds:synthetic_vqa:test"
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "preds.jsonl")
        t0 = time.perf_counter()
        summary = evaluate(checkpoint, spec, "exact", out, batch_size=args.batch_size, data_dir=data_dir)
        ours_wall = time.perf_counter() - t0
        ours = {line["index"]: line["prediction"] for line in read_lines(out)}

    processor = Processor.from_pretrained(checkpoint)
    config, params = qwen2vl_jax.load(checkpoint)
    source = open_eval_source(spec, data_dir)
    new = MAX_NEW_TOKENS["exact"]
    same, t0 = 0, time.perf_counter()
    with CompileCounter() as compiles:
        for i in range(args.plain_samples):
            sample = source[i]
            request, _, _ = prepare(processor, sample, "exact")
            length, rows = request["input_ids"].shape[1], len(request.get("pixel_values", ()))
            exact = Ladders(batch=(1,), length=(length,), cache=(length + new,), vision_rows=(rows,) if rows else (1,))
            tokens = qwen2vl_jax.generate(config, params, request, max_new_tokens=new, ladders=exact,
                                          eos_token_ids=processor.tokenizer.eos_token_ids)
            same += processor.decode(tokens[0]).strip() == ours[sample["index"]]
    plain_wall = time.perf_counter() - t0
    plain_compiles = dict(compiles.names)
    result = {
        "checkpoint": checkpoint, "samples": summary["samples"], "exact_match": summary["value"],
        "ours": {"samples_per_s": summary["samples_per_s"], "wall_s_incl_load": round(ours_wall, 1),
                 "compiles": summary["compiles"],
                 "batch_size": args.batch_size},
        "plain_loop": {"samples": args.plain_samples, "samples_per_s": args.plain_samples / plain_wall,
                       "compiles": plain_compiles, "same_answers": same},
    }
    result["speedup"] = result["ours"]["samples_per_s"] / result["plain_loop"]["samples_per_s"]
    print(json.dumps(result, indent=2))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "eval.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()

"""qwen2vl-eval's throughput on the demo checkpoint against a plain unbucketed loop (one sample at a time, each
compiled for its own exact shapes — what a straightforward port does).

    qwen2vl-train --config configs/demo_cpu.py --workdir /tmp/qwen2vl-demo      # first: the demo checkpoint
    python bench/eval.py --workdir /tmp/qwen2vl-demo [--plain-samples 100]
    python bench/eval.py --workdir /tmp/qwen2vl-demo --loaders     # the same set from parquet, JSONL+PNG and tfds

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
    parser.add_argument("--loaders", action="store_true", help="compare data loaders instead (writes eval_loaders.json)")
    args = parser.parse_args()
    if args.loaders:
        return compare_loaders(args)

    import qwen2vl_jax
    from evaluation.data import open_eval_source
    from evaluation.runner import evaluate, prepare, read_lines
    from evaluation.tasks import get_task
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
    new = get_task("exact").max_new_tokens
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


def write_copies(source, folder: str) -> dict[str, str]:
    """The demo test set as a parquet file (images embedded as {"bytes", "path"}) and as JSONL + PNG files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.sources import question_text

    rows, lines = [], []
    os.makedirs(os.path.join(folder, "img"), exist_ok=True)
    for i in range(len(source)):
        sample = source[i]
        image = sample["images"][0]
        with open(os.path.join(folder, "img", f"{i}.png"), "wb") as f:
            f.write(image)
        question = question_text(sample["messages"])
        rows.append({"id": sample["id"], "question": question, "answers": sample["answers"],
                     "image": {"bytes": image, "path": f"{i}.png"}})
        lines.append(json.dumps({"id": sample["id"], "question": question, "image": f"img/{i}.png",
                                 "answers": sample["answers"]}))
    pq.write_table(pa.Table.from_pylist(rows), os.path.join(folder, "test.parquet"), row_group_size=100)
    with open(os.path.join(folder, "test.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"parquet": "parquet:" + folder + "/test.parquet", "jsonl": os.path.join(folder, "test.jsonl")}


def compare_loaders(args) -> None:
    """samples/s of qwen2vl-eval on the same 400 questions read from tfds, parquet and JSONL + PNG files."""
    from evaluation.data import open_eval_source
    from evaluation.runner import evaluate_tasks

    checkpoint, data_dir = os.path.join(args.workdir, "export"), os.path.join(args.workdir, "data")
    result = {"checkpoint": checkpoint, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        specs = {"tfds": "tfds:synthetic_vqa:test", **write_copies(open_eval_source("tfds:synthetic_vqa:test",
                                                                                      data_dir), tmp)}
        names = list(specs) + ["tfds"]  # tfds again last: the first task also pays the compiles
        jobs = [("exact", specs[name], os.path.join(tmp, f"{k}-{name}.jsonl")) for k, name in enumerate(names)]
        summaries = evaluate_tasks(checkpoint, jobs, batch_size=args.batch_size, data_dir=data_dir)
        for k, (name, summary) in enumerate(zip(names, summaries)):
            result[f"{k}-{name}"] = {key: summary[key] for key in ("samples", "value", "samples_per_s", "compiles")}
        answers = [[json.loads(line)["prediction"] for line in open(out)] for _, _, out in jobs]
        result["same_answers"] = all(a == answers[0] for a in answers)
    print(json.dumps(result, indent=2))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "eval_loaders.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()

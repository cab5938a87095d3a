"""Padding efficiency of training batches with and without packing, on the demo mix (data pipeline only, no model).

    python bench/padding.py [--examples 2000] [--config configs/demo_cpu.py]

For each setting: real / padded tokens, real / padded vision rows, examples per batch, batch shapes used (each one
train-step compilation). Writes bench/results/padding.json."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipeline.pipeline import training_batches  # noqa: E402
from data_pipeline.sources import open_source  # noqa: E402
from data_pipeline.synthetic import write_tfds  # noqa: E402
from training.train import model_and_processor  # noqa: E402


def load_config(path: str):
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def measure(config, source, processor, model_config, examples: int, **data_changes) -> dict:
    data = config.data.copy_and_resolve_references()
    with data.unlocked():
        data.update(dict(shuffle=False, num_epochs=1) | data_changes)
    totals = dict(tokens=0, padded_tokens=0, vision=0, padded_vision=0, examples=0, batches=0)
    shapes = set()
    t0 = time.perf_counter()
    for batch in training_batches([source[i] for i in range(examples)], processor, model_config, data, seed=0):
        s = batch["stats"]
        totals["tokens"] += int(s["real_tokens"])
        totals["padded_tokens"] += int(s["padded_tokens"])
        totals["vision"] += int(s["real_vision_rows"])
        totals["padded_vision"] += int(s["padded_vision_rows"])
        totals["examples"] += int(s["examples"])
        totals["batches"] += 1
        shapes.add((batch["input_ids"].shape, batch["vision_pixels"].shape[1], batch["loss_index"].shape[1]))
    return {"token_efficiency": totals["tokens"] / totals["padded_tokens"],
            "vision_efficiency": totals["vision"] / totals["padded_vision"],
            "examples_per_batch": totals["examples"] / totals["batches"], "batches": totals["batches"],
            "batch_shapes": sorted(str(s) for s in shapes), "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.py"))
    args = parser.parse_args()
    config = load_config(args.config)
    with tempfile.TemporaryDirectory() as workdir:
        write_tfds(os.path.join(workdir, "data"), {"train": args.examples, "test": 16})
        model_config, processor = model_and_processor(config, workdir)
        source = open_source(config.data.train, data_dir=os.path.join(workdir, "data"))
        rows = {}
        rows["unpacked (demo config)"] = measure(config, source, processor, model_config, args.examples, pack=False)
        rows["packed, rows of 128"] = measure(config, source, processor, model_config, args.examples, pack=True,
                                              batch_size=8)
        # a mix of lengths: the same images at up to 322² px (4–529 patches, 20–150 tokens a sample)
        wide = dict(max_pixels=322 * 322, length_buckets=(64, 128, 256), vision_buckets=(4096, 8192))
        rows["varied lengths, unpacked"] = measure(config, source, processor, model_config, args.examples, **wide,
                                                   pack=False)
        rows["varied lengths, packed into rows of 256"] = measure(config, source, processor, model_config,
                                                                  args.examples, **wide, pack=True, batch_size=8)
    for name, row in rows.items():
        print(f"{name:40s} tokens {row['token_efficiency']:.3f}  vision {row['vision_efficiency']:.3f}  "
              f"examples/batch {row['examples_per_batch']:.1f}  shapes {len(row['batch_shapes'])}")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "padding.json")
    with open(out, "w") as f:
        json.dump({"examples": args.examples, "config": os.path.relpath(args.config), "rows": rows}, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()

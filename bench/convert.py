"""Checkpoint conversion at 2B scale: wall time, throughput and peak memory of `qwen2vl-convert`, both directions.

1. Builds the 2B layout with random bfloat16 weights in transformers and `save_pretrained`s it (4.4 GB of
   safetensors; skipped when --hf-dir already holds one).
2. Runs, each as a child process sampled every 20 ms from /proc/PID/status:
   - `qwen2vl-convert --hf-dir HF --out OX`                 (unrolled layers)
   - `qwen2vl-convert --hf-dir HF --out OXS --scan-layers`  (stacked for nn.scan)
   - `qwen2vl-convert --to-hf --orbax-dir OXS --out BACK`   (export, ≤ 5 GB safetensors shards)
   and records wall time, MB/s (tensor bytes / wall time), peak RssAnon (anonymous memory: what streaming bounds;
   memory-mapped file pages count as RssFile, which the kernel can drop) and peak VmRSS.
3. Checks that BACK holds every tensor of HF bit for bit.

With --cold, the page cache is dropped (needs root) before each conversion, so the source is read from disk.

    python bench/convert.py [--workdir /tmp/qwen2vl-convert-bench] [--cold] [--keep]
    python bench/convert.py --preset 72b --text-layers 2 --vision-depth 2 --workdir /tmp/qwen2vl-convert-72b \
        --results bench/results/convert_72b_width.json   # 72B-sized tensors (2.5 GB embedding), shallow
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "convert.json")


def make_checkpoint(folder: str, preset: str = "2b", text_layers: int | None = None,
                    vision_depth: int | None = None) -> None:
    import dataclasses

    import torch
    from transformers import Qwen2VLConfig as HFConfig, Qwen2VLForConditionalGeneration

    sys.path.insert(0, ROOT)
    from qwen2vl_jax import Qwen2VLConfig

    torch.manual_seed(0)
    ours = Qwen2VLConfig.preset(preset)
    ours = ours.replace(text=dataclasses.replace(ours.text, num_hidden_layers=text_layers or ours.text.num_hidden_layers),
                        vision=dataclasses.replace(ours.vision, depth=vision_depth or ours.vision.depth))
    config = HFConfig(**ours.to_hf_dict())
    with torch.device("meta"):
        model = Qwen2VLForConditionalGeneration(config).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives lm_head its own storage; a tied checkpoint stores only embed_tokens
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def run_sampled(command: list[str]) -> dict:
    """Run `command`, sampling its memory every 20 ms; → wall seconds and peak bytes."""
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def sample():
        while child.poll() is None:
            try:
                for key, value in _status(child.pid).items():
                    peaks[key] = max(peaks[key], value)
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    output, _ = child.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if child.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    return {"seconds": round(wall, 2), **{f"peak_{k}_GB": round(v / 1e9, 3) for k, v in peaks.items()},
            "last_line": output.strip().splitlines()[-1]}


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def folder_bytes(folder: str, suffix: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(suffix))


def tensors_equal(a: str, b: str) -> tuple[int, list[str]]:
    sys.path.insert(0, ROOT)
    import numpy as np

    from qwen2vl_jax.checkpoint.hf import iter_tensors

    left, right = dict(iter_tensors(a)), dict(iter_tensors(b))
    differ = sorted(set(left) ^ set(right))
    differ += [n for n in sorted(set(left) & set(right))
               if left[n].dtype != right[n].dtype or not np.array_equal(left[n].view(np.uint8), right[n].view(np.uint8))]
    return len(left), differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/qwen2vl-convert-bench")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    parser.add_argument("--keep", action="store_true", help="keep the converted folders")
    parser.add_argument("--preset", default="2b", help="layout of the random checkpoint (2b, 7b, 72b)")
    parser.add_argument("--text-layers", type=int, help="fewer decoder layers than the preset (full-width tensors)")
    parser.add_argument("--vision-depth", type=int, help="fewer ViT blocks than the preset")
    parser.add_argument("--results", default=RESULTS)
    args = parser.parse_args()
    hf, runs = os.path.join(args.workdir, "hf"), {}
    if not os.path.exists(os.path.join(hf, "config.json")):
        start = time.perf_counter()
        make_checkpoint(hf, args.preset, args.text_layers, args.vision_depth)
        print(f"made {hf} in {time.perf_counter() - start:.0f} s", flush=True)
    source_bytes = folder_bytes(hf, ".safetensors")
    convert = [sys.executable, "-m", "qwen2vl_jax.checkpoint.convert"]
    jobs = {
        "hf_to_orbax": convert + ["--hf-dir", hf, "--out", os.path.join(args.workdir, "ox")],
        "hf_to_orbax_scan": convert + ["--hf-dir", hf, "--out", os.path.join(args.workdir, "oxs"), "--scan-layers"],
        "orbax_scan_to_hf": convert + ["--to-hf", "--orbax-dir", os.path.join(args.workdir, "oxs"),
                                       "--out", os.path.join(args.workdir, "back")],
    }
    for name in ("ox", "oxs", "back"):
        shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)
    for name, command in jobs.items():
        if args.cold:
            drop_caches()
        result = run_sampled(command)
        result["MB_per_s"] = round(source_bytes / result["seconds"] / 1e6, 1)
        runs[name] = result
        print(name, result, flush=True)
    count, differ = tensors_equal(hf, os.path.join(args.workdir, "back"))
    report = {"preset": args.preset, "text_layers": args.text_layers, "vision_depth": args.vision_depth,
              "source_GB": round(source_bytes / 1e9, 3), "cold_cache": args.cold, "runs": runs,
              "round_trip": {"tensors": count, "differ": differ},
              "machine": {"cpus": os.cpu_count(), "mem_GB": round(os.sysconf("SC_PAGE_SIZE")
                                                                 * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}}
    print(json.dumps(report, indent=2))
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        json.dump(report, f, indent=2)
    if not args.keep:
        for name in ("ox", "oxs", "back"):
            shutil.rmtree(os.path.join(args.workdir, name), ignore_errors=True)


if __name__ == "__main__":
    main()

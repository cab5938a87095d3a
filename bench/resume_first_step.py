"""Time from a resumed `qwen2vl-train` start to its first step, demo config with worker processes.

    python bench/resume_first_step.py --repeats 3 --workers 2 --out bench/results/resume_first_step.json
    python bench/resume_first_step.py --root /path/to/an/older/checkout ...   # the same for another version

A run of the shrunk demo (tests/test_train_cli.py's settings, packing on) trains to a checkpoint; then the same
command with more steps is started `repeats` times from a copy of that workdir, and the time from each start to its
first metrics line is measured (the compile cache is warm, so it is the data pipeline and the restore that count).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_args(root: str, workdir: str, data_dir: str, steps: int, workers: int, cache: str) -> list[str]:
    return [sys.executable, "-m", "training.train", "--config", os.path.join(root, "configs", "demo_cpu.py"),
            "--workdir", workdir, f"--config.data.data_dir={data_dir}", "--config.data.demo_set.train=96",
            "--config.data.demo_set.test=16", "--config.data.batch_size=4", "--config.log_every=1",
            "--config.demo_eval=False", "--config.tensorboard=False", f"--config.steps={steps}",
            "--config.checkpoint_every=5", "--config.data.length_buckets=(48,64,128)",
            "--config.data.vision_buckets=(128,256,512)", "--config.data.pack=True",
            f"--config.data.workers={workers}", f"--config.compile_cache={cache}"]


def environment(root: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    return env | {"JAX_PLATFORMS": "cpu", "PYTHONPATH": root}


def metric_lines(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return sum(1 for line in open(path) if line.strip()) if os.path.exists(path) else 0


def time_to_first_step(root: str, args: list[str], workdir: str, timeout: float = 120) -> float:
    before = metric_lines(workdir)
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=root, env=environment(root), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        while metric_lines(workdir) <= before:
            if proc.poll() is not None or time.monotonic() - start > timeout:
                raise RuntimeError(f"no step within {timeout} s (exit {proc.poll()})")
            time.sleep(0.05)
        return time.monotonic() - start
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default=HERE, help="the checkout whose code runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="")
    a = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="resume-bench-")
    data, cache, base = (os.path.join(scratch, n) for n in ("data", "cache", "base"))
    sys.path.insert(0, a.root)
    from data_pipeline.synthetic import write_tfds
    write_tfds(data, {"train": 96, "test": 16}, seed=0)
    times, stalls = [], []
    for attempt in range(3):  # the run that writes the checkpoint may itself stall (it did before the fix)
        shutil.rmtree(base, ignore_errors=True)
        try:
            subprocess.run(run_args(a.root, base, data, 5, a.workers, cache), cwd=a.root, env=environment(a.root),
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
                           start_new_session=True)
            break
        except subprocess.TimeoutExpired:
            stalls.append(f"the first run (attempt {attempt}) stalled 300 s")
    else:
        raise SystemExit("the first run never finished")
    for i in range(a.repeats):
        workdir = os.path.join(scratch, f"resume{i}")
        shutil.copytree(base, workdir)
        try:
            times.append(time_to_first_step(a.root, run_args(a.root, workdir, data, 20, a.workers, cache), workdir))
        except RuntimeError as e:  # a resume that never reached a step
            stalls.append(f"repeat {i}: {e}")
    git = subprocess.run(["git", "-C", a.root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    result = {"commit": git.stdout.strip(), "workers": a.workers, "seconds_to_first_step": times, "stalls": stalls,
              "median_s": statistics.median(times) if times else None, "max_s": max(times, default=None)}
    print(json.dumps(result, indent=2))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

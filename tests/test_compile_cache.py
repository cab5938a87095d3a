"""JAX's persistent compilation cache: qwen2vl_jax.compiles.CompileCache counts what it loads and compiles, a resumed
qwen2vl-train run loads its train step instead of compiling it, and a second qwen2vl-generate call loads its
programs."""
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from test_train_cli import ROOT, command, environment, finish, start, summary_of
from training.metrics import read_metrics

TIMEOUT_S = 240
# one bucket on each ladder: the train step has a single shape, so a resumed run needs no program the first lacked
ONE_SHAPE = ("--config.steps=8", "--config.checkpoint_every=100", "--config.data.length_buckets=(128,)",
             "--config.data.vision_buckets=(512,)", "--config.data.loss_fractions=(1.0,)")


def make_step():
    def step(x):
        return jnp.tanh(x) @ x.T + 1.0
    return jax.jit(step)  # a new jit object each time: only the persistent cache can spare the compile


def test_compile_cache_counts_loads_and_compiles_and_restores_the_settings(tmp_path):
    from qwen2vl_jax.compiles import CompileCache

    before = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    x = jnp.ones((8, 8))
    with CompileCache(str(tmp_path / "cache")) as first:
        expected = make_step()(x)
    assert (first.programs.compiled("step"), first.programs.loaded("step")) == (1, 0)
    assert any(name.startswith("jit_step") for name in os.listdir(tmp_path / "cache"))  # small programs too
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before
    with CompileCache(str(tmp_path / "cache")) as second:
        got = make_step()(x)
    assert (second.programs.compiled("step"), second.programs.loaded("step")) == (0, 1)
    assert second.programs.count("step") == 1  # count() keeps meaning "programs built"
    assert second.summary() == {"dir": str(tmp_path / "cache"), "loaded": second.programs.loaded(),
                                "compiled": second.programs.compiled()}
    assert jnp.array_equal(expected, got)
    with CompileCache("") as off:  # "": nothing changes
        make_step()(x)
    assert off.programs.loaded() == 0 and off.summary()["dir"] is None


def test_a_resumed_train_run_loads_its_train_step_from_the_cache(tmp_path):
    from data_pipeline.synthetic import write_tfds

    data_dir = str(tmp_path / "data")
    write_tfds(data_dir, {"train": 96, "test": 16}, seed=0)
    workdir = tmp_path / "run"
    log = str(tmp_path / "first.log")
    proc = start(command(workdir, data_dir, *ONE_SHAPE), log)
    deadline = time.monotonic() + TIMEOUT_S
    while len(read_metrics(workdir)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # preempted: saves and stops, so the next run resumes in this workdir
    finish(proc, log)
    first = summary_of(log)
    assert first["preempted"] and first["steps"] < 8
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == first["steps"]  # SIGTERM left a checkpoint of the step it stopped at (checkpoint_every=100)
    assert first["compile_cache"]["dir"] == str(workdir / "compile_cache")
    assert first["compile_cache"]["step_compiled"] == 1 and first["compile_cache"]["step_loaded"] == 0
    assert os.listdir(workdir / "compile_cache")

    log = str(tmp_path / "second.log")
    finish(start(command(workdir, data_dir, *ONE_SHAPE), log), log)
    second = summary_of(log)
    assert second["steps"] == 8 and f"resumed from step {first['steps']}" in open(log).read()
    cache = second["compile_cache"]
    assert cache["step_loaded"] == 1 and cache["step_compiled"] == 0, cache
    assert cache["loaded"] >= 1 and f"{cache['loaded']} programs loaded from the cache, {cache['compiled']} compiled" \
        in open(log).read()

    # qwen2vl-generate on the exported params: the second call loads what the first compiled
    args = [sys.executable, "-m", "evaluation.generate_cli", "--checkpoint", str(workdir / "export"),
            "--prompt", "What colour is the shape?", "--max-new-tokens", "4",
            "--compile-cache", str(tmp_path / "generate_cache")]
    counts = []
    for _ in range(2):
        done = subprocess.run(args, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)
        assert done.returncode == 0, done.stderr[-3000:]
        found = re.search(r"(\d+) programs loaded from the cache, (\d+) compiled", done.stderr)
        counts.append((int(found[1]), int(found[2])))
    (loaded_1, compiled_1), (loaded_2, compiled_2) = counts
    assert loaded_1 == 0 and compiled_1 >= 2  # at least prefill and decode
    assert loaded_2 >= 2 and compiled_2 < compiled_1

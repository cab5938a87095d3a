"""`qwen2vl-train` end to end in subprocesses: kill -9 and resume (bit-exact), compile count ≤ buckets, and a 2-process
jax.distributed run that gives the losses of one process. (A SIGTERM'd run leaves a checkpoint of the step it stopped
at and resumes from it: tests/test_compile_cache.py's first run; on 2 processes: tests/test_multihost_train.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_multihost import free_port, tail
from training.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def command(workdir, data_dir, *overrides):
    """The demo config, shrunk: 96 training examples written once into data_dir, a log record every step."""
    return [sys.executable, "-m", "training.train", "--config", os.path.join(ROOT, "configs", "demo_cpu.py"),
            "--workdir", str(workdir), f"--config.data.data_dir={data_dir}", "--config.data.demo_set.train=96",
            "--config.data.demo_set.test=16", "--config.data.batch_size=4", "--config.log_every=1",
            "--config.demo_eval=False", "--config.tensorboard=False", *overrides]


def environment(devices=1, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    return env | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                  "PYTHONPATH": ROOT} | extra


def start(args, log, **env):
    return subprocess.Popen(args, cwd=ROOT, env=environment(**env), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(proc, log, timeout=TIMEOUT_S):
    try:
        proc.wait(timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{tail(log)}"


def summary_of(log) -> dict:
    text = open(log).read()  # the summary is the last JSON object printed; warnings may follow it at exit
    return json.JSONDecoder().raw_decode(text[text.rindex("\n{") + 1:])[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The shrunk demo set, written once before any run (concurrent runs must not race to write it)."""
    from data_pipeline.synthetic import write_tfds

    folder = str(tmp_path_factory.mktemp("data"))
    write_tfds(folder, {"train": 96, "test": 16}, seed=0)
    return folder


RESUMABLE = ("--config.steps=30", "--config.checkpoint_every=10", "--config.data.length_buckets=(48,64,128)",
             "--config.data.vision_buckets=(128,256,512)")


@pytest.fixture(scope="module")
def step_cache(tmp_path_factory):
    """One compilation cache for the uninterrupted run and the kill -9 test's runs (the same settings, the same
    programs): the uninterrupted run compiles, the later ones load. A resumed run already loads from its workdir's
    cache; test_compile_cache checks what the cache loads and compiles."""
    return str(tmp_path_factory.mktemp("step_cache"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir, step_cache):
    """A 30-step run start to finish (shared by the resume and compile-count tests)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    log = str(workdir / "log")
    finish(start(command(workdir, data_dir, *RESUMABLE, f"--config.compile_cache={step_cache}"), log), log)
    return workdir, summary_of(log)


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, data_dir, uninterrupted, step_cache):
    reference, _ = uninterrupted
    args = command(tmp_path, data_dir, *RESUMABLE, f"--config.compile_cache={step_cache}")
    log = str(tmp_path / "log")
    proc = start(args, log)
    deadline = time.monotonic() + TIMEOUT_S
    while not (tmp_path / "checkpoints" / "10").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed\n{tail(log)}"
    killed_at = max(read_metrics(tmp_path))
    assert killed_at < 30
    finish(start(args, log + "2"), log + "2")
    assert "resumed from step" in open(log + "2").read()
    ours, theirs = read_metrics(tmp_path), read_metrics(reference)
    resumed = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit() and int(p.name) < 30)
    assert sorted(ours) == sorted(theirs) == list(range(1, 31))
    for step in range(1, 31):
        assert ours[step]["loss"] == theirs[step]["loss"], f"step {step} (resumed after step {resumed})"
        assert ours[step]["data_crc"] == theirs[step]["data_crc"], f"data order differs at step {step}"
    assert len({theirs[s]["data_crc"] for s in theirs}) == 30  # the order check is not vacuous


def test_the_final_params_are_exported_as_a_loadable_checkpoint(uninterrupted):
    import qwen2vl_jax
    from qwen2vl_jax.processing import Processor

    workdir, summary = uninterrupted
    assert summary["export"] == str(workdir / "export")
    config, params = qwen2vl_jax.load(summary["export"])  # checks names and shapes against the exported config.json
    processor = Processor.from_pretrained(summary["export"])
    assert config.image_token_id == processor.tokenizer.image_token_id and config.text.vocab_size == 448
    assert processor.image_options.max_pixels == 140 * 140  # inference resizes as training did
    trained = np.asarray(params["language_model"]["embed_tokens"])
    assert np.isfinite(trained).all() and trained.std() > 0


def test_train_step_compiles_once_per_bucket(uninterrupted):
    workdir, summary = uninterrupted
    assert summary["steps"] == 30 and summary["batch_shapes"] >= 2  # the ladders above do produce several shapes
    assert summary["step_compiles"] <= summary["batch_shapes"]
    records = read_metrics(workdir)
    assert records[30]["loss"] < records[1]["loss"]


def two_processes(tmp_path, data_dirs, *args):
    coordinator = f"localhost:{free_port()}"
    return [start(command(tmp_path / "multi", data_dirs[i], *args), str(tmp_path / f"p{i}.log"), devices=1,
                  JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
            for i in range(2)]


def test_two_processes_train_like_one(tmp_path, data_dir):
    """Each process reads and decodes only its batch shard; together they give one process's batches and losses."""
    steps = ["--config.steps=6", "--config.checkpoint_every=3", "--config.mesh=data=2"]
    single_log = str(tmp_path / "single.log")
    single = start(command(tmp_path / "single", data_dir, *steps), single_log, devices=2)
    multi = two_processes(tmp_path, [data_dir] * 2, *steps)
    finish(single, single_log)
    for i, proc in enumerate(multi):
        finish(proc, str(tmp_path / f"p{i}.log"))
    one, two = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "multi")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    np.testing.assert_allclose([two[s]["loss"] for s in range(1, 7)], [one[s]["loss"] for s in range(1, 7)],
                               rtol=1e-5)
    assert [two[s]["data_crc"] for s in range(1, 7)] == [one[s]["data_crc"] for s in range(1, 7)]
    read = [summary_of(str(tmp_path / f"p{i}.log"))["examples_read"] for i in range(2)]
    assert min(read) > 0 and sum(read) == summary_of(single_log)["examples_read"]


def test_an_input_failure_on_one_process_stops_both_with_its_error(tmp_path, data_dir):
    """Process 1's copy of the data set is corrupt (a bad disk on one host): both processes stop with the same
    message naming process 1 and the read error, within the timeout — neither waits forever for the other."""
    import shutil

    bad = tmp_path / "bad_data"
    shutil.copytree(data_dir, bad)
    (record_file,) = bad.glob("synthetic_vqa/*/synthetic_vqa-train.array_record-*")
    raw = bytearray(record_file.read_bytes())
    raw[len(raw) // 4:len(raw) // 2] = b"\xab" * (len(raw) // 2 - len(raw) // 4)
    record_file.write_bytes(raw)
    procs = two_processes(tmp_path, [data_dir, str(bad)], "--config.steps=20", "--config.mesh=data=2")
    for proc in procs:
        proc.wait(TIMEOUT_S)
    logs = [open(tmp_path / f"p{i}.log").read() for i in range(2)]
    assert [proc.returncode for proc in procs] != [0, 0], logs[1][-2000:]
    for log in logs:
        assert "InputError: process 1 of 2 failed to build its share of input batch" in log, log[-2000:]
        assert "Corrupted Riegeli/records file" in log


def test_init_from_a_checkpoint_folder_starts_from_its_weights(tmp_path, data_dir):
    """--config.init_from=DIR (a Hugging Face folder here; a converted one loads the same way): the first logged loss
    is the loss of DIR's weights on the first batch, computed here in-process."""
    import dataclasses

    import torch
    import transformers
    from ml_collections import ConfigDict

    import qwen2vl_jax
    from configs.demo_cpu import get_config
    from data_pipeline.pipeline import training_batches
    from data_pipeline.sources import open_source
    from qwen2vl_jax import Qwen2VLConfig
    from qwen2vl_jax.processing.fixtures import write_tiny_processor
    from reference import hf_config
    from training.step import loss_fn
    from training.train import HOST_KEYS, model_and_processor

    folder = tmp_path / "hf"
    torch.manual_seed(0)
    tiny = Qwen2VLConfig.preset("tiny")
    transformers.Qwen2VLForConditionalGeneration(hf_config(tiny)).save_pretrained(folder)
    write_tiny_processor(folder)
    overrides = [f"--config.init_from={folder}", "--config.tokenizer=", "--config.steps=2",
                 "--config.model.scan_layers=False", "--config.checkpoint_every=100"]
    log = str(tmp_path / "log")
    finish(start(command(tmp_path / "run", data_dir, *overrides), log), log)

    config = ConfigDict(get_config().to_dict())
    config.update(dict(init_from=str(folder), tokenizer=""))
    config.data.update(dict(batch_size=4))
    model_config, processor = model_and_processor(config, str(tmp_path / "run"))
    assert model_config.text.vocab_size == tiny.text.vocab_size and model_config.dtype == "float32"
    batch = next(iter(training_batches(open_source(config.data.train, data_dir=data_dir), processor, model_config,
                                       config.data, seed=config.seed)))
    params = qwen2vl_jax.load(str(folder), scan_layers=False)[1]
    import jax  # jitted as the train step computes it (and far cheaper than op-by-op dispatch)

    loss, _ = jax.jit(lambda p, b: loss_fn(p, b, model_config))(params, {k: v for k, v in batch.items()
                                                                        if k not in HOST_KEYS})
    np.testing.assert_allclose(read_metrics(tmp_path / "run")[1]["loss"], float(loss), rtol=1e-5)

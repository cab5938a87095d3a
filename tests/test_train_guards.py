"""A run that cannot work says so before any device work, a data set with nothing usable ends after one pass, a
stop before the first step ends the run within seconds, and a checkpoint a kill cut short is set aside."""
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs.demo_cpu import get_config
from data_pipeline.batching import NoUsableRecords
from data_pipeline.pipeline import training_batches
from data_pipeline.sources import JsonlSource
from data_pipeline.synthetic import make_example, to_messages
from fake_gcs import gcs  # noqa: F401 (fixture)
from test_multihost import tail
from test_train_cli import command, data_dir, start  # noqa: F401 (fixture)
from training import preflight
from training.checkpoints import Checkpoints
from training.train import model_and_processor


def config_with(**changes):
    config = get_config()
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def check(config, shards=1):
    preflight.check_config(config, shards, 14, 2)


def test_the_shipped_configs_pass():
    import importlib

    from training.train import lora_config

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f not in ("__init__.py", "common.py"))
    assert {"demo_cpu", "demo_cpu_lora", "qwen2vl_7b_lora_v5e8", "qwen2vl_72b_lora_v5e16"} <= set(names)
    for name in names:
        config = importlib.import_module(f"configs.{name}").get_config()
        config.data.train = config.data.train or "jsonl:train.jsonl"  # the TPU configs leave it to the user
        check(config, shards=1)
        lora_config(config)  # LoRA settings that cannot work stop here too


@pytest.mark.parametrize("changes, field", [
    (dict(steps=0), "steps=0"),
    (dict(optim__learning_rate=-1e-4), "optim.learning_rate"),
    (dict(optim__learning_rate=0.0), "optim.learning_rate"),
    (dict(data__batch_size=0), "data.batch_size"),
    (dict(data__length_buckets=(128, 64)), "data.length_buckets"),
    (dict(data__vision_buckets=(256,)), "data.vision_buckets"),  # one 140² image has 100 rows; 256/4 = 64
    (dict(data__length_buckets=(16, 24)), "data.length_buckets"),  # one 140² image takes 25 + 2 tokens
    (dict(data__batch_size=6), "data.batch_size=6 is not a multiple of the mesh's 4 batch shards"),
])
def test_a_value_that_cannot_work_is_named(changes, field):
    with pytest.raises(preflight.PreflightError) as error:
        check(config_with(**changes), shards=4)
    assert field in str(error.value)


def test_an_unknown_field_is_named_before_anything_runs(tmp_path):
    proc = start(command(tmp_path, tmp_path, "--config.data.batchsize=4"), str(tmp_path / "log"))
    assert proc.wait(120) == 2
    text = open(tmp_path / "log").read()
    assert "--config.data.batchsize names no config field" in text and "'batch_size'" in text
    assert "Traceback" not in text and not (tmp_path / "config.json").exists()


def test_a_bad_value_stops_the_cli_before_any_device_work(tmp_path):
    started = time.monotonic()
    proc = start(command(tmp_path, tmp_path, "--config.optim.learning_rate=-0.001"), str(tmp_path / "log"))
    assert proc.wait(120) == 2
    assert "optim.learning_rate=-0.001 must be > 0" in open(tmp_path / "log").read()
    assert not (tmp_path / "config.json").exists() and not (tmp_path / "checkpoints").exists()
    assert time.monotonic() - started < 60


def test_an_unwritable_workdir_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(preflight.PreflightError, match=f"--workdir {blocker}/run cannot be written"):
        preflight.check_workdir(str(blocker / "run"))


def test_a_gcs_bucket_without_permission_is_named(gcs, monkeypatch):
    from fake_gcs import FakeGCS

    def refuse(self, path, mode="rb", **kwargs):
        if "w" in mode:
            raise PermissionError(f"403 POST: caller does not have storage.objects.create access to {path}")
        return FakeGCS._open.__wrapped__(self, path, mode, **kwargs)

    refuse.__wrapped__ = FakeGCS._open
    monkeypatch.setattr(FakeGCS, "_open", refuse)
    with pytest.raises(preflight.PreflightError, match="--workdir gs://bucket/run cannot be written.*403"):
        preflight.check_workdir("gs://bucket/run")


def test_a_full_disk_is_named(tmp_path, monkeypatch):
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 << 30, (10 << 30) - (100 << 20), 100 << 20))
    preflight.check_disk(str(tmp_path), 10 << 20)
    with pytest.raises(preflight.PreflightError, match=f"--workdir {tmp_path} has 0.10 GiB free.*1.00 GiB"):
        preflight.check_disk(str(tmp_path), 1 << 30)


def test_a_resume_with_other_settings_is_refused(tmp_path):
    config = get_config()
    (tmp_path / "checkpoints" / "200").mkdir(parents=True)
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    changed = get_config()
    changed.steps, changed.data.workers, changed.log_every = 3000, 4, 7  # these may change on resume
    preflight.check_resume(changed, str(tmp_path))
    changed.data.batch_size, changed.model.text.num_hidden_layers = 8, 3
    with pytest.raises(preflight.PreflightError) as error:
        preflight.check_resume(changed, str(tmp_path))
    message = str(error.value)
    assert "data.batch_size: checkpoint 16, now 8" in message
    assert "model.text.num_hidden_layers: checkpoint 2, now 3" in message and "steps" not in message.split("(only")[0]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return model_and_processor(get_config(), str(tmp_path_factory.mktemp("demo")))


def unusable_file(folder, count: int, good: int = 0) -> JsonlSource:
    """`count` records of no known format (no messages or conversations) after `good` readable ones."""
    lines = []
    for i in range(good):
        example = make_example(i)
        lines.append({"id": f"good{i}", "messages": to_messages(example, "x.png")})
        example["image"].save(folder / "x.png")
    lines += [{"id": f"bad{i}", "image": "x.png", "question": "What?", "answer": "A"}  # no messages: unusable
              for i in range(count)]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return JsonlSource(str(path))


def data_config(**changes):
    return ConfigDict(get_config().data.to_dict() | dict(batch_size=2, num_epochs=None, workers=0) | changes)


def test_a_file_with_no_usable_record_is_an_error_after_one_pass(demo, tmp_path):
    model_config, processor = demo
    source = unusable_file(tmp_path, 7)
    it = iter(training_batches(source, processor, model_config, data_config(), seed=0))
    with pytest.raises(NoUsableRecords) as error:
        next(it)
    message = str(error.value)
    assert str(tmp_path / "train.jsonl") in message and "none of its 7 records" in message
    reasons = message.split("first reasons — ")[1]
    assert reasons.count("'messages' must be a non-empty list") == 3 and reasons.count("train.jsonl line ") == 3


def test_a_batch_shard_with_no_usable_record_is_named(demo, tmp_path):
    """Records alternate between the 2 batch shards: good ones at even indices feed shard 0 only."""
    model_config, processor = demo
    good = unusable_file(tmp_path, 0, good=1)
    lines = []
    for i in range(4):
        lines.append(json.loads(open(good.path).read()) | {"id": f"good{i}"})
        lines.append({"id": f"bad{i}", "image": "x.png", "conversations": []})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    source = JsonlSource(str(tmp_path / "train.jsonl"))
    it = iter(training_batches(source, processor, model_config, data_config(), seed=0, shards=2))
    with pytest.raises(NoUsableRecords, match=r"train.jsonl \(batch shard 1 of 2\): none of its 4 records"):
        next(it)


def test_the_cli_ends_on_a_file_with_no_usable_record(tmp_path):
    unusable_file(tmp_path, 40)
    started = time.monotonic()
    args = command(tmp_path / "run", tmp_path, f"--config.data.train=jsonl:{tmp_path}/train.jsonl")
    proc = start(args, str(tmp_path / "log"))
    assert proc.wait(180) == 1, tail(str(tmp_path / "log"))
    text = open(tmp_path / "log").read()
    assert "none of its 40 records gave a training example in a whole pass" in text, tail(str(tmp_path / "log"))
    assert time.monotonic() - started < 120


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_before_the_first_step_ends_the_run_within_seconds(tmp_path, data_dir, signum):  # noqa: F811
    """The signal lands while the run prepares (reading the data, initializing, compiling the first step)."""
    log = str(tmp_path / "log")
    proc = start(command(tmp_path, data_dir, "--config.compile_cache="), log)
    deadline = time.monotonic() + 120
    while not (tmp_path / "config.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)
    assert proc.poll() is None, tail(log)
    sent = time.monotonic()
    proc.send_signal(signum)
    try:
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - sent < 10
    text = open(log).read()
    assert code == 128 + signum and f"{signal.Signals(signum).name} before the first train step" in text, tail(log)
    assert not (tmp_path / "metrics.jsonl").exists() or not open(tmp_path / "metrics.jsonl").read().strip()
    assert not [p for p in (tmp_path / "checkpoints").glob("*") if p.name.isdigit()]


class _State:
    def __init__(self, position):
        self.position = position

    def get_state(self):
        return {"shards": {"0": {"position": self.position}}}


def test_a_checkpoint_a_kill_cut_short_is_set_aside(tmp_path, caplog):
    """Step 3 lost its commit marker, step 2 has a truncated array file: the run resumes from step 1, logs both and
    saves steps 2 and 3 again later."""
    checkpoints = Checkpoints(str(tmp_path), every=1, keep=5)
    for step in (1, 2, 3):
        checkpoints.save(step, {"x": jnp.arange(4096.0) + step}, _State(10 * step), force=True)
    checkpoints.close()
    os.remove(tmp_path / "3" / "commit_success.txt")
    for folder, _, names in os.walk(tmp_path / "2" / "state"):
        for name in names:
            if f"{os.sep}d" in folder:  # the array data files
                path = os.path.join(folder, name)
                os.truncate(path, os.path.getsize(path) // 2)
    abstract = {"x": jax.ShapeDtypeStruct((4096,), jnp.float32)}
    checkpoints = Checkpoints(str(tmp_path), every=1, keep=5)
    with caplog.at_level(logging.WARNING, logger="training.checkpoints"):
        step, state, data = checkpoints.restore_latest(abstract)
    assert step == 1 and data == {"shards": {"0": {"position": 10}}}
    np.testing.assert_array_equal(state["x"], np.arange(4096.0) + 1)
    assert "skipping checkpoint step 3" in caplog.text and "no commit_success.txt" in caplog.text
    assert "skipping checkpoint step 2" in caplog.text and "do not read back" in caplog.text
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "set_aside").iterdir()) == ["2", "3"]
    for step in (2, 3):
        checkpoints.save(step, {"x": jnp.arange(4096.0) - step}, _State(step), force=True)
    checkpoints.close()
    again = Checkpoints(str(tmp_path), every=1, keep=5)
    step, state, _ = again.restore_latest(abstract)
    assert step == 3 and float(state["x"][0]) == -3
    again.close()


def test_a_stop_whose_raise_was_swallowed_still_ends_the_run():
    """Code that catches every exception (JAX's compilation-cache read, a gc callback) can swallow the raise: the
    request is remembered, so disarm() at the first step raises it."""
    from training.interrupts import Interrupted, StopBeforeFirstStep

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopBeforeFirstStep(grace_s=60) as guard:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs here and raises
        except Exception:
            pass  # swallowed
        with pytest.raises(Interrupted, match="SIGTERM before the first train step"):
            guard.disarm()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_a_run_that_does_not_end_after_a_stop_is_ended_by_the_watcher(tmp_path):
    """The main thread swallows the raise and then hangs (or compiles for minutes): the watcher ends the process
    `grace_s` after the signal with the message, exit 128 + signal."""
    import subprocess
    import sys

    script = ("import os, signal, time, logging, multiprocessing\n"
              "logging.basicConfig()\n"
              "from training.interrupts import StopBeforeFirstStep\n"
              "if __name__ == '__main__':\n"
              "  worker = multiprocessing.get_context('spawn').Process(target=time.sleep, args=(60,))\n"
              "  worker.start(); print(worker.pid, flush=True)\n"
              "  with StopBeforeFirstStep(grace_s=1):\n"
              "    try:\n"
              "        os.kill(os.getpid(), signal.SIGTERM); time.sleep(1)\n"
              "    except Exception:\n"
              "        pass\n"
              "    time.sleep(60)\n")
    path = tmp_path / "run.py"
    path.write_text(script)
    started = time.monotonic()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, str(path)], cwd=root, env=os.environ | {"PYTHONPATH": root},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 128 + signal.SIGTERM, out.stderr
    assert "SIGTERM before the first train step" in out.stderr and "ended here" in out.stderr
    assert time.monotonic() - started < 20
    worker = int(out.stdout.split()[0])  # its worker process went with it
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker}"), "the worker process outlived the run"

"""qwen2vl-eval end to end on a tiny random checkpoint: one line per input (bad ones included), a kill -9 and a
rerun end with the file of an uninterrupted run, and 2 processes give 1 process's predictions and summary."""
import json
import os
import signal
import sys
import time

import numpy as np
import pytest
from PIL import Image

from reference import tiny_checkpoint
from test_multihost import free_port
from test_train_cli import finish, start

SAMPLES = 24
BAD = {3: "nope.png", 7: "corrupt.png", 11: ""}  # index → missing file, corrupt file, empty question


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint folder, eval JSONL) — a tiny untied model whose answers are readable text."""
    folder = tmp_path_factory.mktemp("eval")
    tiny_checkpoint(folder / "ckpt")
    rng = np.random.default_rng(0)
    (folder / "img").mkdir()
    (folder / "img" / "corrupt.png").write_bytes(b"not a png")
    lines = []
    for i in range(SAMPLES):
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (int(rng.integers(30, 120)), int(rng.integers(30, 120)), 3),
                                     np.uint8)).save(folder / "img" / name)
        question = "What color is the car?" if i != 11 else ""
        image = "img/" + (BAD[i] if i in (3, 7) else name)
        lines.append({"id": f"q{i}", "question": question, "image": image, "answers": ["red", "blue"]})
    (folder / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "ckpt", folder / "data.jsonl"


def command(checkpoint, data, out, *extra):
    return [sys.executable, "-m", "evaluation.runner", "--checkpoint", str(checkpoint), "--data", str(data),
            "--task", "vqa", "--out", str(out), "--batch-size", "4", "--max-new-tokens", "4", *extra]


def lines(path):
    return [json.loads(line) for line in open(path)]


def comparable(summary):
    """What an interrupted or multi-process run must agree on: all but how this invocation's work went (its speed,
    compiles, padding and the media sizes of the samples it ran)."""
    return {k: v for k, v in summary.items() if k not in ("samples_per_s", "compiles", "padding", "media_used")}


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    checkpoint, data = setup
    out = tmp_path_factory.mktemp("one") / "preds.jsonl"
    log = str(out) + ".log"
    finish(start(command(checkpoint, data, out), log), log)
    return out


def test_one_line_per_input_with_errors_for_the_bad_ones(uninterrupted):
    result = lines(uninterrupted)
    assert [r["index"] for r in result] == list(range(SAMPLES))
    assert [r["id"] for r in result] == [f"q{i}" for i in range(SAMPLES)]
    errors = {r["index"]: r["error"] for r in result if r["error"]}
    assert set(errors) == set(BAD)
    assert "not found" in errors[3] and "cannot read image" in errors[7] and "empty question" in errors[11]
    good = [r for r in result if not r["error"]]
    assert all(isinstance(r["prediction"], str) and 0 <= r["score"] <= 1 for r in good)
    summary = json.load(open(str(uninterrupted)[:-len(".jsonl")] + ".summary.json"))
    assert (summary["samples"], summary["scored"], summary["errors"]) == (SAMPLES, SAMPLES - 3, 3)
    assert summary["value"] == pytest.approx(np.mean([r["score"] for r in good]))
    assert summary["compiles"]["decode"] <= 2 and summary["compiles"]["prefill"] <= 4
    assert set(summary["compiles"]) == {"prefill", "decode"}, summary["compiles"]  # every compile is counted


def test_a_killed_run_finishes_with_the_uninterrupted_file(setup, uninterrupted, tmp_path):
    checkpoint, data = setup
    out = tmp_path / "preds.jsonl"
    args = command(checkpoint, data, out, "--batch-size", "2")
    proc = start(args + ["--chunk", "4"], str(tmp_path / "log"))
    part = tmp_path / "preds.jsonl.part0"
    deadline = time.monotonic() + 300
    while (not part.exists() or len(part.read_text().splitlines()) < 4) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 4 <= len(part.read_text().splitlines()) < SAMPLES
    finish(start(args, str(tmp_path / "log2")), str(tmp_path / "log2"))
    assert lines(out) == lines(uninterrupted)
    assert not part.exists()
    summary = lambda p: comparable(json.load(open(str(p)[:-len(".jsonl")] + ".summary.json")))
    assert summary(out) == summary(uninterrupted)


def test_two_processes_give_the_predictions_of_one(setup, uninterrupted, tmp_path):
    checkpoint, data = setup
    out = tmp_path / "preds.jsonl"
    coordinator = f"localhost:{free_port()}"
    procs = [start(command(checkpoint, data, out), str(tmp_path / f"p{i}.log"), JAX_COORDINATOR_ADDRESS=coordinator,
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)) for i in range(2)]
    for i, proc in enumerate(procs):
        finish(proc, str(tmp_path / f"p{i}.log"))
    assert lines(out) == lines(uninterrupted)
    summary = lambda p: comparable(json.load(open(str(p)[:-len(".jsonl")] + ".summary.json")))
    assert summary(out) == summary(uninterrupted)


def test_a_sharded_model_writes_the_predictions_of_one_device(setup, uninterrupted, tmp_path):
    """One SPMD program over 8 devices, weights split over tensor=2 and each batch over data=4, against the whole
    model on one device: the same predictions file, and only the two generation programs compiled (once per
    shape), however many devices."""
    checkpoint, data = setup
    summaries = []
    for mesh in ("data=1", "tensor=2,data=4"):
        out = tmp_path / f"{mesh.replace(',', '_')}.jsonl"
        finish(start(command(checkpoint, data, out, "--mesh", mesh), str(out) + ".log", devices=8),
               str(out) + ".log")
        assert lines(out) == lines(uninterrupted), mesh
        summaries.append(json.load(open(str(out)[:-len(".jsonl")] + ".summary.json")))
    one, sharded = (s["compiles"] for s in summaries)
    assert set(one) == set(sharded) == {"prefill", "decode"}, (one, sharded)
    # one compile per program shape, not per device: on data=4 every batch (4 rows, or a last one padded to 4) has
    # one shape; one device also compiles batch rung 1 for the last, single-sample batch
    assert sharded == {"prefill": 1, "decode": 1} and one == {"prefill": 2, "decode": 2}, (one, sharded)

"""`qwen2vl-train --check` (training/check.py): a train file with bad records, oversize samples and a config that
does not fit — the report says each, with exact counts."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from training import preflight
from training.check import NOTHING_LEFT, TOO_MANY_PATCHES, run_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def turn(role, text, image=None):
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": text}]
    return {"role": role, "content": content if role == "user" else text}


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    """9 lines: 4 good (2 of them cut), 2 failing, 2 dropped, 1 blank."""
    folder = tmp_path_factory.mktemp("check_data")
    Image.new("RGB", (56, 56), (200, 10, 10)).save(folder / "small.png")  # 16 patch rows
    Image.new("RGB", (1000, 1000), (10, 200, 10)).save(folder / "big.png")  # 5184 patch rows, 1296 tokens
    lines = [
        [turn("user", "What colour?", "small.png"), turn("assistant", "red")],  # 1 good
        [turn("user", "Hello"), turn("assistant", "hi there")],  # 2 good, text only
        [turn("user", "What colour?", "missing.png"), turn("assistant", "red")],  # 3 fails: no such file
        "{not json",  # 4 fails: malformed
        [turn("user", "Big?", "big.png"), turn("assistant", "green")],  # 5 dropped: vision rows over the bucket
        [turn("user", "Tell me"), turn("assistant", "word " * 3000)],  # 6 truncated
        "",  # 7 blank: no record
        [turn("user", "long " * 3000), turn("assistant", "ok")],  # 8 dropped: the answer is past the cut
        [turn("user", "hi"), turn("assistant", "ok"),  # 9 truncated: 1800 tokens of text, then the image, which
         {"role": "user", "content": [{"type": "text", "text": "x " * 900}, {"type": "image", "image": "big.png"}]},
         turn("assistant", "green")],  # the cut falls inside: left out whole
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps({"messages": line}) for line in lines)
    (folder / "train.jsonl").write_text(text + "\n")
    return folder / "train.jsonl"


def config_for(train_file, **changes):
    from configs.demo_cpu import get_config

    config = get_config()
    config.mesh = "data=1"
    config.data.update(dict(train=f"jsonl:{train_file}", demo_set={}, max_pixels=0, length_buckets=(64, 2048),
                            vision_buckets=(1024, 2048), pack=True, batch_size=4))
    config.update(changes)
    return config


@pytest.fixture(scope="module")
def report(train_file, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("check_workdir")
    report = run_check(config_for(train_file), str(workdir), progress=False)
    assert json.loads((workdir / "check.json").read_text())["records"] == report["records"]
    return report


def test_records_and_failures_with_their_lines(report, train_file):
    assert report["records"] == 8 and report["examples"] == 4
    failed = report["failed"]
    assert failed["count"] == 2 and failed["by_reason"] == {"FileNotFoundError": 1, "unreadable record": 1}
    assert [f["where"] for f in failed["first"]] == [f"{train_file} line 3", f"{train_file} line 4"]
    assert "missing.png" in failed["first"][0]["error"]


def test_dropped_and_truncated_samples_and_why(report, train_file):
    dropped = report["dropped"]
    assert dropped["count"] == 2 and dropped["by_reason"] == {TOO_MANY_PATCHES: 1, NOTHING_LEFT: 1}
    assert [(d["where"], d["reason"]) for d in dropped["first"]] == [
        (f"{train_file} line 5", TOO_MANY_PATCHES), (f"{train_file} line 8", NOTHING_LEFT)]
    assert "5184 vision patch rows" in dropped["first"][0]["error"]
    truncated = report["truncated"]
    assert truncated["count"] == 2 and truncated["vision_items_left_out"] == 1
    assert [(t["where"], t["kept"] <= 2048 < t["tokens"], t["vision_items_left_out"]) for t in truncated["first"]] == [
        (f"{train_file} line 6", True, 0), (f"{train_file} line 9", True, 1)]


def test_token_histograms_against_the_buckets(report):
    # tokenized samples (lines 1 2 5 6 8 9), before truncation: 1 and 2 short, 5 ≈ 1330 tokens, 6 8 9 over 2048
    assert report["length"] == {"rungs": [64, 2048], "samples": [2, 1], "over": 3}
    # patch rows: line 1's 16, lines 5 and 9's 5184 over the per-shard ladder; lines 2 6 8 have no image
    assert report["vision_rows"] == {"rungs": [1024, 2048], "samples": [1, 0], "over": 2, "text_only": 3}
    assert report["vision_tokens"]["max"] == 1296 and report["vision_tokens"]["min"] == 0


def test_packing_efficiency_from_the_batcher(report):
    packing = report["packing"]
    assert packing["batches"] >= 1 and packing["empty_shards"] == []
    assert 0 < packing["efficiency"] <= 1 and packing["efficiency"] == (packing["real_tokens"]
                                                                         / packing["padded_tokens"])
    assert not report["ok"] and report["exit_code"] == 1 and len(report["problems"]) == 2
    assert report["memory"]["planned"] is False and "--config.chip" in report["memory"]["why"]


def test_an_unknown_chip_is_a_config_error(train_file, tmp_path):
    with pytest.raises(preflight.PreflightError, match="chip='v9'"):
        run_check(config_for(train_file, chip="v9"), str(tmp_path), progress=False)


def test_cli_says_the_step_does_not_fit_and_exits_1(train_file, tmp_path):
    """The demo model with a 4M-wide MLP on a v5e 2x2 slice (XLA:TPU with libtpu, else XLA:CPU on 4 fake
    devices): replicated over data=4 it needs far more than 16 GB per chip."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # the command sets the fake CPU devices an XLA:CPU plan needs
    good = train_file.parent / "good.jsonl"
    good.write_text("".join(line + "\n" for line in train_file.read_text().splitlines()[:2]))
    args = [sys.executable, "-m", "training.train", "--config", os.path.join(ROOT, "configs", "demo_cpu.py"),
            "--workdir", str(tmp_path), f"--config.data.train=jsonl:{good}", "--config.data.demo_set={}",
            "--config.mesh=data=4", "--config.chip=v5e", "--config.model.text.intermediate_size=4194304", "--check"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["records"] == 2 and report["failed"]["count"] == report["dropped"]["count"] == 0
    memory = report["memory"]
    assert memory["planned"] and memory["fits"] is False and memory["peak_per_device"] > 16e9
    assert memory["compiler"].startswith("XLA:")
    assert "memory: does not fit" in done.stdout and "check FAILED" in done.stdout
    assert "checking records" in done.stderr  # the progress bar

"""Tests for data_pipeline.synthetic and data_pipeline.sources (fast, CPU only)."""

import io
import json
import os
import pickle
from collections import Counter

import pytest
from PIL import Image

from data_pipeline import sources, synthetic


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    ds_dir = synthetic.write_tfds(data_dir, splits={"train": 20, "test": 8}, seed=3)
    return data_dir, ds_dir


# ---------------------------------------------------------------- synthetic


def test_make_example_deterministic_and_valid():
    for i in range(12):
        a, b = synthetic.make_example(i, seed=5), synthetic.make_example(i, seed=5)
        assert a["image"].tobytes() == b["image"].tobytes()
        assert (a["question"], a["answer"]) == (b["question"], b["answer"])
        assert a["image"].mode == "RGB"
        w, h = a["image"].size
        assert 56 <= min(w, h) and max(w, h) <= 320 and max(w, h) / min(w, h) <= 3.01
        assert a["answer"] in synthetic.ANSWERS[a["question_type"]]
        assert a["question"] in synthetic.QUESTIONS[a["question_type"]]
    assert (synthetic.make_example(0, seed=1)["image"].tobytes()
            != synthetic.make_example(0, seed=2)["image"].tobytes())


def test_answers_cover_all_classes():
    seen = {t: Counter() for t in synthetic.QUESTION_TYPES}
    for i in range(200):
        ex = synthetic.make_example(i)
        seen[ex["question_type"]][ex["answer"]] += 1
    for qtype, answers in synthetic.ANSWERS.items():
        assert set(seen[qtype]) == set(answers), qtype
        assert sum(seen[qtype].values()) == 50


def test_demo_corpus_and_messages():
    corpus = " ".join(synthetic.demo_corpus())
    for qtype in synthetic.QUESTION_TYPES:
        assert all(q in corpus for q in synthetic.QUESTIONS[qtype])
        assert all(a in corpus.split() for a in synthetic.ANSWERS[qtype])
    ex = synthetic.make_example(2)
    msgs = synthetic.to_messages(ex, None)
    assert msgs[0]["content"][0] == {"type": "image"}
    assert msgs[1]["content"][0]["text"] == ex["answer"]
    assert synthetic.to_messages(ex, "a.png")[0]["content"][0]["image"] == "a.png"


# ---------------------------------------------------------------- tfds


def test_tfds_roundtrip(tfds_dir):
    data_dir, ds_dir = tfds_dir
    train = sources.TfdsSource("synthetic_vqa", "train", data_dir=data_dir)
    test = sources.open_source("tfds:synthetic_vqa:test", data_dir=data_dir)
    assert (len(train), len(test)) == (20, 8)
    for i in (0, 7):
        rec = train[i]
        ex = synthetic.make_example(i, seed=3)
        assert rec["messages"] == synthetic.to_messages(ex, None)
        assert (rec["answer"], rec["question_type"]) == (ex["answer"], ex["question_type"])
        assert len(rec["images"]) == 1 and rec["videos"] == []
        assert _png_size(rec["images"][0]) == ex["image"].size
    train_ids = {train[i]["id"] for i in range(len(train))}
    test_ids = {test[i]["id"] for i in range(len(test))}
    assert not train_ids & test_ids
    train_imgs = {train[i]["images"][0] for i in range(len(train))}
    assert not train_imgs & {test[i]["images"][0] for i in range(len(test))}
    # Folder path form, and pickling (grain workers).
    by_dir = pickle.loads(pickle.dumps(sources.open_source(f"tfds:{ds_dir}:train")))
    assert by_dir[3]["images"] == train[3]["images"]


def test_tfds_deterministic_and_reuse(tfds_dir, tmp_path):
    data_dir, ds_dir = tfds_dir
    other = synthetic.write_tfds(tmp_path, splits={"train": 20, "test": 8}, seed=3)
    a = sources.TfdsSource(ds_dir, "test")
    b = sources.TfdsSource(other, "test")
    assert [a[i]["images"][0] for i in range(8)] == [b[i]["images"][0] for i in range(8)]
    assert synthetic.write_tfds(tmp_path, splits={"train": 20, "test": 8}, seed=3) == other
    with pytest.raises(FileExistsError, match="already holds"):
        synthetic.write_tfds(tmp_path, splits={"train": 5}, seed=3)


def test_tfds_missing_dataset_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="write_tfds"):
        sources.TfdsSource("synthetic_vqa", "train", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset_info.json"):
        sources.TfdsSource(str(tmp_path / "nowhere"), "train")


# ---------------------------------------------------------------- jsonl


def test_jsonl_roundtrip(tmp_path):
    path = synthetic.write_jsonl(tmp_path / "d", count=6, seed=1, start=10)
    src = sources.open_source(path)
    assert len(src) == 6
    rec = pickle.loads(pickle.dumps(src))[2]
    ex = synthetic.make_example(12, seed=1)
    assert rec["images"] == [str(tmp_path / "d" / "images" / "12.png")]
    assert rec["messages"] == synthetic.to_messages(ex, "images/12.png")
    assert (rec["answer"], rec["question_type"]) == (ex["answer"], ex["question_type"])
    with Image.open(rec["images"][0]) as im:
        assert im.size == ex["image"].size
    root_src = sources.open_source(f"jsonl:{path}?root={tmp_path}")
    assert root_src[0]["images"] == [str(tmp_path / "images" / "10.png")]


def _conv(image_ref):
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image_ref},
                                     {"type": "text", "text": "q"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a"}]}]}


def test_jsonl_confinement_and_malformed_lines(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(root / "ok.png", root / "inner_link.png")
    lines = [
        json.dumps(_conv("ok.png")),                         # line 1: fine
        json.dumps(_conv("../x.png")),                       # line 2: .. escape
        json.dumps(_conv("/etc/passwd")),                    # line 3: absolute
        json.dumps(_conv("link.png")),                       # line 4: symlink out
        "{not json",                                         # line 5
        json.dumps({"id": "no-msgs", "text": "hi"}),         # line 6: no messages
        "",                                                  # blank: skipped
        json.dumps({**_conv(None), "images": ["sub/a.png"], "source": "llava"}),  # line 8
        json.dumps(_conv("inner_link.png")),                 # line 9: symlink inside
    ]
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    src = sources.JsonlSource(path)
    assert len(src) == 8
    recs = [src[i] for i in range(len(src))]
    assert recs[0]["images"] == [str(root / "ok.png")] and "error" not in recs[0]
    for rec, line, word in [(recs[1], 2, "escapes"), (recs[2], 3, "absolute"),
                            (recs[3], 4, "symlink"), (recs[4], 5, ""),
                            (recs[5], 6, "messages")]:
        assert set(rec) == {"error", "id"}
        assert f"line {line}" in rec["error"] and str(path) in rec["error"]
        assert word in rec["error"]
    assert recs[5]["id"] == "data.jsonl:6"
    assert recs[6]["images"] == [str(root / "sub" / "a.png")]
    assert recs[6]["source"] == "llava"
    assert recs[7]["images"] == [str(root / "inner_link.png")]


def test_open_source_rejects_unknown_spec():
    with pytest.raises(ValueError, match="jsonl:PATH"):
        sources.open_source("data.csv")


def test_jsonl_reads_from_many_threads_return_their_own_lines(tmp_path):
    """grain reads records from 16 threads at once: every index gets its own line (one shared file handle once
    gave some threads another thread's line, or half of one)."""
    from concurrent.futures import ThreadPoolExecutor

    with open(tmp_path / "a.jsonl", "w") as f:
        for i in range(3000):
            f.write(json.dumps({"id": f"r{i}", "messages": [{"role": "user", "content": "x" * (i % 300)}]}) + "\n")
    source = pickle.loads(pickle.dumps(sources.JsonlSource(str(tmp_path / "a.jsonl"))))  # as a worker process gets it
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: source[i]["id"], range(3000)))
    assert ids == [f"r{i}" for i in range(3000)]


def test_a_tfds_source_reopens_as_it_is_unpickled(tfds_dir):
    """In a grain worker the source is unpickled in the main thread, before the read threads: it opens there, so
    the read threads never import tensorflow_datasets concurrently (that import can deadlock)."""
    source = sources.TfdsSource("synthetic_vqa", "train", data_dir=tfds_dir[0])
    copy = pickle.loads(pickle.dumps(source))
    assert copy._ds is not None and copy[0]["id"] == source[0]["id"]
    assert pickle.loads(pickle.dumps(source)).__getstate__()["_ds"] is None

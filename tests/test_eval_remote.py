"""qwen2vl-eval with gs:// data and output (an in-memory gs:// filesystem behind the real etils.epath → fsspec path:
no append, no fileno), the per-process parts (resume, a line cut by a kill), and process 0's refusal to merge when
another host's part is not visible to it."""
import json

import numpy as np
import pytest
from etils import epath
from PIL import Image

from evaluation.data import JsonlEvalSource, default_root, open_eval_source
from evaluation.runner import PartWriter, check_parts, done_path, merge, part_path, read_lines
from fake_gcs import gcs  # noqa: F401 (fixture)


def line(index: int) -> dict:
    return {"index": index, "id": f"q{index}", "prompt": "?", "prediction": "red", "answers": ["red"],
            "score": 1.0, "error": None}


def write_part(out: str, rank: int, indices) -> None:
    writer = PartWriter(out, rank)
    writer.write([line(i) for i in indices])
    writer.finish()


# ---------------------------------------------------------------- merging the processes' parts


def test_merge_refuses_when_another_process_part_is_not_visible(tmp_path):
    out = str(tmp_path / "preds.jsonl")
    write_part(out, 0, [0, 2, 4])  # process 1's part went to its own disk
    with pytest.raises(FileNotFoundError, match=r"process 1: no .*part1\.done.*storage all hosts see.*gs://"):
        merge(out, 2, "vqa", 6, {})
    assert not epath.Path(out).exists() and epath.Path(part_path(out, 0)).exists()  # nothing lost, nothing merged
    write_part(out, 1, [1, 3, 5])
    summary = merge(out, 2, "vqa", 6, {})
    assert [x["index"] for x in read_lines(out)] == list(range(6))
    assert (summary["samples"], summary["scored"]) == (6, 6)
    assert not any(epath.Path(p(out, r)).exists() for p in (part_path, done_path) for r in range(2))


def test_merge_refuses_a_part_shorter_than_its_marker(tmp_path):
    out = str(tmp_path / "preds.jsonl")
    write_part(out, 0, [0, 2])
    write_part(out, 1, [1, 3])
    epath.Path(part_path(out, 1)).write_text(json.dumps(line(1)) + "\n")  # e.g. not yet visible in full
    with pytest.raises(FileNotFoundError, match=r"process 1: .*part1 holds 1 of its 2 lines"):
        check_parts(out, 2)


def test_a_line_cut_by_a_kill_is_dropped_and_the_next_lines_start_clean(tmp_path):
    out = str(tmp_path / "preds.jsonl")
    part = tmp_path / "preds.jsonl.part0"
    part.write_text(json.dumps(line(0)) + "\n" + json.dumps(line(2))[:20])  # killed mid-line
    writer = PartWriter(out, 0)
    assert [x["index"] for x in writer.kept] == [0]
    writer.write([line(2), line(4)])
    writer.finish()
    assert [x["index"] for x in read_lines(part)] == [0, 2, 4]
    assert json.loads(epath.Path(done_path(out, 0)).read_text())["lines"] == 3


def test_a_remote_part_survives_a_kill_and_resumes(gcs):  # noqa: F811
    out = "gs://bucket/run/preds.jsonl"
    writer = PartWriter(out, 0)
    writer.write([line(0), line(1)])
    assert [x["index"] for x in read_lines(part_path(out, 0))] == [0, 1]  # copied after the chunk
    writer.write([line(2)])
    writer.close()  # killed: no marker
    assert not epath.Path(done_path(out, 0)).exists()
    writer = PartWriter(out, 0)
    assert [x["index"] for x in writer.kept] == [0, 1, 2]
    writer.write([line(3)])
    writer.finish()
    merge(out, 1, "vqa", 4, {})
    assert [x["index"] for x in read_lines(out)] == [0, 1, 2, 3]
    assert json.loads(epath.Path("gs://bucket/run/preds.summary.json").read_text())["samples"] == 4
    assert sorted(gcs.store) == ["bucket/run/preds.jsonl", "bucket/run/preds.summary.json"]


# ---------------------------------------------------------------- gs:// evaluation data


def test_default_root_of_a_remote_file_stays_remote():
    assert default_root("gs://bucket/eval/data.jsonl") == "gs://bucket/eval"
    assert default_root("data.jsonl").startswith("/") and not default_root("data.jsonl").endswith("gs:")


def test_gs_media_paths_resolve_under_the_gs_folder(gcs, tmp_path):  # noqa: F811
    lines = [{"id": "a", "question": "?", "image": "img/0.png"}, {"id": "b", "question": "?", "image": "../x.png"},
             {"id": "c", "messages": [{"role": "user", "content": [{"type": "image", "image": "img/1.png"},
                                                                  {"type": "text", "text": "?"}]}]}]
    epath.Path("gs://bucket/eval/data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    source = open_eval_source("gs://bucket/eval/data.jsonl")
    assert source.root == "gs://bucket/eval" and source.root_real is None
    assert source[0]["images"] == ["gs://bucket/eval/img/0.png"]
    assert "escapes the media root" in source[1]["error"]
    assert source[2]["images"] == ["gs://bucket/eval/img/1.png"]
    (tmp_path / "data.jsonl").write_text(json.dumps(lines[0]) + "\n")  # a local file, remote media
    local = open_eval_source(f"jsonl:{tmp_path / 'data.jsonl'}?root=gs://bucket/media")
    assert local.root_real is None and local[0]["images"] == ["gs://bucket/media/img/0.png"]
    assert JsonlEvalSource(str(tmp_path / "data.jsonl")).root_real == str(tmp_path.resolve())


def test_data_uris_and_remote_urls_pass_through_confined_path():
    from data_pipeline.sources import confined_path

    uri = "data:image/png;base64,iVBO/Rw0+KGgo=="  # base64 holds "/": never joined onto the root
    assert confined_path(uri, "/data", "/data") == uri
    assert confined_path("gs://other/a.png", "/data", "/data") == "gs://other/a.png"
    assert confined_path("img/a.png", "gs://bucket/eval", None) == "gs://bucket/eval/img/a.png"


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from reference import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("remote") / "ckpt")


def test_eval_reads_and_writes_gs_like_a_local_run(checkpoint, gcs, tmp_path):  # noqa: F811
    from evaluation.runner import evaluate

    rng = np.random.default_rng(0)
    lines = [{"id": f"q{i}", "question": "What color is the car?", "image": f"img/{i}.png", "answers": ["red"]}
             for i in range(6)] + [{"id": "missing", "question": "?", "image": "img/nope.png", "answers": ["x"]}]
    (tmp_path / "img").mkdir()
    for i in range(6):
        array = rng.integers(0, 255, (int(rng.integers(30, 90)), int(rng.integers(30, 90)), 3), np.uint8)
        Image.fromarray(array).save(tmp_path / "img" / f"{i}.png")
        epath.Path(f"gs://bucket/eval/img/{i}.png").write_bytes((tmp_path / "img" / f"{i}.png").read_bytes())
    text = "".join(json.dumps(x) + "\n" for x in lines)
    (tmp_path / "data.jsonl").write_text(text)
    epath.Path("gs://bucket/eval/data.jsonl").write_text(text)
    options = dict(batch_size=4, max_new_tokens=4, chunk=3)
    local = evaluate(str(checkpoint), str(tmp_path / "data.jsonl"), "vqa", str(tmp_path / "preds.jsonl"), **options)
    remote = evaluate(str(checkpoint), "gs://bucket/eval/data.jsonl", "vqa", "gs://bucket/out/preds.jsonl", **options)
    expected = read_lines(tmp_path / "preds.jsonl")
    got = read_lines("gs://bucket/out/preds.jsonl")
    assert len(got) == 7 and "gs://bucket/eval/img/nope.png" in got[-1]["error"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "error"} for r in rows]  # noqa: E731
    assert strip(got) == strip(expected) and all(isinstance(r["prediction"], str) for r in got[:6])
    drop = ("samples_per_s", "compiles")
    assert {k: v for k, v in remote.items() if k not in drop} == {k: v for k, v in local.items() if k not in drop}
    assert json.loads(epath.Path("gs://bucket/out/preds.summary.json").read_text())["samples"] == 7
    assert not [name for name in gcs.store if ".part" in name]

"""The training data files people already have (data_pipeline/formats.py through sources.JsonlSource): LLaMA-Factory
messages, ShareGPT conversations, LLaVA and ms-swift lines give the records of the equivalent Qwen JSONL, and the same
token ids, labels and pixels after the training transform; malformed lines are error records naming file, line and
key, which the pipeline counts and skips. Fast: tiny PNGs, one .npy clip, the demo tokenizer, no model."""
import dataclasses
import io
import json

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from configs.demo_cpu import get_config
from data_pipeline.formats import split_tags
from data_pipeline.pipeline import training_batches
from data_pipeline.sources import JsonlSource
from data_pipeline.transforms import ToExample
from qwen2vl_jax.processing import Processor
from training.train import model_and_processor

IMAGE, VIDEO = {"type": "image"}, {"type": "video"}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def turn(role: str, content) -> dict:
    return {"role": role, "content": content}


# name → (lines in that format, the same conversations as Qwen JSONL whose media items take the top-level lists)
CASES = {
    "llamafactory_messages": (
        [{"id": "lf1", "messages": [turn("system", "Be brief."), turn("user", "<image>Who is this?"),
                                    turn("assistant", "a cat"), turn("user", "And <image>here?"),
                                    turn("assistant", "a dog")], "images": ["media/a.png", "media/b.png"]},
         {"id": "lf2", "system": "Be brief.", "messages": [turn("user", "<video>What happens?"),
                                                           turn("assistant", "it moves")],
          "videos": ["media/clip.npy"], "source": "lf"}],
        [{"id": "lf1", "messages": [turn("system", "Be brief."), turn("user", [IMAGE, text("Who is this?")]),
                                    turn("assistant", "a cat"), turn("user", [text("And "), IMAGE, text("here?")]),
                                    turn("assistant", "a dog")], "images": ["media/a.png", "media/b.png"]},
         {"id": "lf2", "messages": [turn("system", "Be brief."), turn("user", [VIDEO, text("What happens?")]),
                                    turn("assistant", "it moves")], "videos": ["media/clip.npy"], "source": "lf"}]),
    "sharegpt_conversations": (
        [{"id": "sg1", "conversations": [{"from": "system", "value": "Be brief."},
                                         {"from": "human", "value": "<image>Who is this?"},
                                         {"from": "gpt", "value": "a cat"}], "images": ["media/a.png"]},
         {"id": "sg2", "system": "Be brief.", "conversations": [{"from": "human", "value": "<image><video>Same?"},
                                                                {"from": "gpt", "value": "no"}],
          "images": ["media/b.png"], "videos": ["media/clip.npy"]}],
        [{"id": "sg1", "messages": [turn("system", "Be brief."), turn("user", [IMAGE, text("Who is this?")]),
                                    turn("assistant", "a cat")], "images": ["media/a.png"]},
         {"id": "sg2", "messages": [turn("system", "Be brief."), turn("user", [IMAGE, VIDEO, text("Same?")]),
                                    turn("assistant", "no")],
          "images": ["media/b.png"], "videos": ["media/clip.npy"]}]),
    "llava_single_image": (  # LLaVA's newline beside the tag is dropped; the tag may open or close the question
        [{"id": 7, "image": "media/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"},
            {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "red"}]},
         {"id": "llava2", "image": ["media/b.png"], "conversations": [
             {"from": "human", "value": "Describe it.\n<image>"}, {"from": "gpt", "value": "blue"}]}],
        [{"id": 7, "messages": [turn("user", [IMAGE, text("What is it?")]), turn("assistant", "a cat"),
                                turn("user", "Color?"), turn("assistant", "red")], "images": ["media/a.png"]},
         {"id": "llava2", "messages": [turn("user", [text("Describe it."), IMAGE]), turn("assistant", "blue")],
          "images": ["media/b.png"]}]),
    "llava_text_only": (
        [{"id": "t1", "conversations": [{"from": "human", "value": "Hello?"}, {"from": "gpt", "value": "Hi."}]}],
        [{"id": "t1", "messages": [turn("user", "Hello?"), turn("assistant", "Hi.")]}]),
    "ms_swift": (
        [{"id": "sw1", "messages": [turn("user", "<image>Who is <video> this?"), turn("assistant", "a cat")],
          "images": [{"path": "media/a.png"}], "videos": [{"path": "media/clip.npy"}]}],
        [{"id": "sw1", "messages": [turn("user", [IMAGE, text("Who is "), VIDEO, text(" this?")]),
                                    turn("assistant", "a cat")], "images": ["media/a.png"],
          "videos": ["media/clip.npy"]}]),
}


def inline(line: dict) -> dict:
    """A Qwen line with each media item carrying its own reference (no top-level lists)."""
    lists = {kind: list(line.get(kind + "s", [])) for kind in ("image", "video")}
    def own(item):
        return {**item, item["type"]: lists[item["type"]].pop(0)} if item["type"] in lists else item

    messages = [turn(m["role"], [own(i) for i in m["content"]] if isinstance(m["content"], list) else m["content"])
                for m in line["messages"]]
    return {k: v for k, v in line.items() if k not in ("images", "videos")} | {"messages": messages}


def write(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def png(h: int, w: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    (root / "media").mkdir()
    (root / "media" / "a.png").write_bytes(png(56, 56, 1))
    (root / "media" / "b.png").write_bytes(png(40, 84, 2))
    np.save(root / "media" / "clip.npy", np.random.default_rng(3).integers(0, 256, (4, 56, 56, 3), np.uint8))
    return root


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(model config, processor) of the demo config (compact tokenizer), video frames kept at 56×56 pixels."""
    model_config, processor = model_and_processor(get_config(), str(tmp_path_factory.mktemp("demo")))
    video = dataclasses.replace(processor.video_options, min_pixels=56 * 56, max_pixels=56 * 56)
    return model_config, Processor(processor.tokenizer, processor.image_options, video, processor.chat_template)


def data_config() -> ConfigDict:
    return ConfigDict(get_config().data.to_dict() | dict(batch_size=4, shuffle=False, num_epochs=1, workers=0))


def records(path) -> list[dict]:
    source = JsonlSource(path)
    return [source[i] for i in range(len(source))]


def test_tags_become_items_in_order():
    assert split_tags("<image>Who is <video> this?") == [IMAGE, text("Who is "), VIDEO, text(" this?")]
    assert split_tags("<image>\nWhat?") == split_tags("<image>What?") == [IMAGE, text("What?")]
    assert split_tags("Compare\n<image>\n<image>\n") == [text("Compare"), IMAGE, IMAGE]
    assert split_tags("a\n\n<image>") == [text("a\n"), IMAGE]  # one newline only
    assert split_tags("no tags\n") == "no tags\n"


@pytest.mark.parametrize("case", list(CASES))
def test_each_format_gives_the_qwen_records_and_training_examples(case, root, demo):
    foreign, qwen = CASES[case]
    got = records(write(root / f"{case}.jsonl", foreign))
    assert got == records(write(root / f"{case}.qwen.jsonl", qwen))
    assert all("error" not in r for r in got), got
    # end to end: the same ids, labels, positions and pixels as the Qwen file whose items name their own files
    _, processor = demo
    transform = ToExample(processor, max_length=128, max_vision_rows=4096)
    for a, b in zip(got, records(write(root / f"{case}.inline.jsonl", [inline(q) for q in qwen]))):
        ea, eb = transform.map(a), transform.map(b)
        assert "error" not in ea and ea.keys() == eb.keys(), ea.get("error")
        for key in ea:
            np.testing.assert_array_equal(ea[key], eb[key], err_msg=f"{case} {a['id']} {key}")
        assert (ea["labels"] != -100).any()


# (line, what the error must say besides file and line)
BAD = [
    ({"messages": [turn("user", "<image><image>Two?"), turn("assistant", "x")], "images": ["media/a.png"]},
     ["2 <image> tags but 1 entry in 'images'"]),
    ({"messages": [turn("user", "<image>One?"), turn("assistant", "x")], "images": ["media/a.png", "media/b.png"]},
     ["1 <image> tag but 2 entries in 'images'"]),
    ({"messages": [turn("user", "None?"), turn("assistant", "x")], "images": [{"path": "media/a.png"}]},
     ["0 <image> tags but 1 entry in 'images'"]),
    ({"messages": [turn("user", "<video><video>Two?"), turn("assistant", "x")], "videos": ["media/clip.npy"]},
     ["2 <video> tags but 1 entry in 'videos'"]),
    ({"image": "media/a.png", "conversations": [{"from": "human", "value": "No tag"}, {"from": "gpt", "value": "x"}]},
     ["0 <image> tags but 1 entry in 'image'"]),
    ({"messages": [turn("robot", "hi"), turn("assistant", "x")]}, ["'messages' item 0", "unknown role 'robot'"]),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, ["'conversations' item 0 'from'", "unknown role 'bot'"]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{}"},
                        {"from": "observation", "value": "{}"}]}, ["'conversations' item 1", "tool-calling"]),
    ({"conversations": {"from": "human", "value": "hi"}}, ["'conversations' must be a non-empty list"]),
    ({"conversations": [{"from": "human"}]}, ["'conversations' item 0 has no 'value'"]),
    ({"messages": [turn("user", "hi")], "conversations": [{"from": "human", "value": "hi"}]},
     ["'messages' and 'conversations'"]),
]


def test_malformed_lines_are_error_records_naming_file_line_and_key(root):
    path = write(root / "bad.jsonl", [bad for bad, _ in BAD])
    for n, (record, (_, says)) in enumerate(zip(records(path), BAD), start=1):
        assert set(record) == {"error", "id"} and record["id"] == f"bad.jsonl:{n}", record
        assert record["error"].startswith(f"{path} line {n}: "), record["error"]
        for words in says:
            assert words in record["error"], (words, record["error"])


def test_the_pipeline_skips_and_counts_them_and_the_rest_is_unchanged(root, demo):
    model_config, processor = demo
    good = [line for foreign, _ in CASES.values() for line in foreign]
    mixed = [x for pair in zip(good, [bad for bad, _ in BAD]) for x in pair] + [bad for bad, _ in BAD[len(good):]]
    clean = list(training_batches(JsonlSource(write(root / "clean.jsonl", good)), processor, model_config,
                                  data_config(), seed=0))
    dirty = list(training_batches(JsonlSource(write(root / "mixed.jsonl", mixed)), processor, model_config,
                                  data_config(), seed=0))
    assert sum(int(b["stats"]["skipped"]) for b in dirty) == len(BAD)
    assert sum(int(b["stats"]["skipped"]) for b in clean) == 0
    assert len(dirty) == len(clean) and sum(int(b["stats"]["examples"]) for b in clean) == len(good)
    for a, b in zip(clean, dirty):
        assert a["example_ids"] == b["example_ids"] and a.keys() == b.keys()
        for key in a.keys() - {"example_ids", "stats"}:
            assert_tree_equal(a[key], b[key])


def assert_tree_equal(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_tree_equal(a[k], b[k])
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

"""Grounding in each checkpoint family's convention (qwen2vl_jax.processing.grounding): the prompt, a box written as
answer text, answer text read back to original pixels; the RefCOCO tasks per family; box items in training records.
No model runs."""
import io

import numpy as np
import pytest
from PIL import Image

from evaluation import metrics
from evaluation.metrics.grounding import grounding_accuracy
from evaluation.tasks import get_task
from qwen2vl_jax import Qwen2VLConfig
from qwen2vl_jax.processing import smart_resize
from qwen2vl_jax.processing.grounding import box_text, grounding_prompt, read_box, read_json_box, resized_size

# An original 1000×300 image (width × height) that a processor with max_pixels 64·28² shrinks to 392×112: a box
# answered in resized pixels is far from the same numbers taken as original pixels or as a [0, 1000) grid.
IMAGE_HW, MAX_PIXELS = (300, 1000), 64 * 28 * 28
RESIZED_HW = (112, 392)
GT = (100.0, 60.0, 500.0, 240.0)  # original pixels
RIGHT = [39, 22, 196, 90]  # GT in resized pixels (× 0.392, × 0.3733), rounded


def scaled(box, sx, sy):
    return (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)


def test_resized_size_is_the_processors():
    assert smart_resize(*IMAGE_HW, max_pixels=MAX_PIXELS) == RESIZED_HW
    assert resized_size(IMAGE_HW, max_pixels=MAX_PIXELS) == RESIZED_HW
    assert resized_size(IMAGE_HW, [112, 392]) == RESIZED_HW  # a given size wins


def test_prompt_per_family():
    assert grounding_prompt("the left dog", "qwen2_vl") == "<|object_ref_start|>the left dog<|object_ref_end|>"
    assert grounding_prompt("the left dog", "qwen2_5_vl") == \
        "Locate the left dog, output its bbox coordinates using JSON format."
    with pytest.raises(ValueError, match="'llava'.*qwen2_vl, qwen2_5_vl"):
        grounding_prompt("x", "llava")


def test_box_text_per_family():
    assert box_text(GT, "qwen2_vl", IMAGE_HW) == "<|box_start|>(100,200),(500,800)<|box_end|>"
    assert box_text(GT, "qwen2_vl", IMAGE_HW, label="the cat") == \
        "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,200),(500,800)<|box_end|>"
    assert box_text((0, 0, 1000, 300), "qwen2_vl", IMAGE_HW) == "<|box_start|>(0,0),(999,999)<|box_end|>"  # clamped
    assert box_text(GT, "qwen2_5_vl", IMAGE_HW, RESIZED_HW, label="the cat") == \
        '```json\n[\n\t{"bbox_2d": [39, 22, 196, 90], "label": "the cat"}\n]\n```'
    assert box_text(GT, "qwen2_5_vl", IMAGE_HW, max_pixels=MAX_PIXELS) == \
        '```json\n[\n\t{"bbox_2d": [39, 22, 196, 90]}\n]\n```'
    with pytest.raises(ValueError, match="4 numbers"):
        box_text((1, 2, 3), "qwen2_vl", IMAGE_HW)


@pytest.mark.parametrize("text", [
    '```json\n[\n\t{"bbox_2d": [39, 22, 196, 90], "label": "the cat"}\n]\n```',
    'Sure: ```json\n{"bbox_2d": [39, 22, 196, 90]}\n``` done',
    '{"bbox_2d": [39, 22, 196, 90], "label": "the cat"}',
    'The cat is at [39, 22, 196, 90].',
    '[39.0, 22.0, 196.0, 90.0]',
    '[{"bbox_2d": [39, 22, 196, 90], "label": "cat"}, {"bbox_2d": [0, 0, 10, 10], "label": "dog"}]',
    '[{"label": "scene"}, {"bbox_2d": [39, 22, 196, 90]}]',
    '```json\n[\n\t{"bbox_2d": [39, 22, 196, 90], "label": "the c',  # cut by max_new_tokens
])
def test_qwen2_5_answers_that_hold_the_box(text):
    assert read_json_box(text) == (39.0, 22.0, 196.0, 90.0)
    assert grounding_accuracy(text, GT, "qwen2_5_vl", IMAGE_HW, RESIZED_HW) == 1.0


@pytest.mark.parametrize("text", [
    "", "I cannot find it.", '{"bbox_2d": [39, 22, 196]}', '{"bbox_2d": ["39", 22, 196, 90]}',
    '{"bbox_2d": [NaN, 22, 196, 90]}', '[{"bbox_2d": [1e999, 22, 196, 90]}]', '[true, 1, 2, 3]', "[1, 2, 3]",
    '[{"bbox_2d": "39,22,196,90"}, {"bbox_2d": [39, 22, 196, 90]}]',  # the first object's box is garbage
    '```json\n[{"bbox_2d": [0, 0, 10, 10]}, {"bbox_2d": [39, 22, 196, 90]}]\n```',  # the first object wins
])
def test_qwen2_5_answers_that_score_zero(text):
    assert grounding_accuracy(text, GT, "qwen2_5_vl", IMAGE_HW, RESIZED_HW) == 0.0


def test_qwen2_5_boxes_are_resized_pixels():
    text = '```json\n[\n\t{"bbox_2d": %s}\n]\n```' % RIGHT
    box = read_box(text, "qwen2_5_vl", IMAGE_HW, RESIZED_HW)
    assert metrics.box_iou(box, GT) > 0.95
    assert read_box(text, "qwen2_5_vl", IMAGE_HW, max_pixels=MAX_PIXELS) == box  # smart_resize when not given
    assert metrics.box_iou(tuple(map(float, RIGHT)), GT) < 0.5  # the numbers taken as original pixels
    assert metrics.box_iou(scaled(RIGHT, 1000 / 1000, 300 / 1000), GT) < 0.5  # ... or as a [0, 1000) grid
    assert grounding_accuracy(text, GT, "qwen2_5_vl", IMAGE_HW, IMAGE_HW) == 0.0  # no resize assumed
    wrong = '```json\n[{"bbox_2d": [100, 60, 500, 240]}]\n```'  # GT's original pixels, which the model never says
    assert grounding_accuracy(wrong, GT, "qwen2_5_vl", IMAGE_HW, RESIZED_HW) == 0.0


def test_round_trips_over_random_boxes_and_sizes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        width, height = (int(v) for v in rng.integers(30, 3000, size=2))
        max_pixels = int(rng.choice([64, 1280, 16384])) * 28 * 28
        resized = smart_resize(height, width, min_pixels=3136, max_pixels=max_pixels)
        xs, ys = np.sort(rng.uniform(0, width, 2)), np.sort(rng.uniform(0, height, 2))
        box = (xs[0], ys[0], xs[1], ys[1])
        back = read_box(box_text(box, "qwen2_5_vl", (height, width), resized), "qwen2_5_vl", (height, width), resized)
        tolerance = np.array([width / resized[1], height / resized[0]] * 2)  # one resized pixel, mapped back
        assert (np.abs(np.subtract(back, box)) <= tolerance + 1e-9).all(), (box, back, resized)
        grid = read_box(box_text(box, "qwen2_vl", (height, width)), "qwen2_vl", (height, width))
        assert (np.abs(np.subtract(grid, box)) <= 0.002 * np.array([width, height] * 2) + 1e-9).all(), (box, grid)


@pytest.mark.parametrize("name", ["refcoco", "refcoco+", "refcocog"])
def test_task_per_family(name):
    row = {"question_id": 7, "answer": ["the left dog"], "bbox": [100, 60, 400, 180], "width": 1000, "height": 300,
           "image": b"x"}
    plain = get_task(name)
    sample = plain.sample_from_row(row, 0)
    assert sample["box"] == list(GT) and (sample["width"], sample["height"]) == (1000.0, 300.0)
    qwen2, qwen25 = plain.for_model("qwen2_vl"), plain.for_model("qwen2_5_vl")
    assert qwen2 == plain and qwen2.text(sample) == "<|object_ref_start|>the left dog<|object_ref_end|>"
    assert qwen25.text(sample) == "Locate the left dog, output its bbox coordinates using JSON format."
    assert qwen25.messages(sample)[0]["content"][-1]["text"] == qwen25.text(sample)
    assert (qwen25.family, qwen25.max_new_tokens, qwen25.name) == ("qwen2_5_vl", 64, name)

    # Qwen2-VL: exactly metrics.refcoco_accuracy, official and lenient
    for text in ("<|box_start|>(100,200),(500,800)<|box_end|>", "(100, 200), (500, 800)", '{"bbox_2d": [1, 2, 3, 4]}'):
        for lenient in (False, True):
            assert qwen2.score(text, sample, lenient=lenient) == \
                metrics.refcoco_accuracy(text, GT, 1000, 300, lenient=lenient)

    answer = '```json\n[\n\t{"bbox_2d": %s, "label": "the left dog"}\n]\n```' % RIGHT
    with pytest.raises(ValueError, match="resized_sizes"):
        qwen25.score(answer, sample)
    sample["resized_sizes"] = [list(RESIZED_HW)]  # as evaluation.runner.prepare writes it
    assert qwen25.score(answer, sample) == 1.0
    assert qwen25.score("<|box_start|>(100,200),(500,800)<|box_end|>", sample) == 0.0  # the other family's answer
    assert qwen25.score("no idea", sample) == 0.0

    with pytest.raises(ValueError, match="'qwen3_vl'.*qwen2_vl, qwen2_5_vl"):
        plain.for_model("qwen3_vl")


def test_config_names_its_family():
    assert Qwen2VLConfig.preset("tiny").model_type == "qwen2_vl"
    assert Qwen2VLConfig.preset("2.5-3b").model_type == "qwen2_5_vl"


def test_training_box_items_are_written_per_family(tmp_path):
    from data_pipeline.transforms import ToExample
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.processing.fixtures import write_tiny_processor

    processor = Processor.from_pretrained(write_tiny_processor(tmp_path, max_pixels=16 * 28 * 28))
    buffer = io.BytesIO()
    Image.new("RGB", (400, 120), (200, 30, 30)).save(buffer, format="PNG")  # resized to 196 × 56
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cat?"}]}

    def record(answer_item):
        return {"messages": [user, {"role": "assistant", "content": [answer_item]}], "images": [buffer.getvalue()],
                "id": "g"}

    box = record({"type": "box", "box": [40, 12, 200, 96], "label": "the cat"})
    expected = {
        "qwen2_vl": "<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,100),(500,800)<|box_end|>",
        "qwen2_5_vl": '```json\n[\n\t{"bbox_2d": [20, 6, 98, 45], "label": "the cat"}\n]\n```',
    }
    for model_type, text in expected.items():
        to_example = ToExample(processor, max_length=512, max_vision_rows=4096, model_type=model_type)
        got, want = to_example.map(box), to_example.map(record({"type": "text", "text": text}))
        assert "error" not in got, got
        np.testing.assert_array_equal(got["input_ids"], want["input_ids"])
        np.testing.assert_array_equal(got["labels"], want["labels"])
    no_image = {"messages": [{"role": "user", "content": "Where is the cat?"}, box["messages"][1]], "images": [],
                "id": "n"}
    assert "no image" in ToExample(processor, max_length=512, max_vision_rows=4096).map(no_image)["error"]

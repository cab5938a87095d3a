"""Processor end to end: config reading, batching/padding, and parity with transformers' Qwen2VLProcessor."""

import json

import numpy as np
import pytest
from PIL import Image
from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen2VLProcessor

from qwen2vl_jax.processing import Processor, preprocess_image, preprocess_video
from qwen2vl_jax.processing.fixtures import QWEN2VL_CHAT_TEMPLATE, write_tiny_processor

MAX = 200 * 28 * 28


def noise(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_processor(tmp_path_factory.mktemp("ckpt"), min_pixels=3136, max_pixels=MAX)


@pytest.fixture(scope="module")
def processor(folder):
    return Processor.from_pretrained(folder)


class _ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """transformers' processor without its video half (which needs torchvision, not installed here)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@pytest.fixture(scope="module")
def hf_processor(folder):
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=f"{folder}/tokenizer.json", pad_token="<|endoftext|>", padding_side="left"
    )
    image_processor = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=MAX)
    return _ImageOnlyQwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=QWEN2VL_CHAT_TEMPLATE
    )


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]},
    ],
    [{"role": "user", "content": "How many people are there?"}],
]


def test_batch_matches_transformers(processor, hf_processor):
    images = [noise(100, 200, 0), noise(300, 50, 1), noise(640, 480, 2)]
    texts = [hf_processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    expected = hf_processor(text=texts, images=images, padding=True, return_tensors="np")
    out = processor(CONVERSATIONS, images=images)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"}
    assert out["input_ids"].dtype == np.int32 and out["attention_mask"].dtype == np.int32
    assert out["pixel_values"].dtype == np.float32 and out["image_grid_thw"].dtype == np.int64
    np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(out["attention_mask"], expected["attention_mask"])
    np.testing.assert_array_equal(out["image_grid_thw"], expected["image_grid_thw"])
    np.testing.assert_allclose(out["pixel_values"], expected["pixel_values"], rtol=0, atol=1e-5)
    # the texts path gives the same batch
    from_texts = processor(texts, images=images)
    for key in out:
        np.testing.assert_array_equal(from_texts[key], out[key])


def test_padding_and_placeholder_counts(processor):
    image = noise(224, 224, 3)
    out = processor([CONVERSATIONS[2], CONVERSATIONS[0]], images=[image])
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    n_text = mask[0].sum()
    assert (ids[0, : ids.shape[1] - n_text] == 151643).all() and (mask[0, : ids.shape[1] - n_text] == 0).all()
    assert mask[1].all()  # the longest row has no padding
    assert (ids == 151655).sum() == out["image_grid_thw"].prod() // 4 == 64
    right = processor([CONVERSATIONS[2], CONVERSATIONS[0]], images=[image], padding_side="right")
    assert (right["attention_mask"][0, :n_text] == 1).all() and (right["input_ids"][0, n_text:] == 151643).all()
    np.testing.assert_array_equal(right["input_ids"][0, :n_text], ids[0, -n_text:])
    with pytest.raises(ValueError, match="padding_side"):
        processor(CONVERSATIONS[2], padding_side="middle")


def test_text_only_and_images_from_messages(processor):
    out = processor("<|im_start|>user\nhi<|im_end|>\n")
    assert set(out) == {"input_ids", "attention_mask"} and out["input_ids"].shape[0] == 1
    image = noise(90, 120, 4)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]
    from_messages = processor(messages)
    explicit = processor(messages, images=image)
    for key in explicit:
        np.testing.assert_array_equal(from_messages[key], explicit[key])
    expected_values, expected_grid = preprocess_image(image, max_pixels=MAX)
    np.testing.assert_array_equal(from_messages["pixel_values"], expected_values)
    np.testing.assert_array_equal(from_messages["image_grid_thw"], expected_grid[None])


def test_video_end_to_end(processor):
    video = np.random.default_rng(5).integers(0, 256, (4, 112, 140, 3), dtype=np.uint8)
    image = noise(56, 56, 6)
    messages = [
        {
            "role": "user",
            "content": [{"type": "video", "video": video}, {"type": "image", "image": image}, {"type": "text", "text": "?"}],
        }
    ]
    out = processor(messages)
    assert set(out) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                        "video_grid_thw", "second_per_grid_ts"}
    # already-sampled frames count as 2 fps (qwen-vl-utils' default): 2 frames per grid step = 1 s (Qwen2.5-VL time)
    np.testing.assert_array_equal(out["second_per_grid_ts"], np.array([1.0], np.float32))
    values, grid = preprocess_video(video)  # qwen-vl-utils bounds: scaled up to 128·28² per frame
    np.testing.assert_array_equal(out["pixel_values_videos"], values)
    np.testing.assert_array_equal(out["video_grid_thw"], grid[None])
    ids = out["input_ids"][0]
    assert (ids == 151656).sum() == grid.prod() // 4
    assert (ids == 151655).sum() == out["image_grid_thw"].prod() // 4
    assert np.flatnonzero(ids == 151656)[0] < np.flatnonzero(ids == 151655)[0]  # video placeholder comes first


def test_count_mismatch_is_an_error(processor):
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image"):
        processor(CONVERSATIONS[1], images=[noise(56, 56, 7)])
    with pytest.raises(ValueError, match=r"1 <\|image_pad\|> placeholder\(s\) but 2 image"):
        processor(CONVERSATIONS[0], images=[noise(56, 56, 7), noise(56, 56, 8)])
    with pytest.raises(TypeError, match="conversation"):
        processor(42)


@pytest.mark.parametrize("layout", ["flat", "size"])
def test_from_pretrained_reads_both_config_layouts(tmp_path, layout):
    processor = Processor.from_pretrained(write_tiny_processor(tmp_path, 4 * 28 * 28, 64 * 28 * 28, layout=layout))
    options = processor.image_options
    assert (options.min_pixels, options.max_pixels) == (4 * 28 * 28, 64 * 28 * 28)
    assert (options.patch_size, options.temporal_patch_size, options.merge_size) == (14, 2, 2)
    assert options.image_mean == (0.48145466, 0.4578275, 0.40821073)
    # videos keep the qwen-vl-utils bounds unless video_preprocessor_config.json says otherwise
    assert (processor.video_options.min_pixels, processor.video_options.max_pixels) == (128 * 784, 768 * 784)
    assert processor.video_options.total_pixels == 115200 * 784  # qwen-vl-utils 0.0.14's 0.9·128000·28²
    _, grid = preprocess_image(noise(1000, 1000, 9), options.min_pixels, options.max_pixels)
    assert processor(CONVERSATIONS[0], images=[noise(1000, 1000, 9)])["image_grid_thw"].tolist() == [grid.tolist()]


def test_from_pretrained_precedence_and_video_config(tmp_path):
    write_tiny_processor(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    config["size"] = {"shortest_edge": 1000, "longest_edge": 2000}  # min_pixels/max_pixels keys win
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 5, "longest_edge": 6}}))
    processor = Processor.from_pretrained(tmp_path)
    assert (processor.image_options.min_pixels, processor.image_options.max_pixels) == (3136, 12845056)
    assert (processor.video_options.min_pixels, processor.video_options.max_pixels) == (5, 6)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Processor.from_pretrained(tmp_path)


def test_decode(processor):
    out = processor(CONVERSATIONS[2])
    assert processor.decode(out["input_ids"][0]) == "system\nYou are a helpful assistant.\nuser\nHow many people are there?\nassistant\n"
    assert processor.batch_decode(out["input_ids"], skip_special_tokens=False)[0].startswith("<|im_start|>system")


def test_processing_imports_without_jax_or_torch():
    """The package is host-side only: it must import and run with jax, flax, torch and transformers absent."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys, types\n"
        "for m in ('jax', 'jaxlib', 'flax', 'torch', 'transformers'): sys.modules[m] = None\n"
        "pkg = types.ModuleType('qwen2vl_jax'); pkg.__path__ = ['qwen2vl_jax']; sys.modules['qwen2vl_jax'] = pkg\n"
        "import numpy as np, qwen2vl_jax.processing as P\n"
        "assert P.preprocess_image(np.zeros((30, 30, 3), np.uint8))[1].tolist() == [1, 4, 4]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

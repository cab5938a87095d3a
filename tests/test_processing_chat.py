"""Chat template (vs hand-written strings and vs the released Jinja template run by transformers) and
placeholder expansion."""

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from qwen2vl_jax.processing import apply_chat_template, expand_vision_placeholders
from qwen2vl_jax.processing.fixtures import QWEN2VL_CHAT_TEMPLATE, write_tiny_tokenizer

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def user(*content):
    return {"role": "user", "content": list(content)}


CONVERSATIONS = [
    [user({"type": "image"}, {"type": "text", "text": "question"})],
    [{"role": "user", "content": "plain string content"}],
    [{"role": "system", "content": "Be brief."}, user({"type": "text", "text": "Hi"}, {"type": "image"})],
    [
        user({"type": "image", "image": "a.png"}, {"type": "text", "text": "What is it?"}),
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        user({"type": "video", "video": ["f0", "f1"]}, {"image_url": "x"}, {"type": "text", "text": "And now?"}),
    ],
    [{"role": "system", "content": [{"type": "text", "text": "sys as list"}]}, {"role": "user", "content": "ok"}],
    [{"role": "assistant", "content": "first is assistant"}],
]


def test_reference_strings():
    assert apply_chat_template(CONVERSATIONS[0]) == (
        SYSTEM + f"<|im_start|>user\n{IMAGE}question<|im_end|>\n<|im_start|>assistant\n"
    )
    assert apply_chat_template(CONVERSATIONS[1], add_generation_prompt=False) == (
        SYSTEM + "<|im_start|>user\nplain string content<|im_end|>\n"
    )
    assert apply_chat_template(CONVERSATIONS[2]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        f"<|im_start|>user\nHi{IMAGE}<|im_end|>\n<|im_start|>assistant\n"
    )
    assert apply_chat_template(CONVERSATIONS[3], add_vision_id=True) == (
        SYSTEM
        + f"<|im_start|>user\nPicture 1: {IMAGE}What is it?<|im_end|>\n"
        + "<|im_start|>assistant\nA cat.<|im_end|>\n"
        + f"<|im_start|>user\nVideo 1: {VIDEO}Picture 2: {IMAGE}And now?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    path = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    return PreTrainedTokenizerFast(tokenizer_file=path, chat_template=QWEN2VL_CHAT_TEMPLATE)


@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_matches_released_jinja_template(hf_tokenizer, index, add_generation_prompt, add_vision_id):
    messages = CONVERSATIONS[index]
    expected = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id
    )
    assert apply_chat_template(messages, add_generation_prompt, add_vision_id=add_vision_id) == expected


def test_bad_messages():
    with pytest.raises(ValueError, match="at least one"):
        apply_chat_template([])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        apply_chat_template([{"text": "hi"}])


# ---------------------------------------------------------------- placeholder expansion


def test_expansion_counts_and_order():
    texts = [f"a{IMAGE}b{VIDEO}c", f"{IMAGE}{IMAGE}d"]
    image_grid = np.array([[1, 16, 16], [1, 2, 4], [1, 4, 6]])  # 64, 2, 6 tokens
    video_grid = np.array([[2, 4, 6]])  # 12 tokens
    out = expand_vision_placeholders(texts, image_grid, video_grid)
    pad, vpad = "<|image_pad|>", "<|video_pad|>"
    assert out[0] == f"a<|vision_start|>{pad * 64}<|vision_end|>b<|vision_start|>{vpad * 12}<|vision_end|>c"
    assert out[1] == f"<|vision_start|>{pad * 2}<|vision_end|><|vision_start|>{pad * 6}<|vision_end|>d"
    assert expand_vision_placeholders([f"{IMAGE}"], np.array([[1, 4, 6]]), merge_size=1) == [
        f"<|vision_start|>{pad * 24}<|vision_end|>"
    ]
    assert expand_vision_placeholders(["no vision"]) == ["no vision"]


def test_expansion_count_mismatch_is_an_error():
    grid = np.array([[1, 4, 4]])
    with pytest.raises(ValueError, match=r"2 <\|image_pad\|> placeholder\(s\) but 1 image"):
        expand_vision_placeholders([IMAGE, IMAGE], grid)
    with pytest.raises(ValueError, match=r"0 <\|image_pad\|> placeholder\(s\) but 1 image"):
        expand_vision_placeholders(["text only"], grid)
    with pytest.raises(ValueError, match=r"1 <\|video_pad\|> placeholder\(s\) but 0 video"):
        expand_vision_placeholders([VIDEO])
    with pytest.raises(ValueError, match="video"):
        expand_vision_placeholders([VIDEO], video_grid_thw=np.array([[1, 4, 4], [1, 4, 4]]))

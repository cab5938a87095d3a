"""The tokenizer.json wrapper, on a tiny tokenizer with the Qwen2-VL special tokens at their real ids."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from qwen2vl_jax.processing import SPECIAL_TOKENS, Qwen2VLTokenizer
from qwen2vl_jax.processing.fixtures import write_tiny_tokenizer


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(path):
    return Qwen2VLTokenizer.from_file(path)


def test_special_token_ids_are_the_real_ones(tok):
    assert list(SPECIAL_TOKENS.values()) == list(range(151643, 151657))
    for token, token_id in SPECIAL_TOKENS.items():
        assert tok.encode(token) == [token_id], token
        assert tok.token_to_id(token) == token_id
        assert tok.decode([token_id]) == token
    assert tok.pad_token_id == 151643
    assert tok.eos_token_ids == (151645, 151643)
    assert (tok.image_token_id, tok.video_token_id) == (151655, 151656)
    assert len(tok) == 151657  # highest id + 1, though the tiny vocabulary is sparse


def test_encode_decode_round_trip(tok):
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>What is in the picture? ünï 42<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == 151644 and ids[-2:] == [151645, tok.encode("\n")[0]]
    assert ids.count(151655) == 2  # each pad is one id, never merged with neighbours
    assert max(i for i in ids if i < 151643) < 1000  # everything else comes from the small BPE vocab
    assert tok.decode(ids) == text
    assert tok.decode(np.array(ids)) == text
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat is in the picture? ünï 42\n"
    assert tok.decode_batch([ids, ids[:1]]) == [text, "<|im_start|>"]


def test_no_bos_or_eos_added(tok):
    ids = tok.encode("hello")
    assert all(i < 151643 for i in ids)
    assert tok.encode_batch(["hello", ""]) == [ids, []]


def test_same_ids_as_transformers(tok, path):
    hf = PreTrainedTokenizerFast(tokenizer_file=path)
    for text in ["Describe this image.", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", "a  b\n\n c's"]:
        assert tok.encode(text) == hf(text, add_special_tokens=False).input_ids


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Qwen2VLTokenizer.from_file(tmp_path)
    plain = Tokenizer.from_str(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}))
    with pytest.raises(ValueError, match="Qwen2-VL special tokens"):
        Qwen2VLTokenizer(plain)
    write_tiny_tokenizer(tmp_path)
    assert Qwen2VLTokenizer.from_file(tmp_path).pad_token_id == 151643  # a folder works too
    with pytest.raises(KeyError, match="not in the vocabulary"):
        Qwen2VLTokenizer.from_file(tmp_path).token_to_id("<|nope|>")

"""Tiny stand-ins for a checkpoint's tokenizer.json / preprocessor_config.json, for tests and demos.

The tokenizer has the layout of the real Qwen2 one (NFC normalizer, the Qwen2 split regex, byte-level
BPE, byte-level decoder) with a vocabulary trained here on a few sentences (~400 entries), and the 14
Qwen2-VL special tokens at their real ids 151643..151656: they sit in a sparse model vocabulary and are
registered as special added tokens, so each encodes to its single real id.
"""

from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from qwen2vl_jax.processing.chat import QWEN2VL_CHAT_TEMPLATE
from qwen2vl_jax.processing.tokenizer import SPECIAL_TOKENS

# The Qwen2 pre-tokenization regex (tokenizer.json of the released checkpoints).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = [
    "You are a helpful assistant.",
    "Describe this image. What is in the picture? Describe the video.",
    "The quick brown fox jumps over the lazy dog. A cat sits on the mat.",
    "How many people are there? Read the text in the image. What color is the car?",
    "Answer the question using a single word or phrase. 0123456789 (x1,y1),(x2,y2)",
]


def build_tiny_tokenizer(vocab_size: int = 400, corpus: list[str] | None = None, compact: bool = False) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `corpus` (default: a few sentences) with the Qwen2-VL special tokens
    at their real ids, or, with `compact`, right after the learned vocabulary (a small model needs no 151k-row
    embedding table; its config then takes the token ids from the tokenizer)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator((corpus or _CORPUS) * 4, trainer)
    spec = json.loads(tok.to_str())
    first = len(spec["model"]["vocab"])
    specials = {t: first + i for i, t in enumerate(SPECIAL_TOKENS)} if compact else SPECIAL_TOKENS
    spec["model"]["vocab"].update(specials)  # sparse ids: 0..~400, then 151643..151656
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for t, i in specials.items()
    ]
    return Tokenizer.from_str(json.dumps(spec))


def write_tiny_tokenizer(directory: str | os.PathLike) -> str:
    """Write tokenizer.json into `directory` (created if needed); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), "tokenizer.json")
    build_tiny_tokenizer().save(path)
    return path


def write_tiny_processor(
    directory: str | os.PathLike,
    min_pixels: int = 3136,
    max_pixels: int = 12845056,
    layout: str = "flat",
) -> str:
    """Write tokenizer.json, chat_template.json and preprocessor_config.json ("flat" = the released
    checkpoints' min_pixels/max_pixels keys, "size" = the newer {"shortest_edge", "longest_edge"} dict)."""
    write_tiny_tokenizer(directory)
    with open(os.path.join(os.fspath(directory), "chat_template.json"), "w") as f:
        json.dump({"chat_template": QWEN2VL_CHAT_TEMPLATE}, f)
    config = {
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
    }
    if layout == "flat":
        config.update(min_pixels=min_pixels, max_pixels=max_pixels)
    elif layout == "size":
        config["size"] = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    else:
        raise ValueError(f"layout must be 'flat' or 'size', got {layout!r}")
    with open(os.path.join(os.fspath(directory), "preprocessor_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return os.fspath(directory)

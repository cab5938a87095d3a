"""A checkpoint's tokenizer.json (Hugging Face `tokenizers`), with the Qwen2-VL special tokens checked.

Qwen2 adds no BOS/EOS when encoding; special tokens written in the text (`<|im_start|>`, `<|image_pad|>`,
...) each encode to their single id.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer

# REFERENCE.md "Token ids".
SPECIAL_TOKENS: dict[str, int] = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
PAD_TOKEN = "<|endoftext|>"
EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


class Qwen2VLTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer`: encode/decode plus the ids the model needs."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(
                f"the tokenizer lacks the Qwen2-VL special tokens {missing}; is this a Qwen2-VL tokenizer.json?"
            )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Qwen2VLTokenizer:
        """Load a tokenizer.json (or the one inside a checkpoint folder)."""
        from etils import epath  # local or gs://

        path = epath.Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {os.fspath(path)!r} (a checkpoint folder needs "
                                    "tokenizer.json)")
        return cls(Tokenizer.from_str(path.read_text()))

    def token_to_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return token_id

    @property
    def pad_token_id(self) -> int:
        return self.token_to_id(PAD_TOKEN)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.token_to_id(t) for t in EOS_TOKENS)

    @property
    def image_token_id(self) -> int:
        return self.token_to_id(IMAGE_TOKEN)

    @property
    def video_token_id(self) -> int:
        return self.token_to_id(VIDEO_TOKEN)

    def encode(self, text: str) -> list[int]:
        """text → token ids (no BOS/EOS added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """text → (token ids, [(start, end)] character offsets of each token in `text`), no BOS/EOS added.

        Several tokens of one character (byte-level pieces of e.g. an emoji) share that character's offsets."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(o) for o in encoding.offsets]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """ids int[L] → text."""
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids: Sequence[Sequence[int]] | np.ndarray, skip_special_tokens: bool = False) -> list[str]:
        """ids int[B, L] → B texts."""
        return [self.decode(row, skip_special_tokens) for row in ids]

    def __len__(self) -> int:
        """Highest id + 1 (151657 for Qwen2-VL; the model's embedding table is padded beyond it)."""
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1

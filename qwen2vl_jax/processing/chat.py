"""The Qwen2-VL ChatML template and the expansion of vision placeholders.

Rendering follows the released checkpoints' chat_template.json:

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n        (when the first message is not a system one)
    <|im_start|>{role}\n{content}<|im_end|>\n                             (per message)
    <|im_start|>assistant\n                                              (add_generation_prompt)

An image item becomes `<|vision_start|><|image_pad|><|vision_end|>`, a video item
`<|vision_start|><|video_pad|><|vision_end|>`; then each pad is expanded to grid.prod() / merge_size²
copies, images and videos each consumed in order of appearance (across a whole batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qwen2vl_jax.processing.tokenizer import IMAGE_TOKEN, VIDEO_TOKEN

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"

Message = Mapping[str, Any]  # {"role": str, "content": str | [{"type": "image"|"video"|"text", ...}]}


def is_image_item(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "image" or "image" in item or "image_url" in item


def is_video_item(item: Mapping[str, Any]) -> bool:
    return item.get("type") == "video" or "video" in item


def _render_content(content: Any, counts: dict[str, int], add_vision_id: bool) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, Sequence):
        raise TypeError(f"message content must be a string or a list of items, got {type(content).__name__}")
    parts = []
    for item in content:
        if is_image_item(item):
            counts["image"] += 1
            parts.append((f"Picture {counts['image']}: " if add_vision_id else "") + IMAGE_PLACEHOLDER)
        elif is_video_item(item):
            counts["video"] += 1
            parts.append((f"Video {counts['video']}: " if add_vision_id else "") + VIDEO_PLACEHOLDER)
        elif "text" in item:
            parts.append(str(item["text"]))
    return "".join(parts)


def apply_chat_template(
    messages: Sequence[Message],
    add_generation_prompt: bool = True,
    *,
    add_vision_id: bool = False,
    default_system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> str:
    """One conversation → the prompt string (with one `<|image_pad|>` / `<|video_pad|>` per item)."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    counts = {"image": 0, "video": 0}
    out = []
    for i, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must have 'role' and 'content' keys, got keys {sorted(message)}")
        if i == 0 and message["role"] != "system":
            out.append(f"<|im_start|>system\n{default_system_prompt}<|im_end|>\n")
        body = _render_content(message["content"], counts, add_vision_id)
        out.append(f"<|im_start|>{message['role']}\n{body}<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def _tokens_per_item(grid_thw: np.ndarray | None, merge_size: int) -> list[int]:
    if grid_thw is None:
        return []
    grid = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    return [int(n) for n in grid.prod(axis=-1) // merge_size**2]


def _expand(texts: Sequence[str], token: str, counts: list[int], kind: str) -> list[str]:
    found = sum(t.count(token) for t in texts)
    if found != len(counts):
        raise ValueError(
            f"the text has {found} {token} placeholder(s) but {len(counts)} {kind}(s) were given; "
            f"each {kind} needs exactly one <|vision_start|>{token}<|vision_end|> in the text, in order "
            f"(the chat template writes one per {{'type': '{kind}'}} item)"
        )
    it = iter(counts)
    out = []
    for text in texts:
        pieces = text.split(token)
        expanded = [pieces[0]]
        for piece in pieces[1:]:
            expanded.append(token * next(it))
            expanded.append(piece)
        out.append("".join(expanded))
    return out


def expand_vision_placeholders(
    texts: Sequence[str],
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    merge_size: int = 2,
    video_merge_size: int | None = None,
) -> list[str]:
    """Repeat the n-th `<|image_pad|>` (across all texts, in order) image_grid_thw[n].prod() / merge² times,
    and `<|video_pad|>` likewise with video_grid_thw. int64[n, 3] grids; ValueError on a count mismatch."""
    video_merge_size = merge_size if video_merge_size is None else video_merge_size
    texts = _expand(texts, IMAGE_TOKEN, _tokens_per_item(image_grid_thw, merge_size), "image")
    return _expand(texts, VIDEO_TOKEN, _tokens_per_item(video_grid_thw, video_merge_size), "video")

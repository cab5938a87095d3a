"""Processor: conversations/texts + images + videos → the HF-named numpy batch the model takes.

    processor(messages | [messages, ...] | text | [text, ...], images=[...], videos=[...]) → {
        input_ids            int32[B, L]     (left padded with <|endoftext|> = 151643 by default)
        attention_mask       int32[B, L]
        pixel_values         float32[N, 1176], image_grid_thw int64[n_images, 3]   (only with images)
        pixel_values_videos  float32[M, 1176], video_grid_thw int64[n_videos, 3]   (only with videos)
    }
Images and videos are taken in order of appearance across the whole batch, as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qwen2vl_jax.processing.chat import ChatTemplate, expand_vision_placeholders, is_image_item, is_video_item
from qwen2vl_jax.processing.image import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, preprocess_image
from qwen2vl_jax.processing.patches import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RESCALE_FACTOR
from qwen2vl_jax.processing.tokenizer import Qwen2VLTokenizer
from qwen2vl_jax.processing.video import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_PIXEL_KEYS,
    VIDEO_TOTAL_PIXELS,
    fetch_video,
    preprocess_video,
)


@dataclasses.dataclass(frozen=True)
class VisionOptions:
    """Resize/normalize/patch settings of preprocessor_config.json (total_pixels: videos only)."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = RESCALE_FACTOR
    total_pixels: int | None = None

    def kwargs(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.total_pixels is None:
            del out["total_pixels"]
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any], defaults: VisionOptions) -> VisionOptions:
        """Read a (video_)preprocessor_config.json dict; "min_pixels"/"max_pixels" win over "size"."""
        updates: dict[str, Any] = {}
        size = config.get("size") or {}
        for key, field in (("shortest_edge", "min_pixels"), ("longest_edge", "max_pixels")):
            value = size.get(key, size.get(field))
            if value is not None:
                updates[field] = int(value)
        for field in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            if config.get(field) is not None:
                updates[field] = int(config[field])
        for field in ("image_mean", "image_std"):
            if config.get(field) is not None:
                updates[field] = tuple(float(v) for v in config[field])
        if config.get("rescale_factor") is not None:
            updates["rescale_factor"] = float(config["rescale_factor"])
        return dataclasses.replace(defaults, **updates)


DEFAULT_VIDEO_OPTIONS = VisionOptions(
    min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, total_pixels=VIDEO_TOTAL_PIXELS
)


def _as_batch(inputs: Any) -> tuple[list[Any], bool]:
    """→ (list of items, items_are_conversations)."""
    if isinstance(inputs, str):
        return [inputs], False
    if isinstance(inputs, Sequence) and inputs:
        if all(isinstance(x, str) for x in inputs):
            return list(inputs), False
        if all(isinstance(x, Mapping) for x in inputs):
            return [list(inputs)], True
        if all(isinstance(x, Sequence) and not isinstance(x, str) for x in inputs):
            return [list(x) for x in inputs], True
    raise TypeError(
        "expected a text, a list of texts, a conversation (list of {'role', 'content'} dicts) or a list of "
        f"conversations; got {type(inputs).__name__}"
    )


def _media_in_conversations(conversations: list[list[Mapping[str, Any]]], kind: str) -> list[Any]:
    """The `item["image"]` sources of image items / the whole video items (their options travel with them), in
    order; items without a source are skipped."""
    test = is_image_item if kind == "image" else is_video_item
    found = []
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if isinstance(content, str) or content is None:
                continue
            items = [item for item in content if test(item) and item.get(kind) is not None]
            found += items if kind == "video" else [item[kind] for item in items]
    return found


class Processor:
    """Tokenizer + image/video options + chat template; call it to build a model batch.

    chat_template: a ChatTemplate, a Jinja source string, or None for the built-in Qwen2-VL template."""

    def __init__(
        self,
        tokenizer: Qwen2VLTokenizer,
        image_options: VisionOptions | None = None,
        video_options: VisionOptions | None = None,
        chat_template: ChatTemplate | str | None = None,
    ):
        self.tokenizer = tokenizer
        self.image_options = image_options or VisionOptions()
        self.video_options = video_options or DEFAULT_VIDEO_OPTIONS
        if chat_template is None:
            chat_template = ChatTemplate()
        elif isinstance(chat_template, str):
            chat_template = ChatTemplate(chat_template, "the chat_template string passed to Processor")
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Processor:
        """Folder with tokenizer.json and preprocessor_config.json (video_preprocessor_config.json optional);
        the chat template is the folder's own (see ChatTemplate.from_pretrained; built-in Qwen2-VL without one).

        Without video_preprocessor_config.json, videos take the patch/normalize settings of
        preprocessor_config.json and the qwen-vl-utils 0.0.14 pixel bounds (128·28² .. 768·28² per frame,
        VIDEO_TOTAL_PIXELS = 0.9·128000·28² per video).
        """
        from etils import epath  # local or gs://

        path = epath.Path(path)
        tokenizer = Qwen2VLTokenizer.from_file(path / "tokenizer.json")
        config_path = path / "preprocessor_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{os.fspath(config_path)!r} not found: a Qwen2-VL checkpoint folder ships one")
        config = json.loads(config_path.read_text())
        image_options = VisionOptions.from_config(config, VisionOptions())
        shared = {k: v for k, v in config.items() if k not in ("size", "min_pixels", "max_pixels")}
        video_options = VisionOptions.from_config(shared, DEFAULT_VIDEO_OPTIONS)
        video_path = path / "video_preprocessor_config.json"
        if video_path.is_file():
            video_options = VisionOptions.from_config(json.loads(video_path.read_text()), video_options)
        return cls(tokenizer, image_options, video_options, ChatTemplate.from_pretrained(path))

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """One conversation → the prompt string, by this processor's chat template (kwargs: template variables)."""
        return self.chat_template.render(messages, add_generation_prompt, **kwargs)

    def preprocess_images(self, images: Sequence[Any]) -> dict[str, np.ndarray]:
        """Images → {"pixel_values": float32[N, 1176], "image_grid_thw": int64[n, 3]}."""
        rows, grids = zip(*(preprocess_image(image, **self.image_options.kwargs()) for image in images))
        return {"pixel_values": np.concatenate(rows), "image_grid_thw": np.stack(grids)}

    def preprocess_videos(self, videos: Sequence[Any]) -> dict[str, np.ndarray]:
        """Videos (see preprocess_video) → {"pixel_values_videos": float32[M, 1176], "video_grid_thw": int64[n, 3],
        "second_per_grid_ts": float32[n]} (Qwen2.5-VL's time per frame-pair; Qwen2-VL models ignore it)."""
        rows, grids, seconds = zip(*(self.preprocess_video(video) for video in videos))
        return {"pixel_values_videos": np.concatenate(rows), "video_grid_thw": np.stack(grids),
                "second_per_grid_ts": np.array(seconds, np.float32)}

    def preprocess_video(self, video: Any) -> tuple[np.ndarray, np.ndarray, float]:
        """One video → (float32[M, 1176], grid_thw int64[3], seconds per frame-pair): fetch_video (a file path, a
        qwen-vl-utils item dict, a frame folder / .npy, an array or a list of frames), then the item's min_pixels /
        max_pixels / total_pixels over video_options. Seconds per frame-pair = temporal_patch_size / the sampled fps
        (already-sampled frames: the item's "fps", default 2), as transformers' Qwen2.5-VL processor gives it."""
        frames, metadata = fetch_video(video)
        options = self.video_options.kwargs()
        if isinstance(video, Mapping):
            options.update({k: video[k] for k in VIDEO_PIXEL_KEYS if video.get(k) is not None})
        values, grid = preprocess_video(frames, **options)
        return values, grid, self.video_options.temporal_patch_size / metadata.sample_fps

    def __call__(
        self,
        inputs: Any,
        images: Sequence[Any] | Any | None = None,
        videos: Sequence[Any] | None = None,
        *,
        padding_side: str = "left",
        add_generation_prompt: bool = True,
    ) -> dict[str, np.ndarray]:
        """Build a batch. `inputs`: a text, texts, a conversation or conversations (templated here).

        images: one image or a list (anything load_image takes); videos: a list of videos, each a video file
        path (decoded and sampled as qwen-vl-utils does), a qwen-vl-utils item dict ({"video": path, "fps": 1,
        "max_pixels": ...}), a frame folder or .npy, uint8[T, H, W, 3] or a list of frames (already sampled).
        When conversations are given and images/videos are None, the image items' "image" values and the
        whole video items (with their fps / nframes / pixel options) are used.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        items, are_conversations = _as_batch(inputs)
        if are_conversations:
            if images is None:
                images = _media_in_conversations(items, "image")
            if videos is None:
                videos = _media_in_conversations(items, "video")
            texts = [self.chat_template.render(c, add_generation_prompt) for c in items]
        else:
            texts = items
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        out: dict[str, np.ndarray] = {}
        if images:
            out.update(self.preprocess_images(images))
        if videos:
            out.update(self.preprocess_videos(videos))
        texts = expand_vision_placeholders(
            texts,
            out.get("image_grid_thw"),
            out.get("video_grid_thw"),
            self.image_options.merge_size,
            self.video_options.merge_size,
        )
        out.update(self._pad(self.tokenizer.encode_batch(texts), padding_side))
        return out

    def _pad(self, rows: list[list[int]], padding_side: str) -> dict[str, np.ndarray]:
        length = max(len(r) for r in rows)
        input_ids = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype=np.int32)
        attention_mask = np.zeros((len(rows), length), dtype=np.int32)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = row
            attention_mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
        return self.tokenizer.decode_batch(ids, skip_special_tokens)

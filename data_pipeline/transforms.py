"""Per-example transforms: a source record (messages + image/video references) → a model-ready example.

`ToExample(processor, max_length, max_vision_rows)` is a grain MapTransform. It decodes the media (any PIL mode,
EXIF orientation, smart_resize within the processor's min/max pixels), tokenizes the conversation exactly as the
chat template + Processor would (same ids), puts labels on the assistant turns only (their text and `<|im_end|>`;
never on system, user or vision tokens), truncates without cutting a run of vision placeholders, and computes the
sample's own M-RoPE positions. An example:

    input_ids int32[L]; labels int32[L] (IGNORE where no loss); position_ids int32[3, L] (restart at 0 per sample);
    pixels float32[N, 1176] (images then videos); image_grid_thw int64[n, 3]; video_grid_thw int64[m, 3]; id str

A record that cannot become an example (missing or corrupt file, placeholder mismatch, nothing left to learn after
truncation, too many vision patches) becomes `{"error": reason, "id": ...}`: the batcher counts and skips it."""
from __future__ import annotations

import io
import os
from typing import Any

import grain
import numpy as np
from etils import epath

from qwen2vl_jax.processing import Processor
from qwen2vl_jax.processing.chat import DEFAULT_SYSTEM_PROMPT, is_image_item, is_video_item
from qwen2vl_jax.processing.image import preprocess_image
from qwen2vl_jax.processing.loading import load_image
from qwen2vl_jax.processing.video import preprocess_video
from qwen2vl_jax.rope import get_rope_index
from qwen2vl_jax.inputs import IGNORE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_bytes(ref: Any) -> Any:
    """A path (local or gs://) → its bytes; anything else (bytes, PIL, arrays) is returned as is."""
    if isinstance(ref, (str, os.PathLike)) and not str(ref).startswith("data:"):
        path = epath.Path(ref)
        if not path.exists():
            raise FileNotFoundError(f"file not found: {os.fspath(ref)!r}")
        return path.read_bytes()
    return ref


def load_video_frames(ref: Any) -> list:
    """A folder of frame images (sorted by name), a .npy uint8[T, H, W, 3], or an array / list of frames → frames
    (already sampled; see qwen2vl_jax.processing.sample_video_frames for raw videos)."""
    if isinstance(ref, (str, os.PathLike)):
        path = epath.Path(ref)
        if path.is_dir():
            names = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not names:
                raise ValueError(f"video folder {os.fspath(ref)!r} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
            return [load_image(p.read_bytes()) for p in names]
        if path.suffix == ".npy":
            return list(np.load(io.BytesIO(read_bytes(ref))))
        raise ValueError(f"video {os.fspath(ref)!r}: pass a folder of frames or a .npy uint8[T, H, W, 3]; "
                         "no video decoder is installed — extract frames first")
    return ref


class ToExample(grain.transforms.Map):
    """record → example dict (see the module docstring) or {"error": ..., "id": ...}."""

    def __init__(self, processor: Processor, max_length: int, max_vision_rows: int, truncate: bool = True):
        self.processor = processor
        self.max_length = max_length
        self.max_vision_rows = max_vision_rows
        self.truncate = truncate
        tok = processor.tokenizer
        self.ids = {name: tok.token_to_id(token) for name, token in (
            ("start", "<|vision_start|>"), ("end", "<|vision_end|>"), ("image", "<|image_pad|>"),
            ("video", "<|video_pad|>"), ("im_end", "<|im_end|>"))}

    def map(self, record: dict) -> dict:
        rid = record.get("id", "?")
        if "error" in record:
            return {"error": record["error"], "id": rid}
        try:
            return self._example(record) | {"id": rid}
        except (ValueError, TypeError, KeyError, OSError) as e:  # OSError covers missing files
            return {"error": f"{type(e).__name__}: {e}", "id": rid}

    def _example(self, record: dict) -> dict:
        images = [with_name(r, lambda r: preprocess_image(load_image(read_bytes(r)),
                                                       **self.processor.image_options.kwargs()))
                  for r in record.get("images", [])]
        videos = [with_name(r, lambda r: preprocess_video(load_video_frames(r), **self.processor.video_options.kwargs()))
                  for r in record.get("videos", [])]
        ids, labels = self._tokens(record["messages"], [g for _, g in images], [g for _, g in videos])
        ids, labels, n_images, n_videos = self._truncate(ids, labels)
        images, videos = images[:n_images], videos[:n_videos]
        if not (labels != IGNORE).any():
            raise ValueError(f"no assistant tokens to learn from within max_length {self.max_length} "
                             f"(the sample has {len(ids)}+ tokens)")
        image_grid = np.array([g for _, g in images], np.int64).reshape(-1, 3)
        video_grid = np.array([g for _, g in videos], np.int64).reshape(-1, 3)
        pixels = [p for p, _ in images] + [p for p, _ in videos]
        rows = sum(len(p) for p in pixels)
        if rows > self.max_vision_rows:
            raise ValueError(f"{rows} vision patch rows exceed the largest vision bucket {self.max_vision_rows}; "
                             "lower data.max_pixels or raise the vision ladder")
        positions, _ = get_rope_index(ids[None], None, image_grid if len(image_grid) else None,
                                      video_grid if len(video_grid) else None,
                                      image_token_id=self.ids["image"], video_token_id=self.ids["video"],
                                      spatial_merge_size=self.processor.image_options.merge_size)
        patch_dim = 3 * self.processor.image_options.temporal_patch_size * self.processor.image_options.patch_size**2
        return dict(input_ids=ids, labels=labels, position_ids=positions[:, 0].astype(np.int32),
                    pixels=np.concatenate(pixels) if pixels else np.zeros((0, patch_dim), np.float32),
                    image_grid_thw=image_grid, video_grid_thw=video_grid)

    def _tokens(self, messages: list, image_grids: list, video_grids: list) -> tuple[np.ndarray, np.ndarray]:
        """The chat template's token ids with vision placeholders expanded, and labels on assistant turns."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        encode, merge2 = self.processor.tokenizer.encode, self.processor.image_options.merge_size ** 2
        grids = {"image": iter(image_grids), "video": iter(video_grids)}
        counts = {"image": len(image_grids), "video": len(video_grids)}
        ids, learn = [], []

        def add(tokens, labelled=False):
            ids.extend(tokens)
            learn.extend([labelled] * len(tokens))

        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
            if i == 0 and message["role"] != "system":
                add(encode(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n"))
            add(encode(f"<|im_start|>{message['role']}\n"))
            assistant = message["role"] == "assistant"
            content = message["content"]
            for item in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                kind = "image" if is_image_item(item) else "video" if is_video_item(item) else None
                if kind is None:
                    add(encode(str(item.get("text", ""))), assistant)
                    continue
                grid = next(grids[kind], None)
                if grid is None:
                    raise ValueError(f"the messages hold more {kind} items than the {counts[kind]} {kind}(s) given")
                add([self.ids["start"]] + [self.ids[kind]] * (int(np.prod(grid)) // merge2) + [self.ids["end"]])
            add([self.ids["im_end"]], assistant)
            add(encode("\n"))
        for kind in grids:
            if next(grids[kind], None) is not None:
                raise ValueError(f"{counts[kind]} {kind}(s) given but the messages reference fewer")
        ids = np.asarray(ids, np.int32)
        return ids, np.where(np.asarray(learn, bool), ids, IGNORE).astype(np.int32)

    def _truncate(self, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
        """Cut to max_length, moving the cut before a vision run it would split; → (ids, labels, images kept,
        videos kept)."""
        cut = len(ids)
        if cut > self.max_length:
            if not self.truncate:
                raise ValueError(f"{cut} tokens exceed max_length {self.max_length} (truncation is off)")
            cut = self.max_length
            starts = np.flatnonzero(ids[:cut] == self.ids["start"])
            ends = np.flatnonzero(ids[:cut] == self.ids["end"])
            if len(starts) > len(ends):  # the last run is open at the cut: drop it whole
                cut = int(starts[-1])
        kept = ids[:cut]
        return kept, labels[:cut], _runs(kept, self.ids["image"]), _runs(kept, self.ids["video"])


def with_name(ref, fn):
    """fn(ref), with a path reference named in any error (decoders only see the bytes)."""
    try:
        return fn(ref)
    except (ValueError, OSError) as e:
        if isinstance(ref, (str, os.PathLike)) and os.fspath(ref) not in str(e):
            raise type(e)(f"{os.fspath(ref)}: {e}") from e
        raise


def _runs(ids: np.ndarray, token: int) -> int:
    """How many contiguous runs of `token` ids holds."""
    hits = (ids == token).astype(np.int8)
    return int(((hits[1:] == 1) & (hits[:-1] == 0)).sum() + (hits[:1] == 1).sum())

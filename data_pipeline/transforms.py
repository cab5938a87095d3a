"""Per-example transforms: a source record (messages + image/video references) → a model-ready example.

`ToExample(processor, max_length, max_vision_rows)` is a grain MapTransform. It decodes the media (any PIL mode,
EXIF orientation, smart_resize within the processor's min/max pixels), tokenizes the conversation exactly as the
chat template + Processor would (same ids), puts labels on the assistant turns only (their text and `<|im_end|>`;
never on system, user or vision tokens), truncates without cutting a run of vision placeholders, and computes the
sample's own M-RoPE positions. An example:

    input_ids int32[L]; labels int32[L] (IGNORE where no loss); position_ids int32[3, L] (restart at 0 per sample);
    pixels float32[N, 1176] (images then videos); image_grid_thw int64[n, 3]; video_grid_thw int64[m, 3]; id str

An assistant content item `{"type": "box", "box": [x1, y1, x2, y2], "label"?: str}` (pixels of the record's first
image, upright as load_image gives it) is written as the answer text of the family trained (`model_type`): Qwen2-VL's
grid box tokens or Qwen2.5-VL's JSON in resized pixels (qwen2vl_jax.processing.grounding.box_text), so grounding data
written once serves either.

A record that cannot become an example (missing or corrupt file, placeholder mismatch, nothing left to learn after
truncation, too many vision patches) becomes `{"error": reason, "id": ...}`: the batcher counts and skips it."""
from __future__ import annotations

import os

import grain
import numpy as np

from qwen2vl_jax.processing import Processor
from qwen2vl_jax.processing.grounding import check_model_type, render_box_items
from qwen2vl_jax.processing.image import preprocess_image
from qwen2vl_jax.processing.loading import load_image
from qwen2vl_jax.rope import get_rope_index
from qwen2vl_jax.inputs import IGNORE


class ToExample(grain.transforms.Map):
    """record → example dict (see the module docstring) or {"error": ..., "id": ...}."""

    def __init__(self, processor: Processor, max_length: int, max_vision_rows: int, truncate: bool = True,
                 tokens_per_second: float | None = None, model_type: str = "qwen2_vl"):
        """tokens_per_second: the model's (Qwen2.5-VL: video time positions in seconds); None for Qwen2-VL.
        model_type: the family trained ("qwen2_vl" | "qwen2_5_vl"), which writes box items its own way."""
        self.processor = processor
        self.model_type = check_model_type(model_type)
        self.tokens_per_second = tokens_per_second
        self.max_length = max_length
        self.max_vision_rows = max_vision_rows
        self.truncate = truncate
        tok = processor.tokenizer
        self.ids = {name: tok.token_to_id(token) for name, token in (
            ("start", "<|vision_start|>"), ("end", "<|vision_end|>"), ("image", "<|image_pad|>"),
            ("video", "<|video_pad|>"), ("im_end", "<|im_end|>"))}
        self.vision_ids = np.array([self.ids[k] for k in ("start", "end", "image", "video")], np.int32)

    def map(self, record: dict) -> dict:
        rid = record.get("id", "?")
        if "error" in record:
            return {"error": record["error"], "id": rid}
        try:
            return self._example(record) | {"id": rid}
        except (ValueError, TypeError, KeyError, OSError) as e:  # OSError covers missing files
            return {"error": f"{type(e).__name__}: {e}", "id": rid}

    def _example(self, record: dict) -> dict:
        sized = [with_name(r, self._image) for r in record.get("images", [])]  # ((height, width), (pixels, grid))
        images = [image for _, image in sized]
        videos = [with_name(r, self.processor.preprocess_video) for r in record.get("videos", [])]
        ids, labels = self._tokens(self._boxes_as_text(record["messages"], sized), [g for _, g in images],
                                   [v[1] for v in videos])
        ids, labels, n_images, n_videos = self._truncate(ids, labels)
        images, videos = images[:n_images], videos[:n_videos]
        if not (labels != IGNORE).any():
            raise ValueError(f"no assistant tokens to learn from within max_length {self.max_length} "
                             f"(the sample has {len(ids)}+ tokens)")
        image_grid = np.array([g for _, g in images], np.int64).reshape(-1, 3)
        video_grid = np.array([v[1] for v in videos], np.int64).reshape(-1, 3)
        pixels = [p for p, _ in images] + [v[0] for v in videos]
        rows = sum(len(p) for p in pixels)
        if rows > self.max_vision_rows:
            raise ValueError(f"{rows} vision patch rows exceed the largest vision bucket {self.max_vision_rows}; "
                             "lower data.max_pixels or raise the vision ladder")
        positions, _ = get_rope_index(ids[None], None, image_grid if len(image_grid) else None,
                                      video_grid if len(video_grid) else None,
                                      image_token_id=self.ids["image"], video_token_id=self.ids["video"],
                                      spatial_merge_size=self.processor.image_options.merge_size,
                                      second_per_grid_ts=[v[2] for v in videos] or None,
                                      tokens_per_second=self.tokens_per_second)
        patch_dim = 3 * self.processor.image_options.temporal_patch_size * self.processor.image_options.patch_size**2
        return dict(input_ids=ids, labels=labels, position_ids=positions[:, 0].astype(np.int32),
                    pixels=np.concatenate(pixels) if pixels else np.zeros((0, patch_dim), np.float32),
                    image_grid_thw=image_grid, video_grid_thw=video_grid)

    def _image(self, ref) -> tuple[tuple[int, int], tuple[np.ndarray, np.ndarray]]:
        """→ ((height, width) as stored, preprocess_image's (pixels, grid_thw)) of an image reference."""
        image = load_image(ref)
        return (image.height, image.width), preprocess_image(image, **self.processor.image_options.kwargs())

    def _boxes_as_text(self, messages, sized: list) -> list:
        """`messages` with their box items written as this family's answer text, in the first image's pixels."""
        if not isinstance(messages, list):
            return messages  # _tokens says what is wrong
        if not sized:
            return render_box_items(messages, self.model_type, None, None)
        image_hw, (_, grid) = sized[0]
        patch = self.processor.image_options.patch_size
        return render_box_items(messages, self.model_type, image_hw, (int(grid[1]) * patch, int(grid[2]) * patch))

    def _tokens(self, messages: list, image_grids: list, video_grids: list) -> tuple[np.ndarray, np.ndarray]:
        """The processor's chat template rendered whole (add_generation_prompt=False) and tokenized once, vision pads
        expanded, labels on the assistant turns → (ids int32[L], labels int32[L]); the ids are always
        `processor(messages, images, videos, add_generation_prompt=False)["input_ids"][0]`.

        A token is learned when its characters overlap an assistant span of the rendered text (see
        ChatTemplate.render_with_assistant_spans): a token BPE merged across a span edge (e.g. "\\n\\n" from the
        template's "assistant\\n" and content starting with "\\n") is learned, since the model must produce the
        span's part of it. Vision tokens are never learned."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"message {i} must be a dict with 'role' and 'content'")
        text, spans = self.processor.chat_template.render_with_assistant_spans(messages)
        ids, offsets = self.processor.tokenizer.encode_with_offsets(text)
        ids = np.asarray(ids, np.int32)
        learn = _overlaps(np.asarray(offsets, np.int64).reshape(-1, 2), spans) & ~np.isin(ids, self.vision_ids)
        ids, learn = self._expand_pads(ids, learn, image_grids, video_grids)
        return ids, np.where(learn, ids, IGNORE).astype(np.int32)

    def _expand_pads(self, ids: np.ndarray, learn: np.ndarray, image_grids: list, video_grids: list
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Repeat the n-th `<|image_pad|>` id image_grids[n].prod() / merge² times (videos likewise), as the
        Processor expands the text (special tokens are atomic, so this equals tokenizing the expanded string)."""
        repeats = np.ones(len(ids), np.int64)
        for kind, grids, options in (("image", image_grids, self.processor.image_options),
                                     ("video", video_grids, self.processor.video_options)):
            where = np.flatnonzero(ids == self.ids[kind])
            if len(where) > len(grids):
                raise ValueError(f"the messages hold more {kind} items than the {len(grids)} {kind}(s) given")
            if len(where) < len(grids):
                raise ValueError(f"{len(grids)} {kind}(s) given but the messages reference fewer")
            repeats[where] = [int(np.prod(g)) // options.merge_size ** 2 for g in grids]
        return np.repeat(ids, repeats), np.repeat(learn, repeats)

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


def _overlaps(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """offsets int[L, 2] (character [start, end) of each token) → bool[L]: the token overlaps one of `spans`
    (an empty-offset token counts as one character wide)."""
    starts, ends = offsets[:, 0], np.maximum(offsets[:, 1], offsets[:, 0] + 1)
    hit = np.zeros(len(offsets), bool)
    for start, end in spans:
        hit |= (starts < end) & (ends > start)
    return hit


def _runs(ids: np.ndarray, token: int) -> int:
    """How many contiguous runs of `token` ids holds."""
    hits = (ids == token).astype(np.int8)
    return int(((hits[1:] == 1) & (hits[:-1] == 0)).sum() + (hits[:1] == 1).sum())

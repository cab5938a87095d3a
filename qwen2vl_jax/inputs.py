"""Host-side (numpy) preparation of everything data-dependent, so the jitted model sees only static shapes.

`prepare_inputs` turns the Hugging Face fields (input_ids, attention_mask, image_grid_thw, video_grid_thw)
into arrays the network consumes: M-RoPE positions, the packed ViT layout (patch positions and one segment id per
frame-pair) and the splice index that says which merged vision feature replaces which placeholder token."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.rope import get_rope_index

IGNORE = -100  # the label of a position that takes no loss (Hugging Face's convention); data and training share it


def grid_array(grid, name: str, merge_size: int = 1) -> np.ndarray:
    """Validates a grid_thw argument: int[n, 3], positive, h and w multiples of `merge_size`."""
    if grid is None:
        return np.zeros((0, 3), np.int64)
    g = np.asarray(grid)
    if g.ndim == 1 and g.shape[0] == 3:
        g = g[None]
    if g.ndim != 2 or g.shape[1] != 3 or not np.issubdtype(g.dtype, np.integer) or np.any(g <= 0):
        raise ValueError(f"{name} must be positive integers of shape [n, 3] (t, h, w in patches); got "
                         f"shape {g.shape}, dtype {g.dtype}")
    if np.any(g[:, 1:] % merge_size):
        raise ValueError(f"{name} {g.tolist()}: h and w must be multiples of spatial_merge_size {merge_size}; "
                         "resize with the Processor's smart_resize")
    return g.astype(np.int64)


# Padding rows of a packed ViT sequence form runs of this many rows, each its own (negative) segment: padding then
# attends only within its run, so the blockwise kernel visits one block per padding block instead of treating all
# padding as one segment (rows² of wasted attention at a large vision bucket).
PADDING_RUN = 256


def padding_segments(start: int, stop: int) -> np.ndarray:
    """Segment ids int32[stop − start] of padding rows start … stop − 1 of a packed ViT sequence:
    −1 − row // PADDING_RUN (by absolute row, so padding added later in more steps continues the same runs)."""
    return (-1 - np.arange(start, stop) // PADDING_RUN).astype(np.int32)


# Qwen2.5-VL's packed segment ids carry two levels: frame-pair · WINDOW_SLOTS + window within it. Window-attention
# blocks use the id whole, full-attention blocks its frame-pair part (id // WINDOW_SLOTS), so one array serves both.
WINDOW_SLOTS = 1 << 16


class VisionLayout(NamedTuple):
    """The packed ViT sequence of some grids. pos_hw int32[N, 2] (patch row, column); segment_ids int32[N];
    rows int32[N]: the processor row (of the grids' pixel rows, concatenated) each packed row takes, −1 on padding;
    feature_slot int32[F]: where each of the grids' merged features (processor order) lands in the merger's output."""
    pos_hw: np.ndarray
    segment_ids: np.ndarray
    rows: np.ndarray
    feature_slot: np.ndarray


def _window_units(h: int, w: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A frame's h × w merged units tiled by size × size windows from the top-left (the last row / column of windows
    cut short) → (unit indices in window order: windows row-major, cells row-major inside; the window of each)."""
    i, j = np.divmod(np.arange(h * w), w)
    window = (i // size) * -(-w // size) + j // size
    order = np.argsort(window * size * size + (i % size) * size + j % size, kind="stable")
    return order, window[order]


def vision_layout(grids: np.ndarray, merge_size: int, pad_to: int | None = None,
                  window_units: int = 0) -> VisionLayout:
    """The packed ViT sequence for grids int[n, 3] (processor row order inside a frame: h-block, w-block, h-in, w-in).

    window_units 0 (Qwen2-VL): rows in processor order, one segment per frame-pair, numbered from 1. window_units k
    (Qwen2.5-VL): each frame's merged units reordered window by window (k × k units a window, groups of merge² rows
    moving together) and segment ids frame-pair · WINDOW_SLOTS + window. Rows added by `pad_to` get position 0, row
    −1 and negative segment ids (`padding_segments`)."""
    group = merge_size * merge_size
    positions, segments, rows, slots = [], [], [], []
    segment, row0, feature0 = 0, 0, 0
    for t, h, w in np.asarray(grids, np.int64):
        if h % merge_size or w % merge_size:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of spatial_merge_size "
                             f"{merge_size}; use the Processor's smart_resize")
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = lambda a: a.reshape(h // merge_size, merge_size, w // merge_size, merge_size).transpose(0, 2, 1, 3)
        frame = np.stack([blocks(hh).ravel(), blocks(ww).ravel()], axis=-1)
        units = (h // merge_size) * (w // merge_size)
        if window_units:
            unit_order, windows = _window_units(h // merge_size, w // merge_size, window_units)
        else:
            unit_order, windows = np.arange(units), np.zeros(units, np.int64)
        frame_rows = (unit_order[:, None] * group + np.arange(group)).ravel()
        frame = frame[frame_rows]
        for _ in range(t):
            segment += 1
            positions.append(frame)
            segments.append(np.repeat(segment * WINDOW_SLOTS + windows if window_units else
                                      np.full(units, segment), group))
            rows.append(row0 + frame_rows)
            slots.append(feature0 + np.argsort(unit_order))
            row0, feature0 = row0 + h * w, feature0 + units
    if window_units and segment >= 2**31 // WINDOW_SLOTS:
        raise ValueError(f"{segment} frame-pairs in one packed ViT sequence: at most {2**31 // WINDOW_SLOTS - 1} fit "
                         "window segment ids; split the batch")
    cat = lambda parts, shape: np.concatenate(parts) if parts else np.zeros(shape, np.int64)
    pos, seg, row = cat(positions, (0, 2)), cat(segments, (0,)), cat(rows, (0,))
    if pad_to is not None:
        if pad_to < len(seg):
            raise ValueError(f"pad_to={pad_to} is smaller than the {len(seg)} vision patches")
        pos = np.concatenate([pos, np.zeros((pad_to - len(seg), 2), np.int64)])
        row = np.concatenate([row, np.full(pad_to - len(seg), -1)])
        seg = np.concatenate([seg, padding_segments(len(seg), pad_to)])
    return VisionLayout(pos.astype(np.int32), seg.astype(np.int32), row.astype(np.int32),
                        cat(slots, (0,)).astype(np.int32))


def splice_index(input_ids: np.ndarray, config: Qwen2VLConfig, image_tokens: int, video_tokens: int) -> np.ndarray:
    """int32[B, L]: for each placeholder, the row of the merged vision features ([images; videos]) it takes,
    in order of appearance across the batch (row-major, as transformers' masked_scatter); -1 for text."""
    index = np.full(input_ids.shape, -1, np.int32)
    for token, count, offset, what in ((config.image_token_id, image_tokens, 0, "image"),
                                       (config.video_token_id, video_tokens, image_tokens, "video")):
        where = input_ids == token
        found = int(where.sum())
        if found != count:
            raise ValueError(f"input_ids hold {found} {what} placeholder tokens (id {token}) but the {what} grids "
                             f"give {count} merged features; each {what} needs grid.prod() / merge_size**2 "
                             "placeholders — build the prompt with the Processor, and never truncate inside one")
        index[where] = offset + np.arange(count, dtype=np.int32)
    return index


def _owners(input_ids: np.ndarray, token: int, tokens_each: np.ndarray, what: str) -> np.ndarray:
    """The batch row each image (video) of the batch appears in, from its placeholders (in order of appearance)."""
    per_row = np.cumsum((input_ids == token).sum(1))
    first = np.concatenate([[0], np.cumsum(tokens_each)[:-1]]).astype(np.int64)
    rows = np.searchsorted(per_row, first, side="right")
    last = np.searchsorted(per_row, first + tokens_each - 1, side="right")
    if np.any(rows != last):
        raise ValueError(f"a {what}'s placeholder tokens run across two batch rows; each {what} must sit in one row")
    return rows


def shard_vision(config: Qwen2VLConfig, input_ids: np.ndarray, images: np.ndarray, videos: np.ndarray,
                 shards: int, pad_to: int | None = None) -> dict[str, np.ndarray]:
    """The packed ViT laid out per batch shard: rows [s·B/S, (s+1)·B/S) form shard s, and shard s's sequence holds
    the images, then the videos, of its rows. → vision_pos_hw int32[S, V, 2], vision_segment_ids int32[S, V],
    vision_rows int32[S, V] (the row of [pixel_values; pixel_values_videos] each patch takes, -1 on padding;
    `gather_vision_pixels` applies it) and splice_index int32[B, L] into the row's own shard's merged features.
    V = `pad_to`, or the largest shard's patch count."""
    B, merge2 = input_ids.shape[0], config.vision.spatial_merge_size**2
    if B % shards:
        raise ValueError(f"{B} batch rows cannot be split into {shards} vision shards: use a multiple of {shards}")
    items = []  # (shard, grid, first pixel row, first global feature)
    pixel_start, feature_start = 0, 0
    for token, grids, what in ((config.image_token_id, images, "image"), (config.video_token_id, videos, "video")):
        tokens_each = grids.prod(-1) // merge2
        for grid, row, n in zip(grids, _owners(input_ids, token, tokens_each, what), tokens_each):
            items.append((row // (B // shards), grid, pixel_start, feature_start))
            pixel_start, feature_start = pixel_start + int(grid.prod()), feature_start + int(n)
    local_feature = np.zeros(feature_start, np.int32)
    layouts, pixel_rows = [], []
    for s in range(shards):
        mine = [it for it in items if it[0] == s]  # images before videos, each in order: as `items`
        layout = vision_layout(np.array([g for _, g, _, _ in mine], np.int64).reshape(-1, 3),
                               config.vision.spatial_merge_size, window_units=config.vision.window_units)
        at = 0
        for _, grid, _, feature in mine:
            n = int(grid.prod()) // merge2
            local_feature[feature:feature + n] = layout.feature_slot[at:at + n]
            at += n
        layouts.append(layout)
        shard_rows = np.concatenate([np.arange(p, p + int(g.prod())) for _, g, p, _ in mine] or [[]]).astype(np.int64)
        pixel_rows.append(shard_rows[layout.rows])
    width = max(len(r) for r in pixel_rows) if pad_to is None else pad_to
    if width < max(len(r) for r in pixel_rows):
        raise ValueError(f"vision_pad_to={pad_to} is smaller than a shard's {max(len(r) for r in pixel_rows)} patches")
    pad = lambda x, value: np.concatenate([x, np.full((width - len(x),) + x.shape[1:], value, x.dtype)])
    index = splice_index(input_ids, config, int((images.prod(-1) // merge2).sum()),
                         int((videos.prod(-1) // merge2).sum()))
    return dict(vision_pos_hw=np.stack([pad(lay.pos_hw, 0) for lay in layouts]).astype(np.int32),
                vision_segment_ids=np.stack([np.concatenate([lay.segment_ids, padding_segments(len(lay.segment_ids),
                                                                                               width)])
                                             for lay in layouts]).astype(np.int32),
                vision_rows=np.stack([pad(r.astype(np.int32), -1) for r in pixel_rows]),
                splice_index=np.where(index >= 0, local_feature[np.maximum(index, 0)] if feature_start else -1,
                                      -1).astype(np.int32))


def widen_vision(prepared: dict, width: int) -> dict:
    """`shard_vision`'s arrays padded to `width` rows per shard (a bucket): vision_pos_hw with 0, vision_rows with −1,
    vision_segment_ids with `padding_segments`."""
    have = prepared["vision_segment_ids"].shape[1]
    if width < have:
        raise ValueError(f"vision bucket {width} is smaller than a shard's {have} patch rows")
    pad = lambda x, value: np.pad(x, [(0, 0), (0, width - have)] + [(0, 0)] * (x.ndim - 2), constant_values=value)
    segments = np.broadcast_to(padding_segments(have, width), (len(prepared["vision_segment_ids"]), width - have))
    return dict(prepared, vision_pos_hw=pad(prepared["vision_pos_hw"], 0), vision_rows=pad(prepared["vision_rows"], -1),
                vision_segment_ids=np.concatenate([prepared["vision_segment_ids"], segments], axis=1))


def gather_vision_pixels(pixels: np.ndarray, vision_rows: np.ndarray) -> np.ndarray:
    """[pixel_values; pixel_values_videos] float[N, C] → per-shard pixels float[S, V, C] (`shard_vision`)."""
    out = np.asarray(pixels)[np.maximum(vision_rows, 0)]
    return np.where((vision_rows >= 0)[..., None], out, 0).astype(out.dtype)


def prepare_inputs(config: Qwen2VLConfig, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                   *, image_rows: int | None = None, video_rows: int | None = None,
                   vision_pad_to: int | None = None, vision_shards: int | None = None,
                   second_per_grid_ts=None) -> dict[str, np.ndarray]:
    """input_ids, attention_mask: int[B, L] (left padded); grids int[n, 3]. `image_rows` / `video_rows`: the
    first dimension of pixel_values / pixel_values_videos, checked against the grids. second_per_grid_ts
    float[n_videos] (the processor's; None → 1.0 each): Qwen2.5-VL's video time positions (`get_rope_index`).

    Returns numpy arrays: attention_mask int32[B, L], position_ids int32[3, B, L], rope_deltas int32[B],
    splice_index int32[B, L], vision_pos_hw int32[N, 2], vision_segment_ids int32[N], vision_rows int32[N] (the row
    of [pixel_values; pixel_values_videos] each packed row takes, −1 on padding: the identity for Qwen2-VL, the window
    order for Qwen2.5-VL) (N = image + video patches, or `vision_pad_to`). With `vision_shards` S (the mesh's batch shards), the ViT is laid out per shard instead
    (`shard_vision`): vision_pos_hw [S, V, 2], vision_segment_ids [S, V], vision_rows [S, V] (feed the model
    `gather_vision_pixels(pixels, vision_rows)`) and a per-shard splice_index."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}")
    mask = np.ones(input_ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} differs from input_ids shape {input_ids.shape}")
    merge = config.vision.spatial_merge_size
    images = grid_array(image_grid_thw, "image_grid_thw", merge)
    videos = grid_array(video_grid_thw, "video_grid_thw", merge)
    for grids, rows, name, pixels in ((images, image_rows, "image_grid_thw", "pixel_values"),
                                      (videos, video_rows, "video_grid_thw", "pixel_values_videos")):
        expected = int(grids.prod(-1).sum())
        if rows is not None and rows != expected:
            raise ValueError(f"{pixels} has {rows} patch rows but {name} {grids.tolist()} describes {expected}; "
                             f"pass the grid the processor returned with these pixels")
        if rows is None and len(grids):
            raise ValueError(f"{name} is given without {pixels}")
    image_tokens = int(images.prod(-1).sum()) // merge**2
    video_tokens = int(videos.prod(-1).sum()) // merge**2
    index = splice_index(input_ids, config, image_tokens, video_tokens)
    positions, deltas = get_rope_index(input_ids, mask, images if len(images) else None,
                                       videos if len(videos) else None, image_token_id=config.image_token_id,
                                       video_token_id=config.video_token_id, spatial_merge_size=merge,
                                       second_per_grid_ts=second_per_grid_ts,
                                       tokens_per_second=config.vision.tokens_per_second if config.vision.windowed
                                       else None)
    out = dict(attention_mask=mask, position_ids=positions, rope_deltas=deltas)
    if vision_shards:
        return out | shard_vision(config, input_ids, images, videos, vision_shards, vision_pad_to)
    layout = vision_layout(np.concatenate([images, videos]), merge, vision_pad_to, config.vision.window_units)
    index = np.where(index >= 0, layout.feature_slot[np.maximum(index, 0)] if len(layout.feature_slot) else -1, -1)
    return out | dict(splice_index=index.astype(np.int32), vision_pos_hw=layout.pos_hw,
                      vision_segment_ids=layout.segment_ids, vision_rows=layout.rows)

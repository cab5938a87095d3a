"""Host-side (numpy) preparation of everything data-dependent, so the jitted model sees only static shapes.

`prepare_inputs` turns the Hugging Face fields (input_ids, attention_mask, image_grid_thw, video_grid_thw)
into arrays the network consumes: M-RoPE positions, the packed ViT layout (patch positions and one segment id per
frame-pair) and the splice index that says which merged vision feature replaces which placeholder token."""
from __future__ import annotations

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


def vision_layout(grids: np.ndarray, merge_size: int, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The packed ViT sequence for grids int[n, 3], in the processor's row order (t, h-block, w-block, h-in, w-in).

    Returns pos_hw int32[N, 2] (patch row and column) and segment_ids int32[N]: one segment per frame-pair,
    numbered from 1; rows added by `pad_to` get segment 0 and position 0."""
    positions, segments, segment = [], [], 0
    for t, h, w in np.asarray(grids, np.int64):
        if h % merge_size or w % merge_size:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of spatial_merge_size "
                             f"{merge_size}; use the Processor's smart_resize")
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = lambda a: a.reshape(h // merge_size, merge_size, w // merge_size, merge_size).transpose(0, 2, 1, 3)
        frame = np.stack([blocks(hh).ravel(), blocks(ww).ravel()], axis=-1)
        for _ in range(t):
            segment += 1
            positions.append(frame)
            segments.append(np.full(h * w, segment))
    pos = np.concatenate(positions) if positions else np.zeros((0, 2), np.int64)
    seg = np.concatenate(segments) if segments else np.zeros((0,), np.int64)
    if pad_to is not None:
        if pad_to < len(seg):
            raise ValueError(f"pad_to={pad_to} is smaller than the {len(seg)} vision patches")
        pos = np.concatenate([pos, np.zeros((pad_to - len(seg), 2), np.int64)])
        seg = np.concatenate([seg, np.zeros((pad_to - len(seg),), np.int64)])
    return pos.astype(np.int32), seg.astype(np.int32)


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


def prepare_inputs(config: Qwen2VLConfig, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                   *, image_rows: int | None = None, video_rows: int | None = None,
                   vision_pad_to: int | None = None) -> dict[str, np.ndarray]:
    """input_ids, attention_mask: int[B, L] (left padded); grids int[n, 3]. `image_rows` / `video_rows`: the
    first dimension of pixel_values / pixel_values_videos, checked against the grids.

    Returns numpy arrays: attention_mask int32[B, L], position_ids int32[3, B, L], rope_deltas int32[B],
    splice_index int32[B, L], vision_pos_hw int32[N, 2], vision_segment_ids int32[N] (N = image + video patches,
    or `vision_pad_to`)."""
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
                                       video_token_id=config.video_token_id, spatial_merge_size=merge)
    pos_hw, segments = vision_layout(np.concatenate([images, videos]), merge, vision_pad_to)
    return dict(attention_mask=mask, position_ids=positions, rope_deltas=deltas, splice_index=index,
                vision_pos_hw=pos_hw, vision_segment_ids=segments)

"""Rotary position embeddings: the ViT's 2D RoPE, the decoder's M-RoPE, and `get_rope_index`.

Angles are always computed and applied in float32."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [..., L, H, hd]; cos, sin: float32[..., L, hd] → x rotated, in x.dtype."""
    x32 = x.astype(jnp.float32)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def vision_rope(pos_hw: jax.Array, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """pos_hw: int[..., N, 2] (row, column of each patch) → (cos, sin) float32[..., N, head_dim].

    head_dim/4 frequencies; angles [h·inv | w·inv] repeated twice to cover the head."""
    quarter = head_dim // 2
    inv_freq = 1.0 / theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter)
    pos = pos_hw.astype(jnp.float32)
    angles = jnp.concatenate([pos[..., 0:1] * inv_freq, pos[..., 1:2] * inv_freq], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def mrope(position_ids: jax.Array, head_dim: int, theta: float,
          section: Sequence[int]) -> tuple[jax.Array, jax.Array]:
    """position_ids: int[3, B, L] (t, h, w rows) → (cos, sin) float32[B, L, head_dim].

    Frequency chunks of sizes `section` take their angle from rows t, h, w in turn."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, hd/2]
    chunks = jnp.split(freqs, np.cumsum(section)[:-1], axis=-1)
    angles = jnp.concatenate([chunk[i % 3] for i, chunk in enumerate(chunks)], axis=-1)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def get_rope_index(input_ids: np.ndarray, attention_mask: np.ndarray | None, image_grid_thw: np.ndarray | None,
                   video_grid_thw: np.ndarray | None, *, image_token_id: int, video_token_id: int,
                   spatial_merge_size: int = 2, second_per_grid_ts=None,
                   tokens_per_second: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE positions for a (left-)padded batch, host side (numpy), by the released Qwen2-VL / Qwen2.5-VL rule.

    input_ids, attention_mask: int[B, L]; grids: int[n, 3] in order of appearance across the batch.
    Returns position_ids int32[3, B, L] (padded slots hold 1) and rope_deltas int32[B] such that decode step k
    of row b sits at position (real length + k) + rope_deltas[b] on all three rows.

    Qwen2-VL (tokens_per_second None): a vision block's time positions are start + 0, 1, … t−1. Qwen2.5-VL
    (tokens_per_second given): a video's frame-pair i sits at start + int(i · float32(tokens_per_second ·
    second_per_grid_ts[v])) (truncated after the multiply; second_per_grid_ts None → 1.0), an image's at start.
    A text span continues at the max of ALL positions so far + 1. transformers 5.x continues at start + max(h, w)
    instead, which differs when the time positions reach further (long, low-resolution or time-scaled videos);
    the released checkpoints follow this rule."""
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = {image_token_id: iter(_rows(image_grid_thw)), video_token_id: iter(_rows(video_grid_thw))}
    names = {image_token_id: "image_grid_thw", video_token_id: "video_grid_thw"}
    seconds = iter(np.ones(len(_rows(video_grid_thw)), np.float32) if second_per_grid_ts is None
                   else np.asarray(second_per_grid_ts, np.float32).reshape(-1))
    positions = np.ones((3, batch, length), np.int32)
    deltas = np.zeros((batch,), np.int32)
    for b in range(batch):
        tokens = input_ids[b][mask[b]]
        pieces, start, i, n = [], 0, 0, len(tokens)
        while i < n:
            token = int(tokens[i])
            if token in grids:
                grid = next(grids[token], None)
                if grid is None:
                    raise ValueError(f"row {b} has more vision placeholders (token {token}) than {names[token]} "
                                     "lists; pass one grid row per image/video in order of appearance")
                t, h, w = int(grid[0]), int(grid[1]) // spatial_merge_size, int(grid[2]) // spatial_merge_size
                count = t * h * w
                if i + count > n or np.any(tokens[i:i + count] != token):
                    raise ValueError(f"row {b}: a {names[token]} entry {tuple(int(g) for g in grid)} needs {count} "
                                     f"consecutive placeholder tokens at position {i}; expand each placeholder to "
                                     "grid.prod() / merge_size**2 copies (the Processor does this)")
                times = np.arange(t)
                if tokens_per_second is not None and token == video_token_id:
                    second = next(seconds, None)
                    if second is None:
                        raise ValueError("second_per_grid_ts has fewer entries than video_grid_thw: pass one per video")
                    interval = np.float32(tokens_per_second) * np.float32(second)
                    times = (times.astype(np.float32) * interval).astype(np.int64)
                tt, hh, ww = np.meshgrid(times, np.arange(h), np.arange(w), indexing="ij")
                pieces.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start)
                start = int(pieces[-1].max()) + 1
                i += count
            else:
                j = i
                while j < n and int(tokens[j]) not in grids:
                    j += 1
                pieces.append(np.broadcast_to(np.arange(start, start + j - i), (3, j - i)))
                start += j - i
                i = j
        row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        positions[:, b, mask[b]] = row
        deltas[b] = (row.max() + 1 if n else 0) - n
    return positions, deltas


def _rows(grid: np.ndarray | None) -> list[np.ndarray]:
    return [] if grid is None else list(np.asarray(grid).reshape(-1, 3))

"""Pixels → normalized float frames → flat ViT patch rows (shared by images and videos).

The row/feature layout is the one the PyTorch processor produces (REFERENCE.md "Image preprocessing"):

    frames  float32[T, C, H, W]            (T a multiple of temporal_patch_size)
    → reshape (gt, tp, C, gh/m, m, p, gw/m, m, p)
    → transpose (0, 3, 6, 4, 7, 2, 1, 5, 8)
    → float32[gt·gh·gw, C·tp·p·p]

Rows run t, h-block, w-block, h-in-block, w-in-block (so every m² consecutive rows are one merge group);
features run (C, t, ph, pw). With p=14, tp=2, C=3 a row has 1176 features.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255


def normalize_frames(
    frames: np.ndarray,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    rescale_factor: float = RESCALE_FACTOR,
) -> np.ndarray:
    """uint8[T, H, W, C] → float32[T, C, H, W]: (x · rescale_factor − mean) / std per channel.

    Done in the same precision as the PyTorch-side PIL processor (rescale in float64, cast to float32,
    then subtract/divide in float32), so the result is bit-identical to it.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"expected frames of shape [T, H, W, C], got shape {frames.shape}")
    mean = np.asarray(image_mean, dtype=np.float32)
    std = np.asarray(image_std, dtype=np.float32)
    if frames.dtype == np.uint8:  # a 256-entry table per channel, same arithmetic: same bits, ~10x faster
        table = _normalize(np.arange(256, dtype=np.uint8)[:, None], rescale_factor, mean, std)  # [256, C]
        t, h, w, c = frames.shape
        out = np.empty((t, c, h, w), np.float32)
        for k in range(c):
            np.take(np.ascontiguousarray(table[:, k]), frames[..., k], out=out[:, k])
        return out
    return np.ascontiguousarray(_normalize(frames, rescale_factor, mean, std).transpose(0, 3, 1, 2))


def _normalize(x: np.ndarray, rescale_factor: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """[..., C] → float32[..., C]: float64 rescale, float32 cast, float32 (x − mean) / std."""
    return ((x.astype(np.float64) * rescale_factor).astype(np.float32) - mean) / std


def patchify(
    frames: np.ndarray,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """float32[T, C, H, W] → (float32[gt·gh·gw, C·tp·p·p], int64[3] grid (gt, gh, gw)).

    T must be a multiple of temporal_patch_size and H, W multiples of patch_size · merge_size (what
    smart_resize guarantees); pad the frame count before calling (repeat the last frame).
    """
    t, c, h, w = frames.shape
    p, tp, m = patch_size, temporal_patch_size, merge_size
    if t % tp:
        raise ValueError(f"frame count {t} is not a multiple of temporal_patch_size {tp}; repeat the last frame first")
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size = {p * m}; smart_resize first")
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = np.ascontiguousarray(x).reshape(gt * gh * gw, c * tp * p * p)
    return rows, np.array([gt, gh, gw], dtype=np.int64)


def pad_frame_count(frames: np.ndarray, multiple: int) -> np.ndarray:
    """[T, ...] → [T', ...] with T' the next multiple of `multiple`, repeating the last frame."""
    pad = -len(frames) % multiple
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    return frames

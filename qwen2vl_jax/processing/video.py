"""Videos → ViT patch rows: qwen-vl-utils frame sampling and pixel budget, then the image pipeline per frame.

    video uint8[T, H, W, 3] (or a list of frames) ──sample_video_frames──► n frames (2 fps, even, 4..768)
    ──preprocess_video──► resize every frame to one smart_resize size under the per-frame budget
    ──► normalize ──► pad to an even count (repeat last) ──► patchify
    ──► (pixel_values_videos float32[gt·gh·gw, 1176], video_grid_thw int64[3] = (n/2, gh, gw)).

Per-frame budget (qwen-vl-utils `fetch_video`): max_pixels = max(min(768·28², total_pixels / n · 2),
int(1.05 · min_pixels)), min_pixels = 128·28², total_pixels = 24576·28² (caps a video near 24576 LLM tokens).
Frames are resized with PIL bicubic, like images (qwen-vl-utils uses torchvision's antialiased bicubic,
which differs from PIL by a few 1/255 steps on some pixels).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen2vl_jax.processing.image import resize_rgb, smart_resize
from qwen2vl_jax.processing.loading import load_image
from qwen2vl_jax.processing.patches import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RESCALE_FACTOR,
    normalize_frames,
    pad_frame_count,
    patchify,
)

VIDEO_FPS = 2.0
VIDEO_MIN_FRAMES = 4
VIDEO_MAX_FRAMES = 768
FRAME_FACTOR = 2
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28

Video = Any  # np.ndarray uint8[T, H, W, 3] | Sequence[frame], frame = anything load_image accepts


def _linspace_float32(stop: float, num: int) -> np.ndarray:
    """torch.linspace(0, stop, num) (float32, with torch's two-sided formula), as float32[num]."""
    if num == 1:
        return np.zeros(1, dtype=np.float32)
    start, end = np.float32(0), np.float32(stop)
    step = (end - start) / np.float32(num - 1)
    idx = np.arange(num)
    front = start + step * idx.astype(np.float32)
    back = end - step * (num - idx - 1).astype(np.float32)
    return np.where(idx < num // 2, front, back).astype(np.float32)


def num_sampled_frames(
    total_frames: int,
    video_fps: float,
    fps: float = VIDEO_FPS,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
) -> int:
    """How many frames qwen-vl-utils keeps: total/video_fps·fps clipped to [min, max ∧ total], floored to even."""
    min_frames = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = total_frames / video_fps * fps
    n = min(max(n, min_frames), max_frames, total_frames)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(
            f"cannot sample a video of {total_frames} frame(s): at least {FRAME_FACTOR} frames are needed; "
            "pass the frames straight to preprocess_video instead (a single frame is repeated)"
        )
    return n


def video_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float = VIDEO_FPS,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    nframes: int | None = None,
) -> np.ndarray:
    """Indices (int64[n]) of the frames kept: linspace(0, total − 1, n).round() (halves to even).

    `nframes` (rounded to even) overrides the fps rule, as qwen-vl-utils' "nframes" key does.
    """
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
        if not FRAME_FACTOR <= n <= total_frames:
            raise ValueError(f"nframes={nframes} (→ {n}) must be between {FRAME_FACTOR} and the {total_frames} frames")
    else:
        n = num_sampled_frames(total_frames, video_fps, fps, min_frames, max_frames)
    return np.round(_linspace_float32(total_frames - 1, n)).astype(np.int64)


def sample_video_frames(
    video: Video,
    video_fps: float,
    fps: float = VIDEO_FPS,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    nframes: int | None = None,
) -> Video:
    """A decoded video (array [T, H, W, 3] or list of T frames) → the sampled frames, same container type."""
    indices = video_frame_indices(len(video), video_fps, fps, min_frames, max_frames, nframes)
    if isinstance(video, np.ndarray):
        return video[indices]
    return [video[i] for i in indices]


def video_frame_size(
    num_frames: int,
    height: int,
    width: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int | None = VIDEO_TOTAL_PIXELS,
    factor: int = 28,
) -> tuple[int, int]:
    """The (h, w) every frame of an n-frame video is resized to, under the per-frame pixel budget.

    total_pixels=None switches the whole-video budget off (only max_pixels then bounds a frame).
    """
    min_pixels = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
    if total_pixels is not None:
        cap = max(min(VIDEO_MAX_PIXELS, total_pixels / num_frames * FRAME_FACTOR), int(min_pixels * 1.05))
        max_pixels = cap if max_pixels is None else min(max_pixels, cap)
    elif max_pixels is None:
        max_pixels = VIDEO_MAX_PIXELS
    return smart_resize(height, width, factor, min_pixels, max_pixels)


def _frames_to_rgb_arrays(video: Video) -> list:
    """[T, H, W, 3] array or list of frames → list of RGB PIL frames, all the same size."""
    if isinstance(video, (str, bytes, os.PathLike)):
        raise TypeError(
            "video files are not decoded here: decode the video to frames (uint8[T, H, W, 3]) yourself, "
            "pick frames with sample_video_frames(frames, video_fps), then pass those frames"
        )
    if isinstance(video, np.ndarray) and video.ndim not in (3, 4):
        raise ValueError(f"a video array must be [T, H, W] or [T, H, W, C]; got shape {video.shape}")
    frames = [load_image(f) for f in video]
    if not frames:
        raise ValueError("the video has no frames")
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise ValueError(f"all frames of a video must have one size; got (width, height) sizes {sorted(sizes)}")
    return frames


def preprocess_video(
    frames: Video,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: int | None = VIDEO_TOTAL_PIXELS,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    rescale_factor: float = RESCALE_FACTOR,
) -> tuple[np.ndarray, np.ndarray]:
    """Already-sampled frames → (pixel_values_videos float32[gt·gh·gw, 3·tp·p²], grid_thw int64[3]).

    `frames`: uint8[T, H, W, 3] or a list of frames (PIL / arrays / paths). An odd count is padded
    by repeating the last frame, so gt = ceil(T / tp). Use sample_video_frames first for a raw video.
    """
    images = _frames_to_rgb_arrays(frames)
    n = len(images) + (-len(images) % temporal_patch_size)
    width, height = images[0].size
    h, w = video_frame_size(n, height, width, min_pixels, max_pixels, total_pixels, patch_size * merge_size)
    pixels = np.stack([resize_rgb(img, h, w) for img in images])  # [T, h, w, 3]
    pixels = pad_frame_count(pixels, temporal_patch_size)
    normalized = normalize_frames(pixels, image_mean, image_std, rescale_factor)
    return patchify(normalized, patch_size, temporal_patch_size, merge_size)

"""Videos → ViT patch rows: qwen-vl-utils 0.0.14 frame sampling and pixel budget, then the image pipeline per frame.

    fetch_video(item | path | frames) ──► (frames uint8[n, H, W, 3], VideoMetadata)
        a file: decoded with PyAV (video_decode.py), n frames picked by qwen-vl-utils' rule:
        [video_start, video_end] → frame range, 2 fps (or "fps" / "nframes"), even, 4..768, linspace(start, end, n)
        frames already sampled (folder of images, .npy, array, list): kept as they are
    ──preprocess_video──► resize every frame to one smart_resize size under the per-frame budget
    ──► normalize ──► pad to an even count (repeat last) ──► patchify
    ──► (pixel_values_videos float32[gt·gh·gw, 1176], video_grid_thw int64[3] = (n/2, gh, gw)).

Per-frame budget (qwen-vl-utils `fetch_video`): max_pixels = max(min(768·28², total_pixels / n · 2),
int(1.05 · min_pixels)), min_pixels = 128·28²; a video item's "min_pixels" / "max_pixels" / "total_pixels"
override (its max_pixels can only lower the cap). total_pixels defaults to qwen-vl-utils 0.0.14's (and
transformers 5.24's) 0.9·128000·28² = 115200·28² (caps a video near 115200 LLM tokens), so ids equal what the
reference toolkit gives; the original Qwen2-VL release used QWEN2VL_RELEASE_TOTAL_PIXELS = 24576·28²
(set Processor's video_options.total_pixels, or the item's "total_pixels", to get it).
Frames are resized with PIL bicubic, like images (qwen-vl-utils uses torchvision's antialiased bicubic,
which differs from PIL by a few 1/255 steps on some pixels).
Deliberate difference: a clip (or range) of fewer than 2 frames is kept and its frame repeated (grid t = 1);
qwen-vl-utils raises there.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from qwen2vl_jax.processing import video_decode
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
VIDEO_TOTAL_PIXELS = int(0.9 * 128000 * 28 * 28)  # qwen-vl-utils 0.0.14 (MODEL_SEQ_LEN 128000 · 0.9)
QWEN2VL_RELEASE_TOTAL_PIXELS = 24576 * 28 * 28  # the original Qwen2-VL release
VIDEO_PIXEL_KEYS = ("min_pixels", "max_pixels", "total_pixels")  # a video item's own pixel options

Video = Any  # np.ndarray uint8[T, H, W, 3] | Sequence[frame], frame = anything load_image accepts


def _linspace_float32(start: float, stop: float, num: int) -> np.ndarray:
    """torch.linspace(start, stop, num) (float32, with torch's two-sided formula), as float32[num]."""
    first, end = np.float32(start), np.float32(stop)
    if num == 1:
        return np.full(1, first, dtype=np.float32)
    step = (end - first) / np.float32(num - 1)
    idx = np.arange(num)
    front = first + step * idx.astype(np.float32)
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


def video_frame_range(
    total_frames: int, video_fps: float, video_start: float | None = None, video_end: float | None = None
) -> tuple[int, int]:
    """First and last frame (inclusive) of [video_start, video_end] seconds (qwen-vl-utils' rule)."""
    if video_fps <= 0 or total_frames <= 0:
        raise ValueError(f"a video needs frames and a frame rate; got {total_frames} frames at {video_fps} fps")
    duration = total_frames / video_fps
    start = 0 if video_start is None else math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if (video_start is not None or video_end is not None) and start >= end:
        raise ValueError(
            f"video_start={video_start} s, video_end={video_end} s select frames {start}..{end} of a "
            f"{duration:.2f} s video ({total_frames} frames at {video_fps:g} fps): give a range holding 2+ frames"
        )
    return start, end


def video_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float = VIDEO_FPS,
    min_frames: int = VIDEO_MIN_FRAMES,
    max_frames: int = VIDEO_MAX_FRAMES,
    nframes: int | None = None,
    video_start: float | None = None,
    video_end: float | None = None,
) -> np.ndarray:
    """Indices (int64[n]) of the frames kept: linspace(start, end, n).round() (halves to even).

    `nframes` (rounded to even) overrides the fps rule, as qwen-vl-utils' "nframes" key does; video_start /
    video_end (seconds) cut the range first. A range of fewer than 2 frames keeps all of them.
    """
    start, end = video_frame_range(total_frames, video_fps, video_start, video_end)
    count = end - start + 1
    if count < FRAME_FACTOR:
        return np.arange(start, end + 1, dtype=np.int64)
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
        if not FRAME_FACTOR <= n <= count:
            raise ValueError(f"nframes={nframes} (→ {n}) must be between {FRAME_FACTOR} and the {count} frames")
    else:
        n = num_sampled_frames(count, video_fps, fps, min_frames, max_frames)
    return np.round(_linspace_float32(start, end, n)).astype(np.int64)


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


@dataclasses.dataclass(frozen=True)
class VideoMetadata:
    """Where fetch_video's frames come from (qwen-vl-utils' video metadata and sample fps).

    fps: the file's average frame rate; total_frames: the file's frame count; frame_indices int64[n]: the
    frames kept; sample_fps: n / frames in [video_start, video_end] · fps. Already-sampled frames report
    fps = sample_fps = the item's "sample_fps" or "fps" (default 2) and indices arange(T).
    """

    fps: float
    total_frames: int
    frame_indices: np.ndarray
    sample_fps: float


def _item_indices(item: Mapping[str, Any]) -> video_decode.Pick:
    """The item's sampling options → pick(total_frames, video_fps) → frame indices."""
    if item.get("fps") is not None and item.get("nframes") is not None:
        raise ValueError(f"video {item.get('video')!r}: give either 'fps' or 'nframes', not both")
    options = {k: item[k] for k in ("fps", "min_frames", "max_frames", "nframes") if item.get(k) is not None}
    return lambda total, video_fps: video_frame_indices(
        total, video_fps, **options, video_start=item.get("video_start"), video_end=item.get("video_end")
    )


def fetch_video(video: Any) -> tuple[np.ndarray, VideoMetadata]:
    """A video → (frames uint8[n, H, W, 3], VideoMetadata).

    `video`: a qwen-vl-utils item {"video": source, "fps"?, "nframes"?, "min_frames"?, "max_frames"?,
    "video_start"?, "video_end"?, ...} or a bare source. A source is a video file (local, "file://" or
    remote path, or its bytes: decoded, frames picked by the rule above), or already-sampled frames kept as
    they are: a folder of images, a .npy uint8[T, H, W, 3], an array or a list of frames.
    """
    item = dict(video) if isinstance(video, Mapping) else {"video": video}
    source = item.get("video")
    if source is None:
        raise ValueError("a video item needs a 'video' value: a file path, a folder of frames, an array or frames")
    frames = video_decode.load_frames(source)
    if frames is not None:
        fps = float(item.get("sample_fps") or item.get("fps") or VIDEO_FPS)
        return frames, VideoMetadata(fps, len(frames), np.arange(len(frames)), fps)
    frames, fps, total, indices = video_decode.decode_video_file(source, _item_indices(item))
    start, end = video_frame_range(total, fps, item.get("video_start"), item.get("video_end"))
    return frames, VideoMetadata(fps, total, indices, len(indices) / (end - start + 1) * fps)


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
        raise TypeError("preprocess_video takes frames: decode the video file with fetch_video(path) first")
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
    by repeating the last frame, so gt = ceil(T / tp). Use fetch_video first for a file or a raw video.
    """
    images = _frames_to_rgb_arrays(frames)
    n = len(images) + (-len(images) % temporal_patch_size)
    width, height = images[0].size
    h, w = video_frame_size(n, height, width, min_pixels, max_pixels, total_pixels, patch_size * merge_size)
    pixels = np.stack([resize_rgb(img, h, w) for img in images])  # [T, h, w, 3]
    pixels = pad_frame_count(pixels, temporal_patch_size)
    normalized = normalize_frames(pixels, image_mean, image_std, rescale_factor)
    return patchify(normalized, patch_size, temporal_patch_size, merge_size)

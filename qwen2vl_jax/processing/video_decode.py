"""Video sources → uint8 frames: files decoded with PyAV (ffmpeg) in one pass; frame folders, .npy, frame lists.

    decode_video_file(source, pick) ──count packets (demux, no decoding)──► (total_frames, average fps)
        ──pick(total, fps) → indices──► decode once, converting only the picked frames to RGB
        ──► (frames uint8[n, H, W, 3], fps, total_frames, indices)
    load_frames(source) → uint8[T, H, W, 3] for a frame folder / .npy / array / list of frames; None for a file

A source path may be local, "file://..." or remote ("gs://..." and anything etils.epath opens; read to bytes).
The frame count is the number of non-empty video packets, which equals the decoded frame count for the
containers and codecs we know (mp4/mov/avi/mkv/webm/gif with h264, mpeg4, vp8/9, ffv1, gif); when the
decoder disagrees (edit lists, a truncated tail) the decoded count wins and the frames are picked again.
The display matrix (phone videos shot in portrait: rotate=90) is applied: frames come out upright.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from qwen2vl_jax.processing.loading import is_remote, load_image, local_path, read_source

VIDEO_FETCH_TIMEOUT_S = 120.0  # a video URL: connect, every read and the whole download
VIDEO_FETCH_MAX_BYTES = 2 << 30  # a video URL larger than this is refused
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
Pick = Callable[[int, float], np.ndarray]  # (total_frames, video_fps) → int64[n] frame indices


def _epath(path: str):
    from etils import epath  # local or gs://

    return epath.Path(local_path(path))


def _read_bytes(path: str) -> bytes:
    """A remote (http(s), gs://, ...) or local video file's bytes; FileNotFoundError naming it when it is missing."""
    return read_source(path, what="video", timeout=VIDEO_FETCH_TIMEOUT_S, max_bytes=VIDEO_FETCH_MAX_BYTES)


# ---------------------------------------------------------------- frame folders, .npy, frame lists


def _as_frame(frame: Any) -> np.ndarray:
    if isinstance(frame, (str, os.PathLike)) and is_remote(os.fspath(frame)):
        frame = _read_bytes(os.fspath(frame))
    return np.asarray(load_image(frame))


def frames_to_array(frames: Any, name: str) -> np.ndarray:
    """uint8[T, H, W, 3] as is; any other array or list of frames (anything load_image takes) → uint8[T, H, W, 3]."""
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3:
        return frames
    if isinstance(frames, np.ndarray) and frames.ndim not in (3, 4):
        raise ValueError(f"video {name}: a frame array must be [T, H, W] or [T, H, W, C]; got shape {frames.shape}")
    arrays = [_as_frame(f) for f in frames]
    if not arrays:
        raise ValueError(f"video {name} has no frames")
    sizes = sorted({a.shape[:2] for a in arrays})
    if len(sizes) > 1:
        raise ValueError(f"video {name}: all frames must have one size; got (height, width) sizes {sizes}")
    return np.stack(arrays)


def load_frames(source: Any) -> np.ndarray | None:
    """Already-sampled frames → uint8[T, H, W, 3]: a folder of images (name order), a .npy file, an array or a
    list of frames. None when `source` is a video file (or bytes of one) to decode."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return None
    if not isinstance(source, (str, os.PathLike)):
        return frames_to_array(source, f"<{type(source).__name__}>")
    path = os.fspath(source)
    p = _epath(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"video folder {path!r} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
        return frames_to_array([f.read_bytes() for f in files], repr(path))
    if path.lower().endswith(".npy"):
        return frames_to_array(np.load(io.BytesIO(_read_bytes(path))), repr(path))
    return None


# ---------------------------------------------------------------- video files


def _media(source: Any) -> tuple[str | bytes, str]:
    """→ (local path or the file's bytes, a name for messages)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), f"<{len(source)} bytes>"
    path = os.fspath(source)
    if is_remote(path):
        return _read_bytes(path), repr(path)
    if not os.path.isfile(local_path(path)):
        raise FileNotFoundError(f"video file not found: {path!r}")
    return local_path(path), repr(path)


def _open(media: str | bytes, name: str):
    """An open PyAV container with a video stream; ValueError naming the file when ffmpeg cannot read it."""
    import av

    try:
        container = av.open(io.BytesIO(media) if isinstance(media, bytes) else media, mode="r")
    except (av.FFmpegError, UnicodeDecodeError) as e:
        raise ValueError(
            f"cannot read video {name}: not a video ffmpeg can read, or the file is truncated or corrupt ({e}); "
            "re-download it, re-encode it (e.g. to H.264 mp4) or pass its frames (a folder of images or a .npy)"
        ) from e
    if not container.streams.video:
        container.close()
        raise ValueError(f"video {name} holds no video stream (audio only or not a video); pass a video file")
    return container


def _probe(media: str | bytes, name: str) -> tuple[int, float]:
    """(frame count, average fps) without decoding: counts the stream's non-empty packets."""
    import av

    with _open(media, name) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        total = 0
        try:
            total = sum(1 for packet in container.demux(stream) if packet.size)
        except av.FFmpegError:  # a truncated file: the packets up to the damage count, decoding settles the rest
            pass
    if not rate or rate <= 0:
        raise ValueError(f"video {name} has no frame rate; re-encode it with a constant frame rate")
    return total, float(rate)


def _upright(frame) -> np.ndarray:
    """A decoded frame → uint8[H, W, 3] RGB, turned by its display matrix (counter-clockwise degrees)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round(getattr(frame, "rotation", 0) / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, turns)) if turns else rgb


def _decode_at(media: str | bytes, name: str, indices: np.ndarray, to_end: bool) -> tuple[np.ndarray | None, int]:
    """(frames uint8[n, H, W, 3] at the `indices`, or None when the stream ends before the last one; frames decoded).

    The picked frames are written straight into the output (peak memory: the n frames, not 2n or the whole clip).
    Stops after the last index unless `to_end`."""
    import av

    slots: dict[int, list[int]] = {}
    for position, index in enumerate(indices.tolist()):
        slots.setdefault(index, []).append(position)
    out, filled, count, last = None, 0, 0, int(indices.max())
    with _open(media, name) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                if count in slots:
                    rgb = _upright(frame)
                    if out is None:
                        out = np.empty((len(indices), *rgb.shape), np.uint8)
                    elif rgb.shape != out.shape[1:]:
                        raise ValueError(f"video {name} changes frame size mid-stream ({out.shape[1:3]} → "
                                         f"{rgb.shape[:2]}); re-encode it at one size")
                    out[slots[count]] = rgb
                    filled += len(slots[count])
                count += 1
                if count > last and not to_end:
                    break
        except av.FFmpegError:  # damaged tail: keep the frames decoded so far
            pass
    return (out if filled == len(indices) else None), count


def decode_video_file(source: Any, pick: Pick) -> tuple[np.ndarray, float, int, np.ndarray]:
    """A video file → (frames uint8[n, H, W, 3] at pick(total, fps), fps, total_frames, indices int64[n]).

    One decoding pass; only the picked frames are kept. A second pass happens only when the decoder
    yields a different frame count than the packets said (the decoded count then decides, frames picked again).
    """
    media, name = _media(source)
    total, fps = _probe(media, name)
    empty = ValueError(
        f"no frame of video {name} could be decoded (empty, truncated or corrupt file); re-download or re-encode it"
    )
    if total == 0:
        raise empty
    indices = np.asarray(pick(total, fps), np.int64)
    to_end = int(indices.max()) == total - 1  # decoding to the end anyway: check the count on the way
    frames, decoded = _decode_at(media, name, indices, to_end)
    if frames is None or (to_end and decoded != total):
        if decoded == 0:
            raise empty
        total = decoded
        indices = np.asarray(pick(total, fps), np.int64)
        frames, _ = _decode_at(media, name, indices, to_end=False)
        if frames is None:
            raise ValueError(f"video {name} decodes differently on a second pass; re-encode it")
    return frames, fps, total, indices

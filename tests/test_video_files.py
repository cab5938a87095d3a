"""Video files: decoding with PyAV (mp4/mov/avi/mkv/webm/gif), qwen-vl-utils 0.0.14's frame choice, rotation,
already-sampled frames, errors, and the Processor / data pipeline taking files.

Clips are encoded here with PyAV (tiny frames, frame number in the pixel values). The frame choice is checked
against an independent transcription of qwen-vl-utils' `calculate_video_frame_range` + `smart_nframes` +
`torch.linspace(start, end, n).round()`, and the decoded pixels against a full PyAV decode at those indices.
"""

import math
import os

import av
import numpy as np
import pytest
import torch

from qwen2vl_jax.processing import Processor, fetch_video, preprocess_video, video_frame_indices
from qwen2vl_jax.processing import video_decode
from fake_gcs import gcs  # noqa: F401 (fixture)
from qwen2vl_jax.processing.fixtures import write_tiny_processor
from qwen2vl_jax.processing.video import QWEN2VL_RELEASE_TOTAL_PIXELS, VIDEO_TOTAL_PIXELS

W, H = 64, 48


# ---------------------------------------------------------------- qwen-vl-utils 0.0.14, transcribed


def reference_range(item: dict, total: int, video_fps: float) -> tuple[int, int]:
    """qwen-vl-utils 0.0.14 calculate_video_frame_range: (start_frame, end_frame), inclusive."""
    if video_fps <= 0 or total <= 0:
        raise ValueError("no frames")
    start_s, end_s = item.get("video_start"), item.get("video_end")
    start, end = 0, total - 1
    if start_s is not None or end_s is not None:
        duration = total / video_fps
        if start_s is not None:
            start = math.ceil(max(0.0, min(start_s, duration)) * video_fps)
        if end_s is not None:
            end = min(math.floor(max(0.0, min(end_s, duration)) * video_fps), total - 1)
        if start >= end:
            raise ValueError("empty range")
    return start, end


def reference_indices(item: dict, total: int, video_fps: float) -> list[int]:
    """qwen-vl-utils 0.0.14 (torchcodec / decord readers): frame range, smart_nframes, torch.linspace."""
    start, end = reference_range(item, total, video_fps)
    count = end - start + 1
    assert not ("fps" in item and "nframes" in item)
    if "nframes" in item:
        n = round(item["nframes"] / 2) * 2
    else:
        min_frames = math.ceil(item.get("min_frames", 4) / 2) * 2
        max_frames = math.floor(item.get("max_frames", min(768, count)) / 2) * 2
        n = count / video_fps * item.get("fps", 2.0)
        n = math.floor(min(min(max(n, min_frames), max_frames), count) / 2) * 2
    if not 2 <= n <= count:
        raise ValueError(f"nframes {n} outside [2, {count}]")
    return torch.linspace(start, end, n).round().long().tolist()


# ---------------------------------------------------------------- clips


def frame_pixels(i: int) -> np.ndarray:
    """uint8[H, W, 3]: frame i's number as 16 black/white 8×8 blocks (bits, rows 16 and 32; they survive any
    codec, GIF's palette included) and a white mark in the top-left corner (rows 0..7, columns 0..11)."""
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[:8, :12] = 255
    for bit in range(16):
        if i >> bit & 1:
            row, col = 16 + 16 * (bit // 8), 8 * (bit % 8)
            rgb[row : row + 8, col : col + 8] = 255
    return rgb


def frame_number(rgb: np.ndarray) -> int:
    """frame_pixels' number, read back from a decoded (upright) frame."""
    bits = [rgb[18 + 16 * (b // 8) : 22 + 16 * (b // 8), 8 * (b % 8) + 2 : 8 * (b % 8) + 6].mean() > 128
            for b in range(16)]
    return sum(1 << b for b, on in enumerate(bits) if on)


def encode(path, codec, n, fps=24, pix_fmt="yuv420p", options=None, rotation=None):
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_pixels(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def full_decode(path) -> tuple[np.ndarray, float]:
    """Every frame (uint8[T, H, W, 3], no rotation applied) and the stream's average rate."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return np.stack(frames), float(stream.average_rate)


FORMATS = {  # name → (codec, pix_fmt, options, fps)
    "h264.mp4": ("libx264", "yuv444p", {"crf": "0", "preset": "ultrafast"}, 24),
    "mpeg4.mp4": ("mpeg4", "yuv420p", {}, 24),
    "h264.mov": ("libx264", "yuv420p", {"preset": "ultrafast"}, 30),
    "mpeg4.avi": ("mpeg4", "yuv420p", {}, 25),
    "ffv1.mkv": ("ffv1", "yuv444p", {}, 24),
    "vp9.webm": ("libvpx-vp9", "yuv420p", {"deadline": "realtime", "cpu-used": "8"}, 24),
    "vp8.webm": ("libvpx", "yuv420p", {"deadline": "realtime", "cpu-used": "8"}, 24),
    "clip.gif": ("gif", "rgb8", {}, 10),  # GIF delays are centiseconds: 10 fps is exact
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    out = {}
    for name, (codec, pix_fmt, options, fps) in FORMATS.items():
        if codec not in av.codecs_available:
            continue
        out[name] = encode(folder / name, codec, 37, fps, pix_fmt, options)
    out["61s.mp4"] = encode(folder / "61s.mp4", "mpeg4", 61 * 24, 24)
    out["0.4s.mp4"] = encode(folder / "0.4s.mp4", "libx264", 10, 24, options={"preset": "ultrafast"})
    out["1frame.mp4"] = encode(folder / "1frame.mp4", "libx264", 1, 24, options={"preset": "ultrafast"})
    out["1frame.gif"] = encode(folder / "1frame.gif", "gif", 1, 10, "rgb8")
    return out


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return Processor.from_pretrained(write_tiny_processor(tmp_path_factory.mktemp("ckpt")))


# ---------------------------------------------------------------- frame choice


ITEMS = [
    {},
    {"fps": 1},
    {"fps": 8},
    {"nframes": 7},
    {"nframes": 10},
    {"min_frames": 6, "max_frames": 10},
    {"fps": 12, "max_frames": 9},
    {"video_start": 0.3, "video_end": 1.2},
    {"video_start": 0.5},
    {"video_end": 1.0, "fps": 4},
    {"video_start": -3, "video_end": 99},
]


def test_rule_equals_qwen_vl_utils_without_files():
    for total in (2, 3, 9, 10, 37, 100, 301, 1464, 30000):
        for video_fps in (1.0, 7.5, 24.0, 29.97, 60.0):
            for item in ITEMS:
                try:
                    expected = reference_indices(item, total, video_fps)
                except (ValueError, AssertionError):
                    with pytest.raises(ValueError):
                        video_frame_indices(total, video_fps, **item)
                    continue
                assert video_frame_indices(total, video_fps, **item).tolist() == expected, (total, video_fps, item)


def test_every_format_decodes_the_right_frames(clips):
    """Per container/codec: frame count and fps as a full decode sees them, qwen-vl-utils' indices, the pixels
    of a full decode at those indices (frames all differ, so a wrong index shows)."""
    for name in FORMATS:
        if name not in clips:
            continue
        everything, rate = full_decode(clips[name])
        assert [frame_number(f) for f in everything] == list(range(37)), name
        for item in ({}, {"nframes": 7}, {"video_start": 0.3, "video_end": 1.2}):
            frames, meta = fetch_video({"type": "video", "video": clips[name], **item})
            expected = reference_indices(item, len(everything), rate)
            assert meta.total_frames == len(everything) == 37 and meta.fps == rate, name
            assert meta.frame_indices.tolist() == expected, (name, item)
            np.testing.assert_array_equal(frames, everything[expected], err_msg=name)


@pytest.mark.parametrize("item", ITEMS, ids=[str(i) for i in ITEMS])
def test_options_on_a_long_clip(clips, item):
    path = clips["h264.mp4"] if "video_start" in item or "video_end" in item else clips["61s.mp4"]
    everything, rate = full_decode(path)
    frames, meta = fetch_video({"video": path, **item})
    expected = reference_indices(item, len(everything), rate)
    assert meta.frame_indices.tolist() == expected
    np.testing.assert_array_equal(frames, everything[expected])
    assert [frame_number(f) for f in frames] == expected
    start, end = reference_range(item, len(everything), rate)
    assert meta.sample_fps == pytest.approx(len(expected) / (end - start + 1) * rate)


def test_61_seconds_at_24_fps(clips):
    frames, meta = fetch_video(clips["61s.mp4"])
    assert (meta.total_frames, meta.fps) == (1464, 24.0)
    assert len(frames) == 122 and meta.sample_fps == pytest.approx(2.0)
    assert meta.frame_indices.tolist() == reference_indices({}, 1464, 24.0)


def test_short_clips(clips):
    frames, meta = fetch_video(clips["0.4s.mp4"])  # 10 frames: min_frames 4
    assert meta.frame_indices.tolist() == [0, 3, 6, 9] == reference_indices({}, 10, 24.0)
    # 1 frame: qwen-vl-utils raises; we keep the frame and preprocess_video repeats it (grid t = 1)
    for name in ("1frame.mp4", "1frame.gif"):
        with pytest.raises(ValueError):
            reference_indices({}, 1, 24.0)
        frames, meta = fetch_video(clips[name])
        assert frames.shape == (1, H, W, 3) and meta.frame_indices.tolist() == [0] and meta.total_frames == 1
        _, grid = preprocess_video(frames)
        assert grid[0] == 1


def test_option_errors(clips):
    with pytest.raises(ValueError, match="either 'fps' or 'nframes'"):
        fetch_video({"video": clips["h264.mp4"], "fps": 1, "nframes": 4})
    with pytest.raises(ValueError, match="video_start"):
        fetch_video({"video": clips["h264.mp4"], "video_start": 1.2, "video_end": 0.5})
    with pytest.raises(ValueError, match="nframes"):
        fetch_video({"video": clips["h264.mp4"], "nframes": 100})


# ---------------------------------------------------------------- rotation, sources


@pytest.mark.parametrize("rotation, turns", [(90, 1), (-90, 3), (180, 2)])
def test_display_matrix_is_applied(tmp_path, rotation, turns):
    """PyAV writes the display matrix; frame.rotation reads it back (counter-clockwise degrees). A phone's
    rotate=90 tag is rotation -90: the picture turns clockwise, the top-left mark goes top-right."""
    path = encode(tmp_path / "rotated.mp4", "libx264", 4, options={"crf": "0"}, pix_fmt="yuv444p",
                  rotation=rotation)
    raw, _ = full_decode(path)
    frames, _ = fetch_video(path)
    np.testing.assert_array_equal(frames, np.rot90(raw, turns, axes=(1, 2)))
    mark = np.argwhere(frames[0, ..., 2] > 200).mean(0)  # where the white mark is (row, col)
    tall = (W, H) if turns % 2 else (H, W)
    assert frames.shape[1:3] == tall
    expected_corner = {1: (1, 0), 3: (0, 1), 2: (1, 1)}[turns]  # (bottom?, right?)
    assert (mark[0] > tall[0] / 2, mark[1] > tall[1] / 2) == tuple(map(bool, expected_corner))


def test_path_forms(clips, gcs):
    path = clips["h264.mp4"]
    frames, meta = fetch_video(path)
    for source in ("file://" + path, open(path, "rb").read()):
        again, again_meta = fetch_video(source)
        np.testing.assert_array_equal(again, frames)
        assert again_meta.frame_indices.tolist() == meta.frame_indices.tolist()
    # remote: read to bytes through etils.epath (the in-memory gs:// of tests/fake_gcs.py)
    from etils import epath

    epath.Path("gs://bucket/clip.mp4").write_bytes(open(path, "rb").read())
    remote, _ = fetch_video({"video": "gs://bucket/clip.mp4"})
    np.testing.assert_array_equal(remote, frames)
    with pytest.raises(FileNotFoundError, match="gs://bucket/nope.mp4"):
        fetch_video("gs://bucket/nope.mp4")


def test_already_sampled_frames(tmp_path):
    from PIL import Image

    video = np.stack([frame_pixels(i) for i in range(5)])
    np.save(tmp_path / "frames.npy", video)
    (tmp_path / "folder").mkdir()
    for i, f in enumerate(video):
        Image.fromarray(f).save(tmp_path / "folder" / f"{i:03d}.png")
    for source in (video, list(video), [Image.fromarray(f) for f in video], str(tmp_path / "frames.npy"),
                   str(tmp_path / "folder")):
        frames, meta = fetch_video(source)
        np.testing.assert_array_equal(frames, video)
        assert meta.frame_indices.tolist() == list(range(5)) and meta.sample_fps == meta.fps == 2.0
    _, meta = fetch_video({"video": video, "fps": 4})
    assert meta.sample_fps == 4.0
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no frame images"):
        fetch_video(str(tmp_path / "empty"))


def test_unreadable_files_are_named(tmp_path, clips):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        fetch_video(str(tmp_path / "missing.mp4"))
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(3000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    data = open(clips["vp9.webm"] if "vp9.webm" in clips else clips["ffv1.mkv"], "rb").read()
    (tmp_path / "header_only.webm").write_bytes(data[: len(data) // 50])
    for name in ("garbage.mp4", "empty.mp4", "header_only.webm"):
        with pytest.raises(ValueError, match=name):
            fetch_video(str(tmp_path / name))
    with av.open(str(tmp_path / "sound.wav"), "w") as container:  # audio only
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            container.mux(packet)
    with pytest.raises(ValueError, match="no video stream"):
        fetch_video(str(tmp_path / "sound.wav"))


def test_truncated_tail_keeps_the_decodable_frames(tmp_path, clips):
    data = open(clips["ffv1.mkv"], "rb").read()
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) * 2 // 3])
    everything, rate = full_decode_tolerant(tmp_path / "cut.mkv")
    frames, meta = fetch_video(str(tmp_path / "cut.mkv"))
    assert 0 < meta.total_frames == len(everything) < 37
    assert meta.frame_indices.tolist() == reference_indices({}, len(everything), rate)
    np.testing.assert_array_equal(frames, everything[meta.frame_indices])


@pytest.mark.parametrize("miscount", [-5, 5])
def test_a_packet_count_the_decoder_disagrees_with_is_corrected(clips, monkeypatch, miscount):
    """Should packets and decoded frames differ (edit lists, damage), the decoded count picks the frames."""
    probe = video_decode._probe
    monkeypatch.setattr(video_decode, "_probe", lambda *a: (probe(*a)[0] + miscount, probe(*a)[1]))
    everything, rate = full_decode(clips["61s.mp4"])
    frames, meta = fetch_video(clips["61s.mp4"])
    assert meta.total_frames == len(everything)
    assert meta.frame_indices.tolist() == reference_indices({}, len(everything), rate)
    np.testing.assert_array_equal(frames, everything[meta.frame_indices])


def full_decode_tolerant(path):
    frames = []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        try:
            for f in container.decode(stream):
                frames.append(f.to_ndarray(format="rgb24"))
        except av.FFmpegError:
            pass
        return np.stack(frames), float(stream.average_rate)


# ---------------------------------------------------------------- Processor and data pipeline


def _conversation(video_item):
    return [{"role": "user", "content": [video_item, {"type": "text", "text": "Describe the video."}]}]


def test_processor_takes_files_like_frames(clips, processor):
    path = clips["h264.mp4"]
    everything, rate = full_decode(path)
    indices = reference_indices({}, len(everything), rate)
    frames = everything[indices]
    expected = processor(_conversation({"type": "video"}), videos=[frames])
    # Qwen2.5-VL's seconds per frame-pair: temporal_patch_size / the sampled fps (frames kept / frames spanned · fps);
    # the bare frames count as 2 fps
    sampled_fps = len(indices) / len(everything) * rate
    for batch in (processor(_conversation({"type": "video", "video": path})),
                  processor(_conversation({"type": "video"}), videos=[path])):
        assert batch.keys() == expected.keys()
        for key in set(expected) - {"second_per_grid_ts"}:
            np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
        np.testing.assert_allclose(batch["second_per_grid_ts"], [2 / sampled_fps], rtol=1e-6)
        assert expected["second_per_grid_ts"].tolist() == [1.0]


def test_processor_applies_item_options(clips, processor):
    import dataclasses

    path = clips["h264.mp4"]
    everything, rate = full_decode(path)
    pixels = {"min_pixels": 2 * 28 * 28, "max_pixels": 3 * 28 * 28}  # 48×64 frames shrink to 28×56
    item = {"type": "video", "video": path, "fps": 8, **pixels}
    frames = everything[reference_indices({"fps": 8}, len(everything), rate)]
    narrow = Processor(processor.tokenizer, processor.image_options,
                       dataclasses.replace(processor.video_options, **pixels))
    expected = narrow(_conversation({"type": "video"}), videos=[frames])
    batch = processor(_conversation(item))
    for key in set(expected) - {"second_per_grid_ts"}:
        np.testing.assert_array_equal(batch[key], expected[key], err_msg=key)
    default = processor(_conversation({"type": "video", "video": path}))
    assert batch["video_grid_thw"][0, 0] == len(frames) // 2 > default["video_grid_thw"][0, 0]
    assert batch["video_grid_thw"][0, 1:].tolist() == [2, 4] != default["video_grid_thw"][0, 1:].tolist()


def test_video_budgets():
    assert VIDEO_TOTAL_PIXELS == 115200 * 28 * 28 and QWEN2VL_RELEASE_TOTAL_PIXELS == 24576 * 28 * 28
    from qwen2vl_jax.processing.video import video_frame_size

    # 200 frames of 720p: 115200·28²/200·2 > 768·28² → the per-frame cap 768·28²; 24576·28²/200·2 = 192675.84
    # → beta = sqrt(720·1280 / 192675.84) = 2.187 → (floor28(329.2), floor28(585.3))
    assert video_frame_size(200, 720, 1280) == (560, 1008)
    assert video_frame_size(200, 720, 1280, total_pixels=QWEN2VL_RELEASE_TOTAL_PIXELS) == (308, 560)


def test_training_records_carry_video_options(clips, processor, tmp_path):
    import json
    import shutil

    from data_pipeline.sources import JsonlSource
    from data_pipeline.transforms import ToExample

    shutil.copy(clips["h264.mp4"], tmp_path / "clip.mp4")
    answer = {"role": "assistant", "content": [{"type": "text", "text": "A cat sits on the mat."}]}
    lines = [{"messages": _conversation({"type": "video", "video": "clip.mp4", "fps": 8}) + [answer]},
             {"messages": _conversation({"type": "video", "video": "clip.mp4"}) + [answer]}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    source = JsonlSource(tmp_path / "data.jsonl")
    with_options, plain = source[0], source[1]
    assert with_options["videos"] == [{"video": str(tmp_path / "clip.mp4"), "fps": 8}]
    assert plain["videos"] == [str(tmp_path / "clip.mp4")]
    to_example = ToExample(processor, max_length=4096, max_vision_rows=100_000)
    for record in (with_options, plain):
        example = to_example.map(record)
        assert "error" not in example, example.get("error")
        reference = processor(record["messages"], videos=record["videos"], add_generation_prompt=False)
        np.testing.assert_array_equal(example["video_grid_thw"], reference["video_grid_thw"])
        np.testing.assert_array_equal(example["input_ids"], reference["input_ids"][0])
    bad = to_example.map({"messages": lines[1]["messages"], "videos": [str(tmp_path / "gone.mp4")], "id": "b"})
    assert "gone.mp4" in bad["error"]

"""Video preprocessing: qwen-vl-utils frame sampling and pixel budget, patch layout, identity with images.

transformers' Qwen2VLVideoProcessor needs torchvision (not installed), so the layout is checked patch by
patch against direct slicing, and a 2-frame video of one image against the image path (which is itself
checked against transformers in test_processing_image.py).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl_jax.processing import (
    preprocess_image,
    preprocess_video,
    sample_video_frames,
    video_frame_indices,
    video_frame_size,
)
from qwen2vl_jax.processing.video import QWEN2VL_RELEASE_TOTAL_PIXELS, num_sampled_frames


def frames(t, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- frame sampling


@pytest.mark.parametrize(
    "total, video_fps, expected",
    [
        (100, 25.0, [0, 14, 28, 42, 57, 71, 85, 99]),  # 4 s at 2 fps → 8 frames
        (10, 2.0, list(range(10))),  # already 2 fps
        (3, 30.0, [0, 2]),  # too short for 4 frames: floor(3 / 2)·2 = 2
        (9, 30.0, [0, 3, 5, 8]),  # 0.3 s → min_frames 4; linspace(0, 8, 4) = 0, 2.67, 5.33, 8
    ],
)
def test_frame_indices_literal(total, video_fps, expected):
    assert video_frame_indices(total, video_fps).tolist() == expected


def test_frame_counts():
    assert num_sampled_frames(300, 30.0) == 20  # 10 s
    assert num_sampled_frames(30000, 30.0) == 768  # 1000 s: capped at 768
    assert num_sampled_frames(301, 30.0) == 20  # 20.07 → floor to even
    assert num_sampled_frames(330, 30.0) == 22
    assert num_sampled_frames(1000, 10.0, fps=1.0) == 100
    assert len(video_frame_indices(1000, 10.0, nframes=7)) == 8  # nframes rounds to even (3.5 → 4 pairs)
    with pytest.raises(ValueError, match="1 frame"):
        num_sampled_frames(1, 30.0)


def test_frame_indices_match_torch_linspace():
    """qwen-vl-utils: torch.linspace(0, total - 1, n).round() (float32, halves to even)."""
    for total in range(2, 1200, 7):
        for video_fps in (1.0, 7.5, 24.0, 29.97, 60.0):
            n = num_sampled_frames(total, video_fps)
            expected = torch.linspace(0, total - 1, n).round().long().numpy()
            np.testing.assert_array_equal(video_frame_indices(total, video_fps), expected)


def test_sample_video_frames_keeps_container():
    video = frames(50, 8, 8)
    sampled = sample_video_frames(video, video_fps=25.0)
    indices = video_frame_indices(50, 25.0)
    assert isinstance(sampled, np.ndarray) and len(sampled) == len(indices) == 4
    np.testing.assert_array_equal(sampled, video[indices])
    as_list = sample_video_frames(list(video), video_fps=25.0)
    assert isinstance(as_list, list) and all(np.array_equal(a, b) for a, b in zip(as_list, sampled))


# ---------------------------------------------------------------- per-frame pixel budget


def test_frame_size_budget():
    # 4 frames: per-frame cap 768·28² wins
    assert video_frame_size(4, 1080, 1920) == (560, 1008)
    # 768 frames, default budget 115200·28²: 115200·28² / 768 · 2 = 300·28² per frame
    assert video_frame_size(768, 1080, 1920) == (336, 644)
    # the release budget 24576·28², 100 frames: 24576·28² / 100 · 2 = 385351.68 per frame
    release = QWEN2VL_RELEASE_TOTAL_PIXELS
    assert video_frame_size(100, 1080, 1920, total_pixels=release) == (448, 812)
    # 768 frames: the budget falls under 1.05·min_pixels, which then wins (floors may land below min)
    assert video_frame_size(768, 1080, 1920, total_pixels=release) == (224, 420)
    # no whole-video budget: only the per-frame cap
    assert video_frame_size(768, 1080, 1920, total_pixels=None) == (560, 1008)
    # small frames are scaled up to min_pixels = 128·28²
    h, w = video_frame_size(8, 100, 100)
    assert (h, w) == (336, 336) and h * w >= 128 * 28 * 28
    # an explicit max_pixels can only lower the cap
    assert video_frame_size(4, 1080, 1920, max_pixels=200 * 28 * 28) == video_frame_size(
        4, 1080, 1920, max_pixels=200 * 28 * 28, total_pixels=None
    )


# ---------------------------------------------------------------- patches


def test_two_identical_frames_equal_the_image():
    image = frames(1, 333, 517, seed=3)[0]
    bounds = {"min_pixels": 100 * 28 * 28, "max_pixels": 256 * 28 * 28}
    image_values, image_grid = preprocess_image(Image.fromarray(image), **bounds)
    video_values, video_grid = preprocess_video(np.stack([image, image]), **bounds, total_pixels=None)
    np.testing.assert_array_equal(video_grid, image_grid)
    np.testing.assert_array_equal(video_values, image_values)


def test_video_patch_layout_by_index():
    """Rows (t, h-block, w-block, h-in-block, w-in-block), features (C, t, ph, pw), on distinct frames
    already at a valid size (so no resize happens)."""
    video = frames(6, 56, 84, seed=1)
    values, grid = preprocess_video(video, min_pixels=1, max_pixels=56 * 84)
    assert grid.tolist() == [3, 4, 6] and values.shape == (3 * 4 * 6, 1176)
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    normalized = ((video / 255).astype(np.float32) - mean) / std  # [T, H, W, C]
    r = 0
    for t in range(3):
        for bh in range(2):
            for bw in range(3):
                for ih in range(2):
                    for iw in range(2):
                        y, x = (2 * bh + ih) * 14, (2 * bw + iw) * 14
                        patch = normalized[2 * t : 2 * t + 2, y : y + 14, x : x + 14, :]  # (t, ph, pw, C)
                        np.testing.assert_allclose(values[r], patch.transpose(3, 0, 1, 2).reshape(-1), atol=1e-6)
                        r += 1


def test_odd_frame_count_repeats_last_frame():
    video = frames(3, 56, 56, seed=2)
    values, grid = preprocess_video(video, min_pixels=1, max_pixels=56 * 56)
    padded, padded_grid = preprocess_video(np.concatenate([video, video[-1:]]), min_pixels=1, max_pixels=56 * 56)
    assert grid.tolist() == [2, 4, 4]
    np.testing.assert_array_equal(grid, padded_grid)
    np.testing.assert_array_equal(values, padded)


def test_resized_video_matches_per_frame_images():
    """A resized 4-frame video = its frame pairs' images, when the frames of each pair are equal."""
    a, b = frames(2, 200, 300, seed=4)
    video = np.stack([a, a, b, b])
    values, grid = preprocess_video(video)  # default bounds: 128·28² .. 768·28²
    h, w = video_frame_size(4, 200, 300)
    assert (h, w) == (280, 392)  # scaled up to min_pixels 128·28²
    for i, image in enumerate((a, b)):
        resized = Image.fromarray(image).resize((w, h), Image.Resampling.BICUBIC)  # PIL bicubic, as for images
        image_values, image_grid = preprocess_image(resized, min_pixels=1, max_pixels=h * w)
        assert image_grid.tolist() == [1, h // 14, w // 14]
        per_pair = len(image_values)
        np.testing.assert_array_equal(values[i * per_pair : (i + 1) * per_pair], image_values)
    assert grid.tolist() == [2, h // 14, w // 14]


def test_frame_inputs_agree_and_errors():
    video = frames(4, 60, 90, seed=5)
    from_array = preprocess_video(video)
    from_list = preprocess_video([Image.fromarray(f) for f in video])
    np.testing.assert_array_equal(from_array[0], from_list[0])
    np.testing.assert_array_equal(from_array[1], from_list[1])
    with pytest.raises(ValueError, match="one size"):
        preprocess_video([video[0], video[1][:50]])
    with pytest.raises(TypeError, match="decode the video"):
        preprocess_video("clip.mp4")
    with pytest.raises(ValueError, match="no frames"):
        preprocess_video([])

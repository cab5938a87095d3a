"""Image preprocessing: smart_resize, load_image, preprocess_image vs transformers' PIL processor."""

import base64
import functools
import io

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qwen2vl_jax.processing import load_image, patchify, preprocess_image, smart_resize

DEFAULT = {}
CUSTOM = {"min_pixels": 100 * 28 * 28, "max_pixels": 256 * 28 * 28}
ATOL = 1e-5  # observed: bit-identical (0.0); one bicubic step is 1/255/0.27 ≈ 0.015


@functools.lru_cache(maxsize=None)
def noise(height, width, channels=3, seed=0):
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def hf_processor(pixels_name):
    return Qwen2VLImageProcessorPil(**{"default": DEFAULT, "custom": CUSTOM}[pixels_name])


def hf_preprocess(image, pixels_name):
    out = hf_processor(pixels_name)(image, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def assert_matches_transformers(image, pixels_name):
    expected_values, expected_grid = hf_preprocess(image, pixels_name)
    values, grid = preprocess_image(image, **{"default": DEFAULT, "custom": CUSTOM}[pixels_name])
    assert grid.dtype == np.int64 and grid.shape == (3,)
    np.testing.assert_array_equal(grid[None], expected_grid)
    assert values.dtype == np.float32 and values.shape == expected_values.shape
    np.testing.assert_allclose(values, expected_values, rtol=0, atol=ATOL)


# ---------------------------------------------------------------- the reference and its defaults


def test_reference_class_and_defaults():
    processor = Qwen2VLImageProcessorPil()
    assert type(processor).__name__ == "Qwen2VLImageProcessorPil"
    assert processor.size["shortest_edge"] == 56 * 56 == 3136
    assert processor.size["longest_edge"] == 28 * 28 * 1280 == 1003520
    assert (processor.patch_size, processor.temporal_patch_size, processor.merge_size) == (14, 2, 2)


# ---------------------------------------------------------------- smart_resize


@pytest.mark.parametrize(
    "size, expected",
    [
        ((224, 224), (224, 224)),
        ((1000, 600), (1008, 588)),
        ((37, 1500), (28, 1512)),
        ((28, 28), (56, 56)),
        ((3000, 4000), (840, 1148)),
    ],
)
def test_smart_resize_checked_sizes(size, expected):
    assert smart_resize(*size) == expected


def test_smart_resize_checked_grids_and_tokens():
    values, grid = preprocess_image(noise(224, 224))
    assert grid.tolist() == [1, 16, 16] and values.shape == (256, 1176)
    assert grid.prod() // 4 == 64
    assert smart_resize(1000, 600)[0] // 14 == 72 and smart_resize(1000, 600)[1] // 14 == 42


def test_smart_resize_rounding_and_bounds():
    # Python round: 70/28 = 2.5 → 2 and 42/28 = 1.5 → 2 (halves to even)
    assert smart_resize(70, 42, min_pixels=1) == (56, 56)
    assert smart_resize(98, 98, min_pixels=1) == (112, 112)  # 3.5 → 4
    # released max_pixels: 3000x4000 fits under 12845056 after rounding
    assert smart_resize(3000, 4000, max_pixels=12845056) == (2996, 4004)
    # min_pixels branch: ceil of the scaled size
    assert smart_resize(28, 28, min_pixels=100 * 28 * 28) == (280, 280)
    # a side under 14 rounds to 0, so transformers scales up through the min_pixels branch (no max(28, .))
    assert smart_resize(10, 1000) == (28, 560)
    for h, w in [(1, 1), (13, 2000), (5000, 5000), (12345, 678)]:
        rh, rw = smart_resize(h, w)
        assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28 and rh * rw <= 1003520


def test_smart_resize_matches_transformers_on_random_sizes():
    rng = np.random.default_rng(0)
    bounds = [{}, CUSTOM, {"min_pixels": 3136, "max_pixels": 12845056}, {"min_pixels": 1, "max_pixels": 28 * 28 * 4}]
    for _ in range(3000):
        h, w = (int(v) for v in np.exp(rng.uniform(0, np.log(8000), 2)).round() + 1)
        if max(h, w) / min(h, w) > 200:
            continue
        kwargs = bounds[rng.integers(len(bounds))]
        assert smart_resize(h, w, **kwargs) == hf_smart_resize(h, w, **kwargs), (h, w, kwargs)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(ValueError, match=r"aspect ratio 201\.0.*crop or pad"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(noise(4, 1000))
    assert smart_resize(10, 2000) == (28, 812)  # exactly 200 is allowed (10 rounds to 0: min_pixels branch)


# ---------------------------------------------------------------- parity with transformers (PIL backend)


@pytest.mark.parametrize("pixels_name", ["default", "custom"])
@pytest.mark.parametrize("size", [(224, 224), (1000, 600), (37, 1500), (28, 28), (3000, 4000), (10, 1000)])
def test_rgb_noise_matches_transformers(size, pixels_name):
    assert_matches_transformers(Image.fromarray(noise(*size)), pixels_name)


def _mode_image(mode):
    h, w = 333, 517
    rgb, gray = noise(h, w, 3, seed=1), noise(h, w, 1, seed=2)
    if mode == "L":
        return Image.fromarray(gray)
    if mode == "RGBA":
        return Image.fromarray(noise(h, w, 4, seed=3))  # random alpha: the compositing is visible everywhere
    if mode == "LA":
        return Image.fromarray(noise(h, w, 4, seed=4)).convert("LA")
    if mode == "P":
        return Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=200)
    if mode == "P_transparency":
        image = Image.fromarray(gray).convert("P")
        image.info["transparency"] = int(gray[0, 0])
        return image
    if mode == "RGB_transparency":
        image = Image.fromarray(rgb // 64 * 64)  # few colours, so the transparent one is common
        image.info["transparency"] = tuple(int(v) for v in image.getpixel((0, 0)))
        return image
    if mode == "La":  # premultiplied: transformers fails on it ("conversion from La to L not supported")
        return Image.fromarray(noise(h, w, 4, seed=6)).convert("LA").convert("La")
    if mode == "CMYK":
        return Image.fromarray(noise(h, w, 4, seed=5), mode="CMYK")
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * 2)  # values up to 510: PIL clips them at 255
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) * 0.75, mode="F")
    if mode == "1":
        return Image.fromarray(gray > 127)
    raise AssertionError(mode)


@pytest.mark.parametrize("pixels_name", ["default", "custom"])
@pytest.mark.parametrize(
    "mode", ["L", "RGBA", "P", "LA", "P_transparency", "RGB_transparency", "CMYK", "I;16", "F", "1"]
)
def test_image_modes_match_transformers(mode, pixels_name):
    image = _mode_image(mode)
    assert image.mode == {"P_transparency": "P", "RGB_transparency": "RGB"}.get(mode, mode)
    assert_matches_transformers(image, pixels_name)


def test_premultiplied_la_is_loaded():
    image = _mode_image("La")
    assert image.mode == "La"
    np.testing.assert_array_equal(np.asarray(load_image(image)), np.asarray(load_image(image.convert("LA"))))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_numpy_inputs_match_transformers(channels):
    array = noise(300, 200, channels, seed=7).reshape(300, 200, channels)  # [H, W, C] uint8
    assert_matches_transformers(array, "default")
    if channels == 1:  # a plain [H, W] array (transformers rejects it) is the same grey image
        np.testing.assert_array_equal(preprocess_image(array[..., 0])[0], preprocess_image(array)[0])


def test_size_dict_layout_matches_min_max_kwargs():
    image = Image.fromarray(noise(500, 700))
    hf = Qwen2VLImageProcessorPil(size={"shortest_edge": CUSTOM["min_pixels"], "longest_edge": CUSTOM["max_pixels"]})
    expected = hf(image, return_tensors="np")
    values, grid = preprocess_image(image, **CUSTOM)
    np.testing.assert_array_equal(grid[None], expected["image_grid_thw"])
    np.testing.assert_allclose(values, expected["pixel_values"], rtol=0, atol=ATOL)


# ---------------------------------------------------------------- patch layout


def test_patch_layout_by_index():
    """Each row is one 14x14 patch, rows in (t, h-block, w-block, h-in-block, w-in-block) order,
    features in (C, t, ph, pw) order — checked patch by patch against direct slicing."""
    t, h, w = 4, 56, 84
    frames = np.random.default_rng(0).standard_normal((t, 3, h, w)).astype(np.float32)
    rows, grid = patchify(frames)
    gt, gh, gw = grid.tolist()
    assert (gt, gh, gw) == (2, 4, 6) and rows.shape == (2 * 4 * 6, 1176)
    r = 0
    for ti in range(gt):
        for bh in range(gh // 2):
            for bw in range(gw // 2):
                for ih in range(2):
                    for iw in range(2):
                        y, x = (2 * bh + ih) * 14, (2 * bw + iw) * 14
                        patch = frames[2 * ti : 2 * ti + 2, :, y : y + 14, x : x + 14]  # (t, C, 14, 14)
                        np.testing.assert_array_equal(rows[r], patch.transpose(1, 0, 2, 3).reshape(-1))
                        r += 1


def test_image_is_two_identical_frames():
    values, grid = preprocess_image(noise(100, 140))
    features = values.reshape(-1, 3, 2, 14, 14)
    np.testing.assert_array_equal(features[:, :, 0], features[:, :, 1])
    assert grid[0] == 1


# ---------------------------------------------------------------- load_image


def test_rgba_is_composited_onto_white():
    array = np.zeros((2, 2, 4), dtype=np.uint8)
    array[0, 0] = (0, 0, 0, 0)  # fully transparent black → white
    array[0, 1] = (10, 20, 30, 255)  # opaque → unchanged
    array[1, 0] = (0, 0, 0, 128)  # half transparent black → mid grey
    for src in (Image.fromarray(array, mode="RGBA"), array):
        out = np.asarray(load_image(src))
        assert out[0, 0].tolist() == [255, 255, 255]
        assert out[0, 1].tolist() == [10, 20, 30]
        assert out[1, 0].tolist() in ([127, 127, 127], [128, 128, 128])


def test_load_image_sources_agree(tmp_path):
    image = Image.fromarray(noise(40, 60, 4, seed=9), mode="RGBA")
    path = tmp_path / "a.png"
    image.save(path)
    expected = np.asarray(load_image(image))
    assert load_image(image).mode == "RGB"
    data_uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for src in (str(path), path, f"file://{path}", path.read_bytes(), data_uri):
        np.testing.assert_array_equal(np.asarray(load_image(src)), expected)
    np.testing.assert_array_equal(np.asarray(load_image(noise(40, 60, 3).transpose(2, 0, 1))), noise(40, 60, 3))


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((40, 80, 3), dtype=np.uint8)  # 40 high, 80 wide; red block at the top-left
    stored[:20, :40] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)
    image = load_image(path)
    assert image.size == (40, 80)  # (width, height): now portrait
    out = np.asarray(image).astype(int)
    assert out[5, 30, 0] > 200 and out[5, 30, 1] < 60  # top-left went to the top-right
    assert out[5, 5, 0] < 60
    _, grid = preprocess_image(path, min_pixels=1)
    assert grid.tolist() == [1, 6, 2]  # 80x40 (h x w) → smart_resize 84x28


def test_corrupt_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ValueError, match=r"broken\.jpg.*(corrupt|recognised)"):
        load_image(path)
    with pytest.raises(ValueError, match="bytes"):
        load_image(b"\x89PNG\r\n\x1a\n garbage")


def test_truncated_jpeg_is_a_clear_error(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(noise(200, 200)).save(buffer, format="JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"cut\.jpg.*truncated"):
        load_image(path)
    with pytest.raises(ValueError, match=r"cut\.jpg"):
        preprocess_image(str(path))


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="file path"):
        load_image(12345)
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((5, 5, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="values in"):
        load_image(np.full((4, 4, 3), 300, dtype=np.int32))

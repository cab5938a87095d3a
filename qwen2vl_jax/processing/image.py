"""Images → ViT patch rows: smart_resize, bicubic PIL resize, CLIP normalization, patchify.

Matches `transformers.Qwen2VLImageProcessorPil` (the PIL backend of the PyTorch processor) bit for bit:
    image (any mode/size) → RGB → resize to smart_resize(h, w) with PIL BICUBIC → /255 → (x − mean)/std
    → 2 identical frames → patchify → (pixel_values float32[gh·gw, 1176], grid_thw int64[3] = (1, gh, gw)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from qwen2vl_jax.processing.loading import ImageSource, load_image
from qwen2vl_jax.processing.patches import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, RESCALE_FACTOR, normalize_frames, patchify

# transformers class defaults (Qwen2VLImageProcessorPil.size); released checkpoints ship their own
# preprocessor_config.json (min 3136, max 12845056) which Processor.from_pretrained reads.
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) → (h, w): multiples of `factor`, h·w within [min_pixels, max_pixels], aspect kept.

    Round to the nearest multiple (Python round: halves to even); if that is over
    max_pixels scale down by β = sqrt(h·w / max_pixels) and floor; if under min_pixels scale up by
    β = sqrt(min_pixels / (h·w)) and ceil.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of size {height}x{width} (height x width) has aspect ratio {ratio:.1f}, over the maximum "
            f"{MAX_ASPECT_RATIO}; crop or pad it to a less extreme aspect ratio first"
        )
    # No max(factor, ·) here (qwen-vl-utils has one, transformers does not): a side under factor/2 rounds
    # to 0, which sends the image through the min_pixels branch below, as in transformers.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_rgb(image: Image.Image, height: int, width: int) -> np.ndarray:
    """RGB PIL image → uint8[height, width, 3], PIL bicubic (no-op when the size already matches)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def preprocess_image(
    image: ImageSource,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
    image_std: Sequence[float] = OPENAI_CLIP_STD,
    rescale_factor: float = RESCALE_FACTOR,
) -> tuple[np.ndarray, np.ndarray]:
    """One image → (pixel_values float32[gh·gw, 3·tp·p²], grid_thw int64[3] = (1, gh, gw)).

    `image` is anything `load_image` accepts. min_pixels / max_pixels default to the transformers
    class defaults (56·56 and 28·28·1280). The LLM sees gh·gw / merge_size² tokens for it.
    """
    rgb = load_image(image)
    min_pixels = DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels
    max_pixels = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    height, width = smart_resize(rgb.height, rgb.width, patch_size * merge_size, min_pixels, max_pixels)
    pixels = resize_rgb(rgb, height, width)
    frame = normalize_frames(pixels[None], image_mean, image_std, rescale_factor)  # [1, 3, H, W]
    frames = np.broadcast_to(frame, (temporal_patch_size, *frame.shape[1:]))
    rows, grid = patchify(frames, patch_size, temporal_patch_size, merge_size)
    return rows, grid

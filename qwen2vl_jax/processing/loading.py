"""Turn whatever the user holds (path, bytes, PIL image, numpy array) into an upright RGB PIL image.

RGB conversion follows the PyTorch processor's PIL backend (transformers `convert_to_rgb`):
- a PIL image with an alpha band ("A" in its bands, e.g. RGBA, LA, PA) or a `transparency` entry
  (P / L / RGB with a transparent colour) is composited onto a WHITE background;
- every other mode goes through `Image.convert("RGB")` (CMYK, YCbCr, 1, L, I, F, I;16 ... ).
  Note that PIL clips I / I;16 / F values to [0, 255] on that conversion (a 16-bit image saturates);
  that is what the reference does, so it is kept.
- numpy arrays are channels-last uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]
  (channels-first [C, H, W] is accepted too); 4 channels are blended onto white as
  round(α·rgb + (1 − α)·255) exactly as the reference does for arrays.
EXIF orientation is applied (PIL.ImageOps.exif_transpose) for every input that carries it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

ImageSource = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray


def _open_and_decode(fp: Any, name: str) -> Image.Image:
    """Open and fully decode an encoded image; ValueError naming `name` when it cannot be read."""
    try:
        image = Image.open(fp)
        image.load()  # decoding happens lazily: force it so truncation shows up here, not later
    except Image.UnidentifiedImageError as e:
        raise ValueError(f"cannot read image {name}: not a recognised image file or the file is corrupt") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(
            f"cannot read image {name}: the file is truncated or corrupt ({e}); re-download or re-encode it"
        ) from e
    return image


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any-mode PIL image → RGB PIL image, alpha composited onto white (the reference's rule)."""
    if image.mode == "La":  # premultiplied LA: PIL cannot go straight to RGB(A)
        image = image.convert("LA")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    lo, hi = (array.min(), array.max()) if array.size else (0, 0)
    if np.issubdtype(array.dtype, np.integer) or np.array_equal(array, np.round(array)):
        if lo < 0 or hi > 255:
            raise ValueError(f"image array of dtype {array.dtype} has values in [{lo}, {hi}]; expected uint8 0..255")
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and lo >= 0 and hi <= 1:
        return np.round(array * 255).astype(np.uint8)
    raise ValueError(
        f"image array of dtype {array.dtype} has values in [{lo}, {hi}]; pass uint8 0..255 or floats in [0, 1]"
    )


def array_to_rgb(array: np.ndarray) -> Image.Image:
    """uint8[H, W] | [H, W, 1|3|4] | [1|3|4, H, W] → RGB PIL image."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # channels-first
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be [H, W], [H, W, 1|3|4] or [1|3|4, H, W]; got shape {array.shape}")
    array = _array_to_uint8(array)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.shape[-1] == 4:
        alpha = array[..., 3:4] / 255
        array = np.round(alpha * array[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def load_image(src: ImageSource) -> Image.Image:
    """Path ("file://" allowed) | data:image base64 URI | bytes | PIL image | numpy array → upright RGB PIL image.

    Raises FileNotFoundError for a missing path and ValueError (naming the file) for a corrupt or
    truncated one.
    """
    if isinstance(src, Image.Image):
        upright = src if src.getexif().get(0x0112, 1) == 1 else ImageOps.exif_transpose(src)
        return pil_to_rgb(upright)
    if isinstance(src, np.ndarray):
        return array_to_rgb(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        image = _open_and_decode(io.BytesIO(bytes(src)), f"<{len(src)} bytes>")
    elif isinstance(src, str) and src.startswith("data:image/"):
        try:
            data = base64.b64decode(src.split(",", 1)[1], validate=True)
        except (IndexError, binascii.Error) as e:
            raise ValueError(f"malformed base64 data URI for an image: {src[:40]!r}...") from e
        image = _open_and_decode(io.BytesIO(data), "<data URI>")
    elif isinstance(src, str) and src.startswith(("http://", "https://")):
        raise ValueError(f"cannot fetch {src!r}: images are not downloaded here; download it and pass the file path")
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        path = path[len("file://") :] if path.startswith("file://") else path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file not found: {path!r}")
        with open(path, "rb") as f:
            image = _open_and_decode(f, repr(path))
    else:
        raise TypeError(
            f"cannot load an image from {type(src).__name__}; pass a file path, bytes, a PIL image or a numpy array"
        )
    return pil_to_rgb(ImageOps.exif_transpose(image))

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

Sources: a local path (or "file://"), a data:image base64 URI, an http(s) URL (fetched with urllib: a timeout and a
size cap, see `fetch_url`), an object-store path (gs://, s3://, az://, hf:// through etils.epath), encoded bytes, a
PIL image or an array. Every failure to get or decode one is a FileNotFoundError (missing path), an OSError
(network, timeout) or a ValueError (corrupt, truncated, too big, HTTP error status), each naming the input, so a
data pipeline can catch those and skip the sample. PIL's decompression-bomb limit is kept as PIL sets it (a warning
over Image.MAX_IMAGE_PIXELS ≈ 89.5 Mpx, an error over twice that); the error becomes a ValueError saying what to do.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
from PIL import Image, ImageOps

ImageSource = Any  # str | os.PathLike | bytes | PIL.Image.Image | np.ndarray

FETCH_TIMEOUT_S = 10.0  # per http(s) image: connect + every read, and the whole download
FETCH_MAX_BYTES = 64 << 20  # an http(s) image larger than this is refused
REMOTE_PREFIXES = ("gs://", "s3://", "az://", "hf://")  # object stores, read through etils.epath
_CHUNK = 1 << 16


def is_remote(path: str) -> bool:
    """A URL of any scheme but file:// (http(s), gs://, s3://, ...)."""
    return "://" in path and not path.startswith("file://")


def local_path(path: str) -> str:
    """A local path with any "file://" prefix removed."""
    return path[len("file://") :] if path.startswith("file://") else path


def _open_and_decode(fp: Any, name: str) -> Image.Image:
    """Open and fully decode an encoded image → upright image; ValueError naming `name` when it cannot be read."""
    try:
        image = Image.open(fp)
        image.load()  # decoding happens lazily: force it so truncation shows up here, not later
        return ImageOps.exif_transpose(image)
    except Image.UnidentifiedImageError as e:
        raise ValueError(f"cannot read image {name}: not a recognised image file or the file is corrupt") from e
    except Image.DecompressionBombError as e:
        raise ValueError(
            f"cannot read image {name}: {str(e).rstrip('.')}. Resize the image (e.g. to under 20 Mpx; the model "
            "sees at most max_pixels anyway), or, if the file is trusted, raise PIL.Image.MAX_IMAGE_PIXELS first"
        ) from e
    except Exception as e:  # noqa: BLE001 — decoders of foreign bytes raise many types (OSError, SyntaxError,
        # struct.error, EOFError, IndexError, ...): every one means "this file cannot be decoded"
        raise ValueError(
            f"cannot read image {name}: the file is truncated or corrupt ({type(e).__name__}: {e}); "
            "re-download or re-encode it"
        ) from e


def fetch_url(url: str, timeout: float = FETCH_TIMEOUT_S, max_bytes: int = FETCH_MAX_BYTES) -> bytes:
    """The body of an http(s) URL, read in chunks.

    Raises ValueError for an HTTP error status or a body over `max_bytes` (checked while reading: Content-Length is
    not trusted), TimeoutError when the server does not answer within `timeout` seconds or the whole download takes
    longer, OSError for any other network failure; each names the URL.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "qwen2vl-jax"})
    deadline = time.monotonic() + timeout
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise ValueError(_too_big(url, int(declared), max_bytes))
            return _read_capped(response, url, max_bytes, deadline, timeout)
    except urllib.error.HTTPError as e:
        raise ValueError(f"cannot fetch {url}: HTTP {e.code} {e.reason}") from e
    except TimeoutError as e:
        raise TimeoutError(f"cannot fetch {url}: no complete answer within {timeout:g} s; "
                           "retry, or download it and pass the file path") from e
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise TimeoutError(f"cannot fetch {url}: no answer within {timeout:g} s") from e
        raise OSError(f"cannot fetch {url}: {e.reason}") from e
    except (OSError, ValueError, http.client.HTTPException) as e:  # e.g. a reset or cut-off body
        if url in str(e):
            raise
        raise OSError(f"cannot fetch {url}: {type(e).__name__}: {e}") from e


def _read_capped(response, url: str, max_bytes: int, deadline: float, timeout: float) -> bytes:
    chunks, size = [], 0
    read = getattr(response, "read1", response.read)  # read1: what has arrived, so the deadline is checked often
    while chunk := read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise ValueError(_too_big(url, size, max_bytes, more=True))
        if time.monotonic() > deadline:
            raise TimeoutError(f"downloading {url} took longer than {timeout:g} s")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_big(url: str, size: int, max_bytes: int, more: bool = False) -> str:
    return (f"cannot fetch {url}: the body is {'over ' if more else ''}{size} bytes, more than the "
            f"{max_bytes}-byte cap; download and resize it, or pass a larger max_bytes")


def read_source(src: str | os.PathLike, *, what: str = "image", timeout: float = FETCH_TIMEOUT_S,
                max_bytes: int = FETCH_MAX_BYTES) -> bytes:
    """A local path, "file://" URI, http(s) URL (fetch_url) or object-store path (gs://, s3://, ... through
    etils.epath) → the file's bytes; FileNotFoundError naming the `what` file when it is absent."""
    path = os.fspath(src)
    if path.startswith(("http://", "https://")):
        return fetch_url(path, timeout, max_bytes)
    if path.startswith(REMOTE_PREFIXES):
        from etils import epath

        try:
            return epath.Path(path).read_bytes()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{what} file not found: {path!r}") from e
    local = local_path(path)
    if not os.path.isfile(local):
        raise FileNotFoundError(f"{what} file not found: {local!r}")
    with open(local, "rb") as f:
        return f.read()


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


def load_image(src: ImageSource, *, timeout: float = FETCH_TIMEOUT_S,
               max_bytes: int = FETCH_MAX_BYTES) -> Image.Image:
    """Path ("file://" allowed) | http(s) URL | gs:// / s3:// path | data:image base64 URI | bytes | PIL image |
    numpy array → upright RGB PIL image.

    Raises FileNotFoundError for a missing path, ValueError (naming the input) for a corrupt, truncated or too
    large one or an HTTP error, OSError / TimeoutError for a network failure. `timeout` and `max_bytes` bound an
    http(s) download (see fetch_url).
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
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        name = path if is_remote(path) else repr(local_path(path))
        image = _open_and_decode(io.BytesIO(read_source(path, timeout=timeout, max_bytes=max_bytes)), name)
    else:
        raise TypeError(
            f"cannot load an image from {type(src).__name__}; pass a file path, bytes, a PIL image or a numpy array"
        )
    return pil_to_rgb(image)

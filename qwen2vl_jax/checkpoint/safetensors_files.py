"""safetensors files as memory maps, read and written one tensor at a time.

The `safetensors` package returns copies (and its numpy reader has no bfloat16); a converter for checkpoints larger
than RAM needs zero-copy views whose pages belong to the page cache, not to the process. The format is a little-endian
u64 header size, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the raw bytes; the
package itself reads what `write` produces (tested)."""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}
_ALIGN = 8  # tensor data starts 8-byte aligned, as the package writes it
_PIECE_BYTES = 64 << 20


def read(path: str) -> dict[str, np.ndarray]:
    """name → read-only numpy view of a memory map of `path` (nothing is read until used).

    ValueError when the file is not a complete safetensors file (e.g. truncated)."""
    def broken(why: str) -> ValueError:
        return ValueError(f"{path} is not a readable safetensors file ({why}); it may be truncated — "
                          "download or copy it again")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise broken("shorter than its 8-byte header size")
        (header_size,) = struct.unpack("<Q", head)
        if 8 + header_size > size:
            raise broken(f"header of {header_size} bytes runs past the end of the {size}-byte file")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as error:
            raise broken(f"header is not JSON: {error}")
    header.pop("__metadata__", None)
    start = 8 + header_size
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if start + end > size:
        raise broken(f"tensors need {start + end} bytes, the file has {size}")
    if not header:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(end,)) if end else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which this reader does not know")
        lo, hi = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        if hi - lo != math.prod(info["shape"]) * dtype.itemsize:
            raise broken(f"tensor {name} has {hi - lo} bytes for shape {info['shape']}")
        out[name] = data[lo:hi].view(dtype).reshape(info["shape"])
    return out


def write(path: str, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype, Callable[[], np.ndarray]]],
          metadata: dict[str, str] | None = None) -> int:
    """Write (name, shape, dtype, produce) entries, calling each `produce()` only when its bytes are due, so only
    one tensor is in memory at a time; a non-contiguous result (e.g. a transposed view) is copied 64 MiB at a time.
    → bytes written."""
    entries = list(tensors)
    header, offset = {}, 0
    for name, shape, dtype, _ in entries:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": CODES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % _ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, shape, dtype, produce in entries:
            array = produce()
            if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                raise ValueError(f"{name}: produced {array.dtype}{list(array.shape)}, announced "
                                 f"{np.dtype(dtype)}{list(shape)}")
            rows = max(1, _PIECE_BYTES // max(1, array[:1].nbytes)) if array.ndim else 1
            for start in range(0, len(array) if array.ndim else 1, rows):  # a transposed view is copied in pieces
                piece = np.ascontiguousarray(array[start:start + rows] if array.ndim else array)
                f.write(memoryview(piece.reshape(-1).view(np.uint8)))
    return 8 + len(encoded) + offset

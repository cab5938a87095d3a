"""Arrays read on demand, a block at a time: how checkpoints larger than RAM move between formats and devices.

A `LazyArray` knows its shape and dtype and reads any rectangular block. Memory-mapped safetensors tensors, torch
.bin memory maps and Orbax/tensorstore arrays all become LazyArrays; stacking layers for nn.scan, casting, writing
and placing onto a mesh then touch one block at a time."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

Index = tuple[slice, ...]

BLOCK_BYTES = 64 << 20  # the unit of reading, writing and storage chunks


@dataclasses.dataclass(frozen=True)
class LazyArray:
    """shape, dtype and `read(index)` → np.ndarray for a tuple of slices (one per axis, steps of 1)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[Index], np.ndarray]
    layer_axes: int = 0  # leading axes that stack layers: storage chunks hold one layer, so one layer reads one chunk

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def __getitem__(self, index) -> np.ndarray:
        """Numpy-style basic indexing with slices (what jax.make_array_from_callback passes)."""
        index = index if isinstance(index, tuple) else (index,)
        index = tuple(index) + (slice(None),) * (self.ndim - len(index))
        block = self.read(tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, self.shape)))
        return np.asarray(block).astype(self.dtype, copy=False)

    def astype(self, dtype) -> "LazyArray":
        return dataclasses.replace(self, dtype=np.dtype(dtype))

    def chunk_shape(self, block_bytes: int = BLOCK_BYTES) -> tuple[int, ...]:
        """The largest C-order block of at most `block_bytes`: whole trailing axes, a run along one axis, ones before."""
        chunk, itemsize = [1] * self.layer_axes + list(self.shape[self.layer_axes:]), np.dtype(self.dtype).itemsize
        for axis in range(self.layer_axes, self.ndim):
            inner = math.prod(chunk[axis + 1:]) * itemsize
            if chunk[axis] * inner <= block_bytes:
                break
            chunk[axis] = max(1, block_bytes // inner)
            if chunk[axis] > 1:
                break
        return tuple(chunk)

    def blocks(self, chunk: tuple[int, ...]) -> Iterator[Index]:
        """Indices of the chunk grid in C order."""
        counts = [math.ceil(n / c) if n else 1 for n, c in zip(self.shape, chunk)]
        for position in np.ndindex(*counts):
            yield tuple(slice(p * c, min((p + 1) * c, n)) for p, c, n in zip(position, chunk, self.shape))


def from_array(array, dtype=None) -> LazyArray:
    """A LazyArray over anything numpy can slice without reading the rest (np.memmap views, tensorstore arrays)."""
    return LazyArray(tuple(array.shape), np.dtype(dtype or array.dtype), lambda index: array[index])


def stacked(layers: list[LazyArray]) -> LazyArray:
    """[layer, *shape] from equally shaped layers; reading a block reads only the layers it covers."""
    first = layers[0]

    def read(index: Index) -> np.ndarray:
        return np.stack([layers[i][index[1:]] for i in range(index[0].start, index[0].stop)])

    return LazyArray((len(layers), *first.shape), first.dtype, read, first.layer_axes + 1)


def unstacked(array: LazyArray) -> list[LazyArray]:
    """The inverse of `stacked`."""
    def layer(i: int) -> LazyArray:
        return LazyArray(array.shape[1:], array.dtype, lambda index: array.read((slice(i, i + 1), *index))[0],
                         max(0, array.layer_axes - 1))

    return [layer(i) for i in range(array.shape[0])]


def relayout(tree: dict, scan_layers: bool, counts: dict[str, tuple[str, int]]) -> dict:
    """Unrolled (`layers_N`, `blocks_N`) ↔ stacked (`layers`, `blocks`) subtrees of a tree of LazyArrays.

    counts: top-level key → (layer prefix, number of layers), e.g. {"language_model": ("layers", 28)}."""
    import jax

    out = dict(tree)
    for top, (prefix, count) in counts.items():
        if top not in out:  # a tree without this part: left for the caller's checks to name
            continue
        sub = dict(out[top])
        if scan_layers and prefix not in sub:
            layers = [sub.pop(f"{prefix}_{i}") for i in range(count)]
            sub[prefix] = jax.tree_util.tree_map(lambda *xs: stacked(list(xs)), *layers)
        elif not scan_layers and prefix in sub:
            whole = sub.pop(prefix)
            for i in range(count):
                sub[f"{prefix}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: unstacked(x)[i], whole)
        out[top] = sub
    return out


def materialize(array: LazyArray, block_bytes: int = BLOCK_BYTES) -> np.ndarray:
    """The whole array in memory, filled block by block (peak: the result plus one block)."""
    out = np.empty(array.shape, array.dtype)
    for index in array.blocks(array.chunk_shape(block_bytes)):
        out[index] = array[index]
    return out

"""Row-level random access over benchmark files, read with pyarrow only: rows[i] → the i-th row as a plain dict.

    ParquetRows(paths)        .parquet files (local, or gs:// etc. through fsspec): the footers are read when opened
                              (row counts per row group), a row group is read when one of its rows is asked for and
                              kept until a row of another one is (a row group too large to hold whole, over
                              `batch_bytes` uncompressed, is streamed in batches of about that size instead)
    ArrowStreamRows(paths)    Arrow IPC stream files (what `datasets.Dataset.save_to_disk` writes), memory-mapped:
                              opening reads the batch headers, a row's values are read from the map when asked for
    parquet_files(spec)       a folder (every .parquet file under it, sorted), a glob or one file → (files, root)
    hf_saved_dataset(path, split)   a `save_to_disk` folder (Dataset or DatasetDict) → (arrow files, split)

`rows.where(i)` → (file, row number in that file) for messages; `rows.reads` counts the row groups (or batches)
read so far. A rows object holds one group (and one open file) at a time: use one per thread."""
from __future__ import annotations

import bisect
import glob as globlib
import json
import operator
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from qwen2vl_jax.processing.loading import is_remote, local_path

_MAGIC = ("*", "?", "[")


def _fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


class _ChunkedRows:
    """Rows laid out as chunks (file, chunk, first row in the file, rows); subclasses read a chunk's rows."""

    def __init__(self, paths: list[str], chunks: list[tuple[int, int, int, int]]):
        self.paths = list(paths)
        self._chunks = chunks
        self._starts, total = [], 0
        for chunk in chunks:
            self._starts.append(total)
            total += chunk[3]
        self._len = total
        self.reads = 0

    def __len__(self) -> int:
        return self._len

    def _locate(self, i: int) -> tuple[int, int]:
        i = operator.index(i)  # ints, numpy ints; TypeError for anything else
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"row {i} out of range ({self._len} rows)")
        c = bisect.bisect_right(self._starts, i) - 1
        return c, i - self._starts[c]

    def where(self, i: int) -> tuple[str, int]:
        c, offset = self._locate(i)
        f, _, first, _ = self._chunks[c]
        return self.paths[f], first + offset

    def __getitem__(self, i: int) -> dict:
        c, offset = self._locate(i)
        batch, at = self._rows_of(c, offset)
        return batch.slice(offset - at, 1).to_pylist()[0]

    def _rows_of(self, c: int, offset: int) -> tuple[pa.RecordBatch | pa.Table, int]:
        """(rows holding row `offset` of chunk c, the offset of their first row in the chunk)."""
        raise NotImplementedError


class ParquetRows(_ChunkedRows):
    def __init__(self, paths: list[str], *, batch_bytes: int = 256 << 20, threads: int = 8):
        if not paths:
            raise ValueError("no parquet files")
        remote = [p for p in paths if is_remote(p)]
        with ThreadPoolExecutor(min(threads, len(remote))) if len(remote) > 1 else _Inline() as pool:
            metas = list(pool.map(self._metadata, paths))  # remote footers in parallel: one round trip each
        chunks = []
        for f, meta in enumerate(metas):
            first = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    chunks.append((f, g, first, n))
                    first += n
        super().__init__(paths, chunks)
        self.metadata = metas
        self.batch_bytes = batch_bytes
        self._file = None  # (file index, ParquetFile, handle or None)
        self._batch = None  # (chunk, first row of the batch in the group, RecordBatch | Table)
        self._stream = None  # the iterator continuing the current group, when it is read in batches

    @staticmethod
    def _metadata(path: str) -> pq.FileMetaData:
        if is_remote(path):
            fs, p = _fs(path)
            with fs.open(p, "rb") as f:
                return pq.read_metadata(f)
        return pq.read_metadata(local_path(path), memory_map=True)

    def _open(self, f: int) -> pq.ParquetFile:
        if self._file is not None and self._file[0] == f:
            return self._file[1]
        self.close()
        path, handle = self.paths[f], None
        if is_remote(path):
            fs, p = _fs(path)
            handle = fs.open(p, "rb")
            # buffered reads: a column chunk is fetched piece by piece, not whole, when a group is streamed
            parquet = pq.ParquetFile(handle, metadata=self.metadata[f], buffer_size=8 << 20, pre_buffer=False)
        else:
            parquet = pq.ParquetFile(local_path(path), metadata=self.metadata[f], memory_map=True, pre_buffer=False)
        self._file = (f, parquet, handle)
        return parquet

    def close(self) -> None:
        if self._file is not None and self._file[2] is not None:
            self._file[2].close()
        self._file, self._stream = None, None

    def _rows_of(self, c, offset):
        if self._batch is not None and self._batch[0] == c:
            _, at, batch = self._batch
            if at <= offset < at + batch.num_rows:
                return batch, at
        f, g, _, n = self._chunks[c]
        parquet = self._open(f)
        size = self.metadata[f].row_group(g).total_byte_size
        if size <= self.batch_bytes:  # the usual case: the whole group, once
            self._batch, self._stream = (c, 0, parquet.read_row_group(g, use_threads=False)), None
            self.reads += 1
            return self._batch[2], 0
        if self._stream is None or self._batch is None or self._batch[0] != c or offset < self._batch[1]:
            rows = max(1, n * self.batch_bytes // size)
            self._stream = parquet.iter_batches(batch_size=rows, row_groups=[g], use_threads=False)
            self._batch = (c, 0, None)
            at = 0
        else:
            at = self._batch[1] + self._batch[2].num_rows
        while True:  # forward through the group to the batch that holds the row
            batch = next(self._stream)
            self.reads += 1
            self._batch = (c, at, batch)
            if offset < at + batch.num_rows:
                return batch, at
            at += batch.num_rows


class ArrowStreamRows(_ChunkedRows):
    def __init__(self, paths: list[str]):
        if not paths:
            raise ValueError("no arrow files")
        self._batches, chunks = [], []
        for f, path in enumerate(paths):
            if is_remote(path):
                raise ValueError(f"{path}: Arrow files are memory-mapped, so they must be local "
                                 "(copy the folder, or export the dataset to parquet and use parquet:)")
            source = pa.memory_map(local_path(path), "r")
            try:
                batches = list(pa.ipc.open_stream(source))  # zero-copy: the values stay in the map
            except pa.ArrowInvalid:  # the IPC file format (with a footer) rather than the stream one
                reader = pa.ipc.open_file(source)
                batches = [reader.get_batch(k) for k in range(reader.num_record_batches)]
            first = 0
            for batch in batches:
                if batch.num_rows:
                    chunks.append((f, len(self._batches), first, batch.num_rows))
                    self._batches.append(batch)
                    first += batch.num_rows
        super().__init__(paths, chunks)

    def _rows_of(self, c, offset):
        return self._batches[self._chunks[c][1]], 0


class _Inline:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def _has_magic(path: str) -> bool:
    return any(ch in path for ch in _MAGIC)


def _glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: /data/bench/*/test-*.parquet → /data/bench."""
    parts = pattern.split("/")
    k = next(k for k, part in enumerate(parts) if _has_magic(part))
    return "/".join(parts[:k]) or "/"


def parquet_files(spec: str) -> tuple[list[str], str]:
    """A folder, a glob or a .parquet file (local, or remote through fsspec) → (sorted files, their root folder)."""
    spec = spec.rstrip("/") or "/"
    if is_remote(spec):
        fs, path = _fs(spec)
        if _has_magic(path):
            found, root = [p for p in fs.glob(path) if fs.isfile(p)], _glob_root(spec)
        elif fs.isdir(path):
            found, root = [p for p in fs.find(path) if p.endswith(".parquet")], spec
        elif fs.isfile(path):
            found, root = [path], posixpath.dirname(spec)
        else:
            raise FileNotFoundError(f"parquet:{spec}: no such folder or file")
        files = sorted(fs.unstrip_protocol(p) for p in found)
    else:
        local = os.path.abspath(local_path(spec))
        if _has_magic(local):
            files, root = [p for p in globlib.glob(local, recursive=True) if os.path.isfile(p)], _glob_root(local)
        elif os.path.isdir(local):
            files, root = globlib.glob(os.path.join(local, "**", "*.parquet"), recursive=True), local
        elif os.path.isfile(local):
            files, root = [local], os.path.dirname(local)
        else:
            raise FileNotFoundError(f"parquet:{spec}: no such folder or file")
        files = sorted(files)
    if not files:
        raise FileNotFoundError(f"parquet:{spec}: no .parquet files there")
    return files, root


def hf_saved_dataset(path: str, split: str | None = None) -> tuple[list[str], str | None]:
    """A `datasets` `save_to_disk` folder → (its arrow files in order, the split read). A DatasetDict folder
    (dataset_dict.json) takes `split`, default "test", then "validation"; a Dataset folder is its one split."""
    if is_remote(path):
        raise ValueError(f"hf:{path}: a save_to_disk folder is memory-mapped, so it must be local "
                         "(copy it, or export the dataset to parquet and use parquet:)")
    path = os.path.abspath(local_path(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"hf:{path}: no such folder")
    dict_file = os.path.join(path, "dataset_dict.json")
    if os.path.exists(dict_file):
        with open(dict_file) as f:
            splits = list(json.load(f).get("splits", []))
        if split is None:
            split = next((s for s in ("test", "validation") if s in splits), None)
            if split is None:
                raise ValueError(f"hf:{path}: no 'test' or 'validation' split; choose one of {splits} "
                                 f"(hf:{path}:SPLIT)")
        elif split not in splits:
            raise ValueError(f"hf:{path}: no split {split!r}; the splits are {splits}")
        files, _ = hf_saved_dataset(os.path.join(path, split))
        return files, split
    state_file = os.path.join(path, "state.json")
    if os.path.exists(state_file):
        with open(state_file) as f:
            state = json.load(f)
        saved = state.get("_split")
        if split is not None and saved is not None and split != saved:
            raise ValueError(f"hf:{path}: this folder holds one split, {saved!r}, not {split!r}")
        names = [entry["filename"] for entry in state.get("_data_files", [])]
        split = split or saved
    else:  # no state.json: the data files by name
        names = sorted(n for n in os.listdir(path) if n.startswith("data-") and n.endswith(".arrow"))
    if not names:
        raise FileNotFoundError(f"hf:{path}: not a save_to_disk folder (no dataset_dict.json, state.json or "
                                "data-*.arrow files)")
    files = [os.path.join(path, n) for n in names]
    for file in files:
        if not os.path.exists(file):
            raise FileNotFoundError(f"hf:{path}: {file} (listed in state.json) is missing")
    return files, split

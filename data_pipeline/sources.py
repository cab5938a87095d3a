"""Random-access data sources for grain (``len(src)``, ``src[i] -> record``).

Every source returns the same normalized record (a dict)::

    {"messages": list,   # Qwen chat messages (image/video items in content lists)
     "images": list,     # one entry per image item, in message order:
                         #   bytes (encoded image) or a local/remote path str
     "videos": list,     # one entry per video item: path of a video file, frame directory or .npy,
                         #   or {"video": path, **options} when the item has fps/nframes/pixel options
     "id": str,
     ...}                # extra top-level string fields, passed through

JsonlSource also reads LLaMA-Factory, ms-swift, ShareGPT and LLaVA lines (<image>/<video> tags in string
contents, media in top-level lists), detected per line by their keys: see data_pipeline/formats.py.

A record that cannot be built (bad JSON, no messages, path escaping the root)
is returned as ``{"error": "<reason naming the file and line>", "id": str}``
instead of raising, so a pipeline can count and skip it.

Sources are picklable (open files / readers are re-opened lazily per process).
"""

from __future__ import annotations

import json
import os
import posixpath
import threading

import numpy as np
from etils import epath

from data_pipeline.formats import RecordError, to_qwen  # noqa: F401 (RecordError: part of this module's API)
from qwen2vl_jax.processing.loading import is_remote

_REMOTE_PREFIXES = ("http://", "https://", "gs://", "s3://")
_RESERVED = ("messages", "images", "videos", "id", "error")


def confined_path(ref, root: str, root_real: str | None) -> str:
    """Resolves media reference ``ref`` against ``root``; refuses escapes.

    Remote URLs (http(s)://, gs://, s3://) and ``data:`` URIs pass through
    unchanged. Local refs must be relative, must not climb out with ``..``,
    and (for a local root; pass root_real=None for a remote one such as
    gs://bucket/dir) must not resolve through symlinks to a place outside
    ``root``. A remote root is joined posix-style: gs://bucket/dir/ref.
    """
    if not isinstance(ref, str) or not ref:
        raise RecordError(f"media reference must be a non-empty string, got {ref!r}")
    if ref.startswith(_REMOTE_PREFIXES) or ref.startswith("data:"):
        return ref
    rel = ref[len("file://"):] if ref.startswith("file://") else ref
    if "://" in rel:
        raise RecordError(f"unsupported URL scheme in {ref!r}")
    if rel.startswith(("/", "\\")) or posixpath.isabs(rel) or os.path.isabs(rel):
        raise RecordError(f"absolute path {ref!r} is not allowed; use a path relative to {root}")
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        raise RecordError(f"path {ref!r} escapes the media root {root}")
    full = posixpath.join(root, norm)
    if root_real is not None:
        real = os.path.realpath(full)
        if real != root_real and not real.startswith(root_real + os.sep):
            raise RecordError(f"path {ref!r} resolves (via symlink) to {real}, outside {root}")
    return full


# qwen-vl-utils video item options (sampling and pixel budget) that travel with a video reference
VIDEO_OPTIONS = ("fps", "nframes", "min_frames", "max_frames", "video_start", "video_end",
                 "min_pixels", "max_pixels", "total_pixels")


def _media_refs(messages: list, kind: str, fallback: list | None) -> list:
    """The ``kind`` ("image"/"video") references of all content items, in order.

    Items without their own reference (LLaVA-style ``{"type": "image"}``) take
    the next entry of the top-level ``fallback`` list. A video item with
    options (``VIDEO_OPTIONS``, e.g. ``"fps": 1``) yields ``{"video": ref, **options}``.
    """
    if fallback is not None and not isinstance(fallback, list):
        raise RecordError(f"top-level {kind + 's'!r} must be a list, got {type(fallback).__name__}")
    refs, fallback = [], list(fallback or [])
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            continue
        for item in content:
            if isinstance(item, dict) and item.get("type") == kind:
                if item.get(kind) is not None:
                    ref = item[kind]
                elif fallback:
                    ref = fallback.pop(0)
                else:
                    raise RecordError(f"{kind} item without a {kind!r} value and no "
                                      f"top-level {kind + 's'!r} entry left for it")
                options = {k: item[k] for k in VIDEO_OPTIONS if item.get(k) is not None} if kind == "video" else {}
                refs.append({"video": ref, **options} if options else ref)
    if fallback:
        raise RecordError(f"{len(fallback)} top-level {kind + 's'!r} entries have no "
                          f"matching {{'type': '{kind}'}} item in the messages")
    return refs


def _check_messages(messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise RecordError("'messages' must be a non-empty list of {role, content} dicts")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise RecordError(f"message {m!r:.80} lacks 'role' or 'content'")
    return messages


class JsonlSource:
    """One conversation per line of a JSONL file: Qwen messages, or LLaMA-Factory / ms-swift / ShareGPT / LLaVA
    records with <image>/<video> tags, told apart per line by their keys (data_pipeline/formats.py).

    Args:
      path: the .jsonl file (local path or epath-supported URL).
      root: folder that image/video paths are relative to and confined to
        (default: the jsonl's folder).

    The file is indexed once (byte offset of each non-blank line); items are
    read by seeking, so the lines are never all held in memory.
    """

    def __init__(self, path, root=None):
        self.path = str(path)
        p = epath.Path(self.path)
        if not p.exists():
            raise FileNotFoundError(
                f"JsonlSource: {self.path} does not exist; pass a .jsonl file with one "
                "{'messages': [...]} conversation per line (see synthetic.write_jsonl).")
        self.root = str(root) if root is not None else str(p.parent)
        local = not is_remote(self.root)
        self._root_real = os.path.realpath(self.root) if local else None
        offsets, lines = [], []
        pos = 0
        with p.open("rb") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(pos)
                    lines.append(n)
                pos += len(line)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)
        self._file = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._offsets)

    def line(self, index: int) -> int:
        """The file's line number (from 1) of record `index` (blank lines hold no record)."""
        return int(self._lines[index])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_file"] = state["_lock"] = None  # file handles and locks are per process
        return state

    def __setstate__(self, state):
        self.__dict__.update(state, _lock=threading.Lock())

    def _read_line(self, i: int) -> bytes:
        # grain reads records from many threads; a seek and its read must not interleave with another thread's
        with self._lock:
            if self._file is None:
                self._file = epath.Path(self.path).open("rb")
            self._file.seek(int(self._offsets[i]))
            return self._file.readline()

    def __getitem__(self, index) -> dict:
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"JsonlSource index {i} out of range for {len(self)} records")
        i %= len(self)
        line_no = int(self._lines[i])
        default_id = f"{posixpath.basename(self.path)}:{line_no}"
        try:
            obj = json.loads(self._read_line(i))
            if not isinstance(obj, dict):
                raise RecordError("line is not a JSON object")
            qwen, consumed = to_qwen(obj)
            messages = qwen["messages"]
            images = [confined_path(r, self.root, self._root_real)
                      for r in _media_refs(messages, "image", qwen["images"])]
            videos = [{**r, "video": confined_path(r["video"], self.root, self._root_real)} if isinstance(r, dict)
                      else confined_path(r, self.root, self._root_real)
                      for r in _media_refs(messages, "video", qwen["videos"])]
        except (ValueError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            return {"error": f"{self.path} line {line_no}: {e}", "id": default_id}
        rid = obj.get("id")
        record = {"messages": messages, "images": images, "videos": videos,
                  "id": str(rid) if isinstance(rid, (str, int)) else default_id}
        record.update({k: v for k, v in obj.items()
                       if k not in _RESERVED and k not in consumed and isinstance(v, str)})
        return record


def _find_dataset_dir(path: epath.Path) -> epath.Path | None:
    """``path`` itself or its newest version subfolder holding dataset_info.json."""
    if (path / "dataset_info.json").exists():
        return path
    if path.is_dir():
        versions = sorted((d for d in path.iterdir() if (d / "dataset_info.json").exists()),
                          key=lambda d: tuple(int(x) if x.isdigit() else 0
                                              for x in d.name.split(".")))
        if versions:
            return versions[-1]
    return None


def _encode_array(arr: np.ndarray) -> bytes:
    """PNG-encodes a decoded image array (datasets using tfds.features.Image)."""
    import io

    from PIL import Image

    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


_OPEN_LOCK = threading.Lock()  # one TfdsSource opens at a time in a process (see TfdsSource.__setstate__)


class TfdsSource:
    """A TFDS dataset (ArrayRecord format) with a JSON ``messages`` text feature.

    Args:
      name_or_dir: a registered/prepared dataset name (e.g. "synthetic_vqa"),
        or a dataset folder (``.../name/1.0.0``, or ``.../name`` for its newest
        version).
      split: split spec, e.g. "train" or "test[:10%]".
      data_dir: TFDS data dir to look up a dataset name in.

    Expected features: "messages" (JSON text), "images" (sequence of encoded
    bytes or decoded images); optional "id", "videos" and text fields.
    """

    def __init__(self, name_or_dir: str, split: str = "train", data_dir=None):
        self.name_or_dir, self.split = str(name_or_dir), split
        self.data_dir = None if data_dir is None else str(data_dir)
        self._ds = None
        self._open()

    def _open(self):
        import tensorflow_datasets as tfds

        hint = ("Write the demo set with `python -c \"from data_pipeline.synthetic import "
                "write_tfds; print(write_tfds('DATA_DIR'))\"` and pass "
                "data_dir=DATA_DIR, or give the dataset folder path.")
        looks_like_path = "/" in self.name_or_dir or self.name_or_dir.startswith(".")
        if looks_like_path:
            ds_dir = _find_dataset_dir(epath.Path(self.name_or_dir))
            if ds_dir is None:
                raise FileNotFoundError(
                    f"TfdsSource: no TFDS dataset (dataset_info.json) in {self.name_or_dir} "
                    f"or its version subfolders. {hint}")
            self._ds = tfds.builder_from_directory(str(ds_dir)).as_data_source(split=self.split)
        else:
            try:
                self._ds = tfds.data_source(self.name_or_dir, split=self.split,
                                            data_dir=self.data_dir, download=False, try_gcs=False)
            except (tfds.core.registered.DatasetNotFoundError, NotImplementedError) as e:
                # NotImplementedError: a registered dataset that is not prepared
                # here in a random-access format (array_record / parquet).
                reason = str(e).splitlines()[0]
                raise FileNotFoundError(
                    f"TfdsSource: no random-access dataset {self.name_or_dir!r} in data_dir="
                    f"{self.data_dir!r} (looked for {self.name_or_dir}/<version>/"
                    f"dataset_info.json with array_record files; tfds said: {reason}). "
                    f"{hint}") from None
        features = self._ds.dataset_info.features
        if "messages" not in features:
            raise ValueError(
                f"TfdsSource: {self.name_or_dir} has features {sorted(features)}, but a "
                "'messages' text feature (JSON Qwen chat messages) is required.")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_ds"] = None  # readers are per process
        return state

    def __setstate__(self, state):
        """Reopened as it is unpickled: in a grain worker that is its main thread, before any read thread. Opened
        lazily from the read threads instead, their concurrent first `import tensorflow_datasets` can deadlock
        (tfds' lazy modules use functools.cached_property, whose lock Python 3.11 holds across the import: one
        thread holds it waiting for a module another thread is importing, which waits for it)."""
        self.__dict__.update(state)
        self._reopen()

    def _reopen(self) -> None:
        with _OPEN_LOCK:
            if self._ds is None:
                self._open()

    def __len__(self) -> int:
        if self._ds is None:
            self._reopen()
        return len(self._ds)

    def __getitem__(self, index) -> dict:
        if self._ds is None:
            self._reopen()
        i = int(index)
        raw = self._ds[i]
        rid = raw.get("id", f"{self.name_or_dir}/{self.split}:{i}")
        rid = rid.decode() if isinstance(rid, bytes) else str(rid)
        try:
            msgs = raw["messages"]
            messages = _check_messages(json.loads(msgs.decode() if isinstance(msgs, bytes) else msgs))
            images = [im if isinstance(im, bytes) else _encode_array(im)
                      for im in raw.get("images", [])]
            videos = [v.decode() if isinstance(v, bytes) else str(v) for v in raw.get("videos", [])]
        except (ValueError, TypeError) as e:
            return {"error": f"{self.name_or_dir} split {self.split} record {i}: {e}", "id": rid}
        record = {"messages": messages, "images": images, "videos": videos, "id": rid}
        for k, v in raw.items():
            if k not in _RESERVED and isinstance(v, (bytes, str)):
                record[k] = v.decode() if isinstance(v, bytes) else v
        return record


def open_source(spec: str, data_dir=None):
    """Builds a source from a spec string.

    Specs:
      ``jsonl:PATH[?root=DIR]`` or a plain ``PATH.jsonl``  -> JsonlSource
      ``tfds:NAME_OR_DIR[:SPLIT]`` (split defaults to "train") -> TfdsSource,
      with ``data_dir`` used to look up a dataset name.
    """
    spec = str(spec)
    if spec.startswith("jsonl:"):
        path, _, query = spec[len("jsonl:"):].partition("?")
        root = None
        if query:
            key, _, value = query.partition("=")
            if key != "root" or not value:
                raise ValueError(f"open_source: bad option {query!r} in {spec!r}; "
                                 "only '?root=DIR' is supported")
            root = value
        return JsonlSource(path, root=root)
    if spec.startswith("tfds:"):
        body = spec[len("tfds:"):]
        scheme, sep, rest = body.rpartition("://") if "://" in body else ("", "", body)
        name, _, split = rest.partition(":")
        return TfdsSource(scheme + sep + name, split or "train", data_dir=data_dir)
    if spec.endswith(".jsonl"):
        return JsonlSource(spec)
    raise ValueError(f"open_source: cannot interpret {spec!r}; use 'jsonl:PATH[?root=DIR]', "
                     "'tfds:NAME[:SPLIT]' (with data_dir=...) or a path ending in .jsonl")


def question_text(messages: list) -> str:
    """All text of `messages` (their text items joined by spaces), e.g. the question of a user turn."""
    parts = []
    for m in messages:
        content = m.get("content")
        parts += [content] if isinstance(content, str) else [i.get("text", "") for i in content if "text" in i]
    return " ".join(p for p in parts if p).strip()

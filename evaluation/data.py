"""Evaluation samples: a question about an image or video, and its reference answers.

    open_eval_source(spec, data_dir=None)[i] → {"index", "id", "messages" (the user turn(s)), "images", "videos",
                                                "answers": [str, ...], and for grounding "box", "width", "height"}
                                               or {"index", "id", "error"}

Specs: `PATH.jsonl` / `jsonl:PATH[?root=DIR]` — one sample per line, either
`{"id", "question", "image": "rel/path.png" | "video": "frames/" , "answers": [...], "box": [x1, y1, x2, y2]}` or
`{"id", "messages": [user turn(s)], "answers": [...]}` (media paths relative to the root, default the file's folder,
and confined to it; a gs:// file's root is its gs:// folder, and remote media URLs pass through);
`tfds:NAME[:SPLIT]` — a tfds ArrayRecord set with the training sources' schema (the demo set: the user turn is the
question, "answer" the reference);
`parquet:DIR_OR_GLOB[?root=DIR]` — every .parquet file under DIR (sorted), those matching the glob, or one file (local
or gs://), one sample per row through the task's `sample_from_row` (media columns: Hugging Face Image structs
{"bytes", "path"}, bytes, or paths relative to the root, default the files' folder); row groups are read when one of
their rows is asked for, so opening a large benchmark reads only the files' footers;
`hf:PATH[:SPLIT][?root=DIR]` — a local `datasets` `save_to_disk` folder (a Dataset, or a DatasetDict's SPLIT, default
"test", then "validation"), its Arrow files memory-mapped, rows through the task as for parquet.

A parquet / hf row the task cannot read (a missing column, a bad media cell) becomes
{"index", "id", "error": "<file> row <n>: <reason>"} (n counts from 0 within the file), so the run reports it and
goes on."""
from __future__ import annotations

import json
import os
import posixpath

import pyarrow as pa
from etils import epath

from data_pipeline.sources import RecordError, TfdsSource, confined_path
from qwen2vl_jax.processing.loading import is_remote
from evaluation import benchmark_files

SPECS = ("PATH.jsonl, jsonl:PATH[?root=DIR], tfds:NAME[:SPLIT], parquet:DIR_OR_GLOB[?root=DIR] "
         "or hf:PATH[:SPLIT][?root=DIR]")


class JsonlEvalSource:
    def __init__(self, path: str, root: str | None = None):
        self.path = path
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"evaluation data {path!r} does not exist")
        self.lines = epath.Path(path).read_text().splitlines()
        self.root = root or default_root(path)
        self.root_real = None if is_remote(self.root) else os.path.realpath(self.root)  # no symlinks remotely

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> dict:
        sid = f"{os.path.basename(self.path)}:{i + 1}"
        try:
            line = json.loads(self.lines[i])
            sid = str(line.get("id", sid))
            media = {kind: [confined_path(line[kind], self.root, self.root_real)] if line.get(kind) else []
                     for kind in ("image", "video")}
            if "messages" in line:
                messages = [m for m in line["messages"] if m.get("role") != "assistant"]
                for kind in ("image", "video"):  # items that name their file
                    media[kind] += [confined_path(item[kind], self.root, self.root_real)
                                    for m in messages if isinstance(m.get("content"), list)
                                    for item in m["content"] if isinstance(item.get(kind), str)]
            else:
                messages = [user_turn(str(line.get("question", "")), len(media["image"]), len(media["video"]))]
            answers = line.get("answers", line.get("answer", []))
            sample = {"index": i, "id": sid, "messages": messages, "images": media["image"],
                      "videos": media["video"], "answers": [answers] if isinstance(answers, str) else list(answers)}
            for key in ("box", "width", "height"):
                if key in line:
                    sample[key] = line[key]
            return sample
        except (json.JSONDecodeError, RecordError, TypeError, AttributeError, KeyError) as e:
            return {"index": i, "id": sid, "error": f"{self.path} line {i + 1}: {e}"}


class TfdsEvalSource:
    def __init__(self, name: str, split: str, data_dir: str | None):
        self.records = TfdsSource(name, split, data_dir=data_dir)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        if "error" in record:
            return {"index": i, "id": record.get("id", str(i)), "error": record["error"]}
        answers = record.get("answers") or ([record["answer"]] if record.get("answer") else [])
        messages = [m for m in record["messages"] if m.get("role") != "assistant"]
        return {"index": i, "id": record["id"], "messages": messages, "images": record.get("images", []),
                "videos": record.get("videos", []), "answers": answers}


def default_root(path: str) -> str:
    """The folder of the JSONL file: posix-style for a remote one (gs://bucket/dir), absolute for a local one."""
    if is_remote(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def user_turn(question: str, images: int, videos: int) -> dict:
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos
    return {"role": "user", "content": content + [{"type": "text", "text": question}]}


class TaskRowSource:
    """Benchmark rows (`benchmark_files.ParquetRows` / `ArrowStreamRows`) → samples through `task.sample_from_row`."""

    def __init__(self, rows, task, root: str | None, spec: str):
        self.rows, self.task, self.root, self.spec = rows, task, root, spec

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self.rows)
        file, n = self.rows.where(i)  # IndexError past the end
        row = None
        try:
            row = self.rows[i]
            sample = self.task.sample_from_row(row, i, self.root)
        # a row the task cannot read (ValueError: RecordError, pyarrow's ArrowInvalid too); an OSError (a file that
        # cannot be read now) is raised, so that a resumed run asks again rather than keeping an error line
        except (KeyError, TypeError, ValueError, pa.ArrowNotImplementedError) as e:
            reason = e.args[0] if isinstance(e, KeyError) and e.args else str(e) or type(e).__name__
            return {"index": i, "id": self._row_id(row, i), "error": f"{file} row {n}: {reason}"}
        sample = dict(sample)
        sample["index"], sample["id"] = i, str(sample.get("id", i))
        return sample

    def _row_id(self, row, i: int) -> str:
        if isinstance(row, dict):
            for column in self.task.fields.get("id", ("id",)):
                if row.get(column) is not None:
                    return str(row[column])
        return str(i)

    def close(self) -> None:
        getattr(self.rows, "close", lambda: None)()


def _split_root(spec: str) -> tuple[str, str | None]:
    if "?root=" in spec:
        path, root = spec.split("?root=", 1)
        return path, root or None
    return spec, None


def _resolve_task(task, spec: str):
    if task is None:
        raise ValueError(f"--data {spec!r}: parquet and hf data need a task (--task) to turn rows into samples")
    if isinstance(task, str):
        from evaluation.tasks import get_task

        return get_task(task)
    return task


def open_eval_source(spec: str, data_dir: str | None = None, task=None):
    """--data SPEC → a source: len(source), source[i] → sample. `task` (a `Task` or its name) turns parquet / hf
    rows into samples; JSONL and tfds sources keep their own sample shape and do not need one."""
    if spec.startswith("parquet:"):
        path, root = _split_root(spec[len("parquet:"):])
        task = _resolve_task(task, spec)
        files, default = benchmark_files.parquet_files(path)
        return TaskRowSource(benchmark_files.ParquetRows(files), task, root or default, spec)
    if spec.startswith("hf:"):
        path, root = _split_root(spec[len("hf:"):])
        task = _resolve_task(task, spec)
        head, _, tail = path.rpartition(":")
        split = None
        if head and tail and "/" not in tail and not os.path.isdir(path):  # hf:PATH:SPLIT
            path, split = head, tail
        files, _ = benchmark_files.hf_saved_dataset(path, split)
        return TaskRowSource(benchmark_files.ArrowStreamRows(files), task, root or os.path.dirname(files[0]), spec)
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        return TfdsEvalSource(name, split or "test", data_dir)
    path, root = spec[len("jsonl:"):] if spec.startswith("jsonl:") else spec, None
    if "?root=" in path:
        path, root = path.split("?root=", 1)
    if not path.endswith(".jsonl"):
        raise ValueError(f"--data {spec!r}: pass {SPECS}")
    return JsonlEvalSource(path, root)


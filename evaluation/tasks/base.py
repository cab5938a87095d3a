"""The shape of a benchmark task: how its rows become samples, how a sample is asked, how an answer is scored.

    task = evaluation.tasks.get_task("docvqa")
    sample = task.sample_from_row(row, index, root)   # a benchmark file's row (parquet / hf / jsonl) → sample
    messages = task.messages(sample)              # the user turn(s) the model is asked, in the task's wording
    value = task.score(prediction, sample, lenient=False)   # official rules by default

A sample (what `evaluation.data.open_eval_source(spec, task=task)[i]` returns):

    {"index": int, "id": str, "question": str, "images": [bytes | path | URL, ...], "videos": [path, ...],
     "answers": [str, ...], ... task extras ("options", "box", "width", "height", "category", ...)}
    or {"index", "id", "messages"} when the data already holds the user turn(s), or {"index", "id", "error"}.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Task:
    """One benchmark family. Subclasses override `messages`, `score` and, where the rows need it, `sample_from_row`.

    fields: sample key → the column names a benchmark file may use for it, first match wins (e.g.
    {"question": ("question",), "answers": ("answers", "answer")}); image_columns / video_columns: the columns
    holding media (an image column's value is bytes, {"bytes", "path"} as Hugging Face's Image feature stores it, a
    path, or a list of those)."""

    name: str
    metric: str  # the name printed in the summary, e.g. "anls"
    max_new_tokens: int
    fields: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
    image_columns: Sequence[str] = ("image",)
    video_columns: Sequence[str] = ("video",)

    def sample_from_row(self, row: Mapping[str, Any], index: int, root: str | None = None) -> dict:
        """A benchmark row → a sample: `fields` looked up (first present column wins; "answers" always a list of
        str), the media columns' cells through `media_values`. KeyError naming the missing column."""
        sample: dict[str, Any] = {"index": index, "id": str(_first(row, self.fields.get("id", ("id",)), index))}
        for key, columns in self.fields.items():
            if key != "id":
                sample[key] = _first(row, columns, None)
                if sample[key] is None and key in ("question", "answers"):
                    raise KeyError(f"row {index} has none of the columns {list(columns)} for {key!r}; "
                                   f"the row has {sorted(row)}")
        if "answers" in sample:
            answers = sample["answers"]
            sample["answers"] = [str(answers)] if isinstance(answers, (str, int, float)) else [str(a) for a in answers]
        sample["images"] = [m for c in self.image_columns if row.get(c) is not None for m in media_values(row[c], root)]
        sample["videos"] = [m for c in self.video_columns if row.get(c) is not None for m in media_values(row[c], root)]
        return sample

    def for_model(self, model_type: str) -> "Task":
        """This task as asked of a checkpoint of `model_type` ("qwen2_vl" | "qwen2_5_vl"): itself, unless the
        family changes the prompt or how answers are read (grounding)."""
        return self

    def messages(self, sample: Mapping[str, Any]) -> list[dict]:
        raise NotImplementedError

    def score(self, prediction: str, sample: Mapping[str, Any], *, lenient: bool = False) -> float:
        raise NotImplementedError


def _first(row: Mapping[str, Any], columns: Sequence[str], default: Any) -> Any:
    for column in columns:
        if column in row and row[column] is not None:
            return row[column]
    return default


def media_values(cell: Any, root: str | None) -> list:
    """A media cell → [bytes | path, ...]: bytes as they are, Hugging Face's {"bytes", "path"} struct (its bytes, or
    its path when it has none), a path or URL (relative paths joined to `root` and confined to it), or a list of
    those."""
    from data_pipeline.sources import confined_path

    if cell is None:
        return []
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return [bytes(cell)]
    if isinstance(cell, Mapping):
        if cell.get("bytes"):
            return [bytes(cell["bytes"])]
        return media_values(cell.get("path"), root)
    if isinstance(cell, str):
        if "://" in cell or root is None:
            return [cell]
        return [confined_path(cell, root, None)]
    if isinstance(cell, Sequence):
        return [m for item in cell for m in media_values(item, root)]
    raise TypeError(f"a media cell must be bytes, a path, a {{'bytes', 'path'}} struct or a list; got "
                    f"{type(cell).__name__}")


def complete_turns(task: Task, messages: Sequence[Mapping]) -> list[dict]:
    """The user turn(s) of a sample that already holds them (`{"messages": ...}` data): the task's own
    `complete_turns(messages)` where it has one (e.g. its post-prompt appended), else the turns as they are."""
    method = getattr(task, "complete_turns", None)
    return method(messages) if method is not None else [dict(m) for m in messages]

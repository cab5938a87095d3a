"""Evaluation samples: a question about an image or video, and its reference answers.

    open_eval_source(spec, data_dir=None)[i] → {"index", "id", "messages" (the user turn(s)), "images", "videos",
                                                "answers": [str, ...], and for grounding "box", "width", "height"}
                                               or {"index", "id", "error"}

Specs: `PATH.jsonl` / `jsonl:PATH[?root=DIR]` — one sample per line, either
`{"id", "question", "image": "rel/path.png" | "video": "frames/" , "answers": [...], "box": [x1, y1, x2, y2]}` or
`{"id", "messages": [user turn(s)], "answers": [...]}` (media paths relative to the root, default the file's folder,
and confined to it; a gs:// file's root is its gs:// folder, and remote media URLs pass through);
`tfds:NAME[:SPLIT]` — a tfds ArrayRecord set with the training sources' schema (the demo set: the user turn is the
question, "answer" the reference)."""
from __future__ import annotations

import json
import os
import posixpath

from etils import epath

from data_pipeline.sources import RecordError, TfdsSource, _is_remote, confined_path


class JsonlEvalSource:
    def __init__(self, path: str, root: str | None = None):
        self.path = path
        if not epath.Path(path).exists():
            raise FileNotFoundError(f"evaluation data {path!r} does not exist")
        self.lines = epath.Path(path).read_text().splitlines()
        self.root = root or default_root(path)
        self.root_real = None if _is_remote(self.root) else os.path.realpath(self.root)  # no symlinks remotely

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
    if _is_remote(path):
        return posixpath.dirname(path.rstrip("/"))
    return os.path.dirname(os.path.abspath(path))


def user_turn(question: str, images: int, videos: int) -> dict:
    content = [{"type": "image"}] * images + [{"type": "video"}] * videos
    return {"role": "user", "content": content + [{"type": "text", "text": question}]}


def open_eval_source(spec: str, data_dir: str | None = None):
    if spec.startswith("tfds:"):
        name, _, split = spec[len("tfds:"):].partition(":")
        return TfdsEvalSource(name, split or "test", data_dir)
    path, root = spec[len("jsonl:"):] if spec.startswith("jsonl:") else spec, None
    if "?root=" in path:
        path, root = path.split("?root=", 1)
    if not path.endswith(".jsonl"):
        raise ValueError(f"--data {spec!r}: pass PATH.jsonl, jsonl:PATH[?root=DIR] or tfds:NAME[:SPLIT]")
    return JsonlEvalSource(path, root)


"""What decides an evaluation's number, recorded beside it: `run_settings(...)` → a JSON-able dict written to
OUT.settings.json before the first prediction and into every summary (TASK.summary.json, summary.json/.md).

    {"checkpoint": {"path", "model_type", "fingerprint"}, "task": {"name", "metric", "definition", "fields"},
     "processor": {"image": {min_pixels, max_pixels}, "video": {min_pixels, max_pixels, total_pixels, fps,
     min_frames, max_frames}}, "generation": {"max_new_tokens", "temperature", "top_k", "top_p",
     "repetition_penalty", "eos_token_ids"}, "dtype", "scoring": {"rule", "script"}, "ladders": {...},
     "project": {"version", "commit", "dirty"}}

A rerun with the same OUT resumes only when its settings equal the recorded ones (`check_resume`): a difference is
refused with the fields named, since merging predictions made two ways gives a number neither way gives. How the
work was spread (batch size, chunk, mesh, processes) is not a setting: it changes no prediction. `MediaUsed` records
what a run's images and videos actually got (the settings give the limits)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import subprocess

import numpy as np
from etils import epath

CHECKPOINT_INDEX_FILES = ("config.json", "generation_config.json", "preprocessor_config.json",
                          "model.safetensors.index.json", "qwen2vl_jax.json")

# the script each task's official scoring follows (evaluation.metrics, evaluation/tasks/), named in every summary
_VQA = "VQA vqaEval.py at GT-Vision-Lab/VQA a013f00 (2021-03-11), n == 1: normalized match"
_GROUNDING = {"qwen2_vl": "Qwen-VL evaluate_grounding.py: (x1,y1),(x2,y2) on the 0-999 grid, IoU >= 0.5",
              "qwen2_5_vl": "Qwen2.5-VL JSON bbox_2d in resized-image pixels, mapped to the original, IoU >= 0.5"}
SCORING_SCRIPTS = {
    "vqa": _VQA, "vqav2": _VQA, "textvqa": _VQA,
    "docvqa": "DocVQA leaderboard ANLS, threshold 0.5", "infovqa": "DocVQA leaderboard ANLS, threshold 0.5",
    "chartqa": "pix2struct relaxed_correctness, 5 %, best over the answers",
    "exact": "exact match after stripping",
    "realworldqa": "lmms-eval exact_match, case and punctuation ignored",
    "mathvista": "MathVista normalization with rule-based answer extraction (no GPT extractor)",
    "mmbench": "lmms-eval MMMU parse_multi_choice_response", "mmmu": "lmms-eval MMMU parse_multi_choice_response",
    "mvbench": "lmms-eval mvbench mcq_acc", "videomme": "Video-MME extract_characters_regex",
    "ocrbench": "OCRBench scorer (lmms-eval ocrbench)",
}


def scoring_script(task, scoring: str) -> str:
    """The rule a task's scores were computed by, in words."""
    if scoring == "lenient":
        return "lenient: this project's earlier, more forgiving rules (evaluation.metrics, lenient=True)"
    if task.name.startswith("refcoco"):
        return _GROUNDING.get(getattr(task, "family", "qwen2_vl"), task.metric)
    return SCORING_SCRIPTS.get(task.name, task.metric)


def settings_path(out: str) -> str:
    return f"{out}.settings.json"


def checkpoint_fingerprint(path: str) -> str:
    """sha256 (first 16 hex) of the checkpoint's small index files (config, generation and preprocessor configs,
    the safetensors index, the converter's record) and of every file's relative path and size: a different config or
    different weight files change it; reading it never reads the weights."""
    root = epath.Path(path)
    digest = hashlib.sha256()
    for name in CHECKPOINT_INDEX_FILES:
        if (root / name).exists():
            digest.update(name.encode() + b"\0" + (root / name).read_bytes() + b"\0")
    digest.update(json.dumps(sorted(_file_sizes(root, ""))).encode())
    return digest.hexdigest()[:16]


def _file_sizes(folder: epath.Path, prefix: str, depth: int = 5):
    """(relative path, size) of every file under `folder`, `depth` levels down at most (gs:// has no rglob)."""
    for entry in folder.iterdir():
        if entry.is_dir():
            if depth:
                yield from _file_sizes(entry, f"{prefix}{entry.name}/", depth - 1)
        else:
            yield f"{prefix}{entry.name}", entry.stat().length


@functools.lru_cache(maxsize=None)
def project_version() -> dict:
    """{"version": the installed package's, "commit": HEAD of the source tree's git repository (None outside one),
    "dirty": whether tracked files differ from it}."""
    from importlib import metadata

    try:
        version = metadata.version("qwen2vl-jax")
    except metadata.PackageNotFoundError:
        version = None
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *args: subprocess.run(["git", "-C", here, *args], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip()) if commit else None
    except (OSError, subprocess.TimeoutExpired):
        commit, dirty = None, None
    return {"version": version, "commit": commit, "dirty": dirty}


def task_settings(task) -> dict:
    """The task as asked: its name, metric and every field of its definition (prompt templates, columns,
    max_new_tokens, the checkpoint family it was specialized for), with a short hash of them as "definition"."""
    fields = json.loads(json.dumps(dataclasses.asdict(task), default=str))
    definition = hashlib.sha256(json.dumps([type(task).__name__, fields], sort_keys=True).encode()).hexdigest()[:12]
    return {"name": task.name, "metric": task.metric, "definition": definition, "fields": fields}


def run_settings(checkpoint: str, config, processor, task, *, max_new_tokens: int, scoring: str,
                 dtype: str | None, param_dtype: str, ladders) -> dict:
    """The settings of one task's run (see the module docstring). `dtype`: the --dtype asked for (None: as stored);
    `param_dtype`: what the weights are in memory."""
    from qwen2vl_jax.processing import video as video_defaults

    generation = config.generation
    image, video = processor.image_options, processor.video_options
    return {
        "checkpoint": {"path": os.fspath(checkpoint), "model_type": config.model_type,
                       "fingerprint": checkpoint_fingerprint(checkpoint)},
        "task": task_settings(task),
        "processor": {
            "image": {"min_pixels": image.min_pixels, "max_pixels": image.max_pixels},
            "video": {"min_pixels": video.min_pixels, "max_pixels": video.max_pixels,
                      "total_pixels": video.total_pixels, "fps": video_defaults.VIDEO_FPS,
                      "min_frames": video_defaults.VIDEO_MIN_FRAMES, "max_frames": video_defaults.VIDEO_MAX_FRAMES},
        },
        "generation": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "top_k": None, "top_p": None,
                       "repetition_penalty": generation.repetition_penalty or 1.0,
                       "eos_token_ids": list(processor.tokenizer.eos_token_ids)},
        "dtype": {"requested": dtype, "params": param_dtype},
        "scoring": {"rule": scoring, "script": scoring_script(task, scoring)},
        "ladders": dataclasses.asdict(ladders),
        "project": project_version(),
    }


def differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """[(dotted field, old value, new value)] where two settings dicts differ."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


class SettingsChanged(ValueError):
    """A rerun whose settings differ from those the predictions in OUT were made with."""


def check_resume(out: str, settings: dict, has_predictions: bool) -> None:
    """Refuses (SettingsChanged naming each differing field) to add to OUT's predictions under other settings than
    those recorded in OUT.settings.json. Predictions without a record (written before settings were recorded) are
    kept, with a warning, and the record starts now."""
    path = epath.Path(settings_path(out))
    if not path.exists():
        if has_predictions:
            import warnings
            warnings.warn(f"{out} holds predictions without {path.name} (written before settings were recorded); "
                          "resuming and recording this run's settings", stacklevel=2)
        return
    changed = differences(json.loads(path.read_text()), json.loads(json.dumps(settings)))
    if changed:
        listed = "; ".join(f"{field}: {old!r} then, {new!r} now" for field, old, new in changed[:8])
        raise SettingsChanged(
            f"{out} was written with other settings ({len(changed)} differ: {listed}). Predictions made two ways "
            f"do not add up to one score: rerun with the recorded settings ({path}), or pass a new --out")


def settings_markdown(summaries: list[dict]) -> str:
    """The settings under a multi-task table: those every task shares once, then each task's own."""
    flats = [{k: v for k, v in _flatten(s.get("settings") or {}) if not k.startswith("task.fields.")}
             for s in summaries]  # a task's fields are in summary.json; its definition hash stands for them here
    if not flats or not any(flats):
        return ""
    shared = {k: v for k, v in flats[0].items() if all(f.get(k, object()) == v for f in flats[1:])}
    lines = ["", "Settings (all tasks):", ""] + [f"- {k}: {json.dumps(v)}" for k, v in shared.items()]
    for summary, flat in zip(summaries, flats):
        own = {k: v for k, v in flat.items() if k not in shared}
        if own:
            lines += ["", f"{summary['task']}:", ""] + [f"- {k}: {json.dumps(v)}" for k, v in own.items()]
    return "\n".join(lines) + "\n"


def _flatten(d: dict, prefix: str = ""):
    for key, value in d.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


class MediaUsed:
    """The sizes the processor actually gave this run's images and videos (the settings say what it may give)."""

    KEYS = ("image_pixels_min", "image_pixels_max", "video_frames_min", "video_frames_max", "video_frame_pixels_min",
            "video_frame_pixels_max", "video_fps_min", "video_fps_max")

    def __init__(self):
        self.values = np.array([np.inf, -np.inf] * 4)

    def add(self, batch: dict, patch: int, temporal: int) -> None:
        found = [[], [], [], []]
        for _, h, w in batch.get("image_grid_thw", ()):
            found[0].append(int(h) * int(w) * patch * patch)
        for (t, h, w), seconds in zip(batch.get("video_grid_thw", ()), batch.get("second_per_grid_ts", ())):
            found[1].append(int(t) * temporal)
            found[2].append(int(h) * int(w) * patch * patch)
            found[3].append(temporal / float(seconds))
        for k, seen in enumerate(found):
            if seen:
                self.values[2 * k] = min(self.values[2 * k], min(seen))
                self.values[2 * k + 1] = max(self.values[2 * k + 1], max(seen))

    @staticmethod
    def summary(values: np.ndarray) -> dict:
        return {key: (None if not np.isfinite(v) else round(float(v), 3) if "fps" in key else int(v))
                for key, v in zip(MediaUsed.KEYS, values)}

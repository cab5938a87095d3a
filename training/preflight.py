"""Checks a training config and its workdir before any device work, so a mistake costs seconds, not a compile.

    check_config(config, batch_shards, patch_size, merge_size)  # values that cannot work, naming the field
    check_workdir(workdir)                                       # writable (local or gs://)
    check_disk(workdir, checkpoint_bytes)                        # room for one more checkpoint (local disks)
    check_resume(config, workdir)                                # a resumed run keeps the settings of its checkpoint
    unknown_field(argv, error)                                   # a `--config.FIELD=` typo → the message to print

Each failure is a `PreflightError` that names the field or path and says what to do."""
from __future__ import annotations

import json
import os
import re
import shutil

from etils import epath

# fields a resumed run may change: they decide neither the state nor the data order
RESUMABLE_CHANGES = frozenset({"steps", "log_every", "checkpoint_every", "keep_checkpoints", "tensorboard",
                               "compile_cache", "demo_eval", "max_nonfinite_steps", "data.workers", "data.eval",
                               "data.demo_set", "data.data_dir", "chip"})
# fields added since a checkpoint may have been written: absent there equals their default here
ADDED_FIELDS = {"optim.freeze": "", "optim.lr_multipliers": "", "chip": "", "lora.rank": 0, "lora.alpha": 16.0,
                "lora.dropout": 0.0, "lora.targets": "", "lora.base_dtype": "bfloat16"}


class PreflightError(ValueError):
    """A config or workdir that cannot work; raised before any device work."""


def check_config(config, batch_shards: int, patch_size: int, merge_size: int) -> None:
    """Values that cannot work: non-positive counts and rates, unordered ladders, a batch the mesh's batch shards do
    not divide, and buckets too small for one image at data.max_pixels (every such image would be dropped)."""
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for field in ("steps", "checkpoint_every", "log_every", "keep_checkpoints", "data.batch_size",
                  "optim.grad_accum", "max_nonfinite_steps"):
        value = _get(config, field)
        need(isinstance(value, int) and value > 0, f"{field}={value!r} must be a positive integer")
    lr = config.optim.learning_rate
    need(isinstance(lr, (int, float)) and lr > 0, f"optim.learning_rate={lr!r} must be > 0")
    need(config.optim.warmup_steps >= 0, f"optim.warmup_steps={config.optim.warmup_steps} must be ≥ 0")
    need(bool(config.data.train), "data.train is empty: set it to jsonl:PATH[?root=DIR] or tfds:NAME[:SPLIT]")
    data = config.data
    for field in ("length_buckets", "vision_buckets"):
        ladder = list(data[field])
        need(bool(ladder) and all(isinstance(v, int) and v > 0 for v in ladder) and ladder == sorted(set(ladder)),
             f"data.{field}={ladder} must be increasing positive integers")
    if problems:
        raise PreflightError(_listed(problems))
    steps, accum = config.steps, config.optim.grad_accum
    need(steps % accum == 0, f"steps={steps} is not a multiple of optim.grad_accum={accum}: the last update "
         "would be partial; use a multiple")
    need(data.batch_size % batch_shards == 0,
         f"data.batch_size={data.batch_size} is not a multiple of the mesh's {batch_shards} batch shards (its data × "
         f"fsdp devices, mesh={config.mesh!r}); use a multiple of {batch_shards}")
    if data.max_pixels:
        patches = data.max_pixels // patch_size**2  # smart_resize keeps h·w ≤ max_pixels
        per_shard = max(data.vision_buckets) // batch_shards
        need(per_shard >= patches,
             f"data.vision_buckets={list(data.vision_buckets)}: the largest gives each of the {batch_shards} batch "
             f"shards {per_shard} patch rows, but one image at data.max_pixels={data.max_pixels} has up to "
             f"{patches}; raise the ladder's top rung to ≥ {patches * batch_shards} or lower data.max_pixels")
        span = data.max_pixels // (patch_size * merge_size) ** 2 + 2  # placeholders + vision start/end
        need(max(data.length_buckets) >= span,
             f"data.length_buckets={list(data.length_buckets)}: the longest row holds {max(data.length_buckets)} "
             f"tokens, but one image at data.max_pixels={data.max_pixels} takes up to {span}; raise the top rung "
             "or lower data.max_pixels")
    if problems:
        raise PreflightError(_listed(problems))


def check_workdir(workdir: str, process_index: int = 0) -> None:
    """The workdir (created if absent) takes a file: raises PreflightError naming it otherwise."""
    path = epath.Path(workdir)
    probe = path / f".write-probe-{process_index}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("qwen2vl-train write probe")
        probe.unlink()
    except Exception as e:  # any filesystem's refusal: OSError locally, PermissionError / HTTP errors on gs://
        raise PreflightError(f"--workdir {workdir} cannot be written ({type(e).__name__}: {e}); use a folder this "
                             "user can write (for gs://, a bucket the job's service account may create objects "
                             "in)") from e


def check_disk(workdir: str, checkpoint_bytes: int) -> None:
    """A local workdir has room for one more checkpoint (Orbax writes a step before deleting the oldest)."""
    if "://" in str(workdir):
        return
    free = shutil.disk_usage(workdir).free
    need = int(checkpoint_bytes * 1.1) + (64 << 20)
    if free < need:
        raise PreflightError(f"--workdir {workdir} has {free / 2**30:.2f} GiB free, but a checkpoint of this run "
                             f"takes {checkpoint_bytes / 2**30:.2f} GiB; free space there or use another workdir")


def check_resume(config, workdir: str) -> None:
    """A workdir with checkpoints is resumed: the config given must keep every setting its config.json holds but
    those in RESUMABLE_CHANGES."""
    path = epath.Path(workdir)
    checkpoints = path / "checkpoints"
    saved = path / "config.json"
    if not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()) and saved.exists()):
        return
    before = ADDED_FIELDS | _flat(json.loads(saved.read_text()))
    now = _flat(json.loads(config.to_json_best_effort()))
    changed = [k for k in sorted(set(before) | set(now))
               if before.get(k) != now.get(k) and not any(k == f or k.startswith(f + ".") for f in RESUMABLE_CHANGES)]
    if changed:
        lines = [f"{k}: checkpoint {before.get(k, '(absent)')!r}, now {now.get(k, '(absent)')!r}" for k in changed]
        raise PreflightError(f"{workdir} holds checkpoints of a run with other settings ({saved}):\n  " +
                             "\n  ".join(lines) + "\nresume with the checkpoint's values, or use a new --workdir "
                             f"(only {', '.join(sorted(RESUMABLE_CHANGES))} may change on resume)")


def unknown_field(argv: list[str], error: BaseException) -> str | None:
    """The message for a `--config.FIELD=VALUE` naming no field of the config (ml_collections raised `error`
    while absl parsed the flags), or None when `error` is not that."""
    text = str(error)
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if not flag.startswith("--config."):
            continue
        for name in flag[len("--config."):].split("."):
            if re.search(rf"['\\]{re.escape(name)}['\\]", text):
                hint = f"Did you mean {suggestion.group(1)!r}? " if suggestion else ""
                return (f"qwen2vl-train: {flag} names no config field ({name!r} is unknown). {hint}"
                        "configs/common.py lists every field with its default.")
    return None


def _get(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _listed(problems: list[str]) -> str:
    return problems[0] if len(problems) == 1 else "the config has problems:\n  " + "\n  ".join(problems)

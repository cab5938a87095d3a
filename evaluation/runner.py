"""Batched, resumable evaluation: `qwen2vl-eval --checkpoint DIR --data SPEC --task NAME --out preds.jsonl`.

Several benchmarks in one process (one model load; programs compiled for one task are reused by the next):
`qwen2vl-eval --checkpoint DIR --tasks docvqa,chartqa --data docvqa=parquet:/data/docvqa --data chartqa=SPEC
--out results/` writes results/TASK.jsonl (+ TASK.summary.json) per task and one table, results/summary.md and
summary.json. Tasks (prompt, answer extraction, metric, columns, max_new_tokens): evaluation/tasks/. `--scoring
lenient` scores by this project's earlier, more forgiving rules instead of the benchmarks' (default official).

Each process takes every process_count-th sample (data parallel over hosts) and runs one SPMD program over its
devices (`--mesh`, default data=-1: each batch split over every local device; `tensor=N` splits the weights, for
models one device cannot hold). It prepares each sample with the checkpoint's Processor, generates greedily through
`qwen2vl_jax.generation.generate_many` (bucketed shapes; it batches a chunk's samples in size order so a batch holds
similar shapes) and writes one line per sample to
its part `OUT.part<process>` after each chunk (a killed run loses at most the chunk in flight):

- a local OUT: the part is appended to, flushed and fsynced;
- a remote OUT (gs://, s3://; object stores have neither append nor fsync): the part is appended to a file in a
  local work folder (flushed and fsynced) and that file is copied whole to `OUT.part<process>` after every chunk.
  An object is written all or nothing, so a kill leaves the previous chunk's copy, and a rerun resumes from it.

A process that has written all its samples leaves `OUT.part<process>.done` (its line count and host). At the end
process 0 waits for every process, checks that every `.done` marker and part is visible to it — OUT must be on
storage every host sees (a shared filesystem or gs://); on a host's own disk the others' parts are not there, and
that is an error, never a silently shorter file — then merges every part and any earlier OUT into OUT in input
order (so an interrupted run, rerun with the same --out, ends with the file an uninterrupted run writes) and writes
OUT's summary (`preds.summary.json`).

Output line: {"index", "id", "prompt", "prediction", "answers", "score", "error"}; a sample that cannot run (missing
or corrupt image, empty question, too long) gets its error, score null, and the run goes on.

What decides the number (evaluation/settings.py: checkpoint path + fingerprint, task definition, pixel and video
limits, generation settings, dtype, scoring rule, ladders, project version + commit) is written to OUT.settings.json
before the first prediction and into the summary, with what this invocation's samples actually got: the image and
video sizes ("media_used") and the share of each padded axis that was padding ("padding").
A rerun with the same --out resumes only under the same settings: any difference is refused, naming the fields."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from data_pipeline.sources import question_text
from qwen2vl_jax.processing.loading import is_remote
from evaluation.data import open_eval_source
from evaluation.serving import DEFAULT_MESH, add_model_flags, open_model
from evaluation.settings import MediaUsed, check_resume, run_settings, settings_path
from evaluation.summary import markdown, print_table, write_tables
from evaluation.tasks import TASKS, Task, complete_turns, get_task
from qwen2vl_jax.buckets import Ladders


def summary_path(out: str) -> str:
    return out[:-len(".jsonl")] + ".summary.json" if out.endswith(".jsonl") else out + ".summary.json"


def part_path(out: str, rank: int) -> str:
    return f"{out}.part{rank}"


def done_path(out: str, rank: int) -> str:
    return f"{out}.part{rank}.done"


class PartWriter:
    """This process's output lines, kept where a rerun resumes from (see the module docstring): appended to
    OUT.part<rank> when OUT is local, else to a local work file copied whole to OUT.part<rank> after each chunk."""

    def __init__(self, out: str, rank: int):
        self.out, self.rank = out, rank
        self.part = epath.Path(part_path(out, rank))
        self.remote = is_remote(out)
        epath.Path(done_path(out, rank)).unlink(missing_ok=True)  # the marker says "this run wrote them all"
        self.kept = read_lines(self.part)
        kept = "".join(json.dumps(line) + "\n" for line in self.kept)
        self.count = len(self.kept)
        self.workdir = tempfile.mkdtemp(prefix="qwen2vl-eval-") if self.remote else None
        local = os.path.join(self.workdir, self.part.name) if self.remote else os.fspath(self.part)
        if self.remote or (os.path.exists(local) and _read(local) != kept):
            write_whole(local, kept)  # a line cut off by a kill is dropped, so the next one starts on a new line
        self.sink = open(local, "a")

    def write(self, lines: list[dict]) -> None:
        """Appends `lines` and makes them durable where OUT is (a chunk at a time)."""
        self.sink.write("".join(json.dumps(line) + "\n" for line in lines))
        self.sink.flush()
        os.fsync(self.sink.fileno())
        self.count += len(lines)
        if self.remote:
            self.part.write_text(_read(self.sink.name))

    def finish(self) -> None:
        """Closes the part and leaves its .done marker (line count and host) beside it."""
        self.sink.close()
        if self.remote:
            self.part.write_text(_read(self.sink.name))
            shutil.rmtree(self.workdir, ignore_errors=True)
        marker = {"rank": self.rank, "lines": self.count, "host": socket.gethostname(), "part": os.fspath(self.part)}
        epath.Path(done_path(self.out, self.rank)).write_text(json.dumps(marker))

    def close(self) -> None:
        """Closes without a marker (the run was interrupted)."""
        if not self.sink.closed:
            self.sink.close()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def write_whole(path, text: str) -> None:
    """`text` as the whole of `path`, never half written: an object store's write is atomic; a local file goes
    through a fsynced temporary file and a rename."""
    path = os.fspath(path)
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_lines(path) -> list[dict]:
    """The complete JSON lines of `path` (a line cut off by a kill is dropped)."""
    path = epath.Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def prepare(processor, sample: dict, task: Task | str) -> tuple[dict | None, str, str | None]:
    """sample → (generate request or None, prompt text, error or None). The user turn: `task.messages(sample)` for
    a sample that gives its question, the sample's own turns completed by the task (its post-prompt) otherwise."""
    from data_pipeline.transforms import with_name
    from qwen2vl_jax.processing.loading import load_image

    task = get_task(task) if isinstance(task, str) else task
    if "error" in sample:
        return None, "", sample["error"]
    try:
        if "messages" in sample:
            if not question_text(sample["messages"]):
                return None, "", "empty question"
            messages = complete_turns(task, sample["messages"])
        else:
            if not str(sample.get("question") or "").strip():
                return None, "", "empty question"
            messages = task.messages(sample)
    except (KeyError, ValueError, TypeError, IndexError) as e:  # a row without what the task's prompt needs
        return None, "", f"cannot build the prompt: {type(e).__name__}: {e}"
    prompt = question_text(messages)
    try:
        images = [with_name(r, load_image) for r in sample.get("images", ())]  # paths, gs://, http(s), data: URIs
        videos = list(sample.get("videos", ()))  # paths or qwen-vl-utils items: the processor decodes them
        batch = processor([messages], images=images or None, videos=videos or None)
    except (ValueError, OSError, TypeError) as e:
        return None, prompt, f"{type(e).__name__}: {e}"
    if "image_grid_thw" in batch:  # [height, width] of each image as the processor resized it (grounding reads it)
        patch = processor.image_options.patch_size
        sample["resized_sizes"] = [[int(h) * patch, int(w) * patch] for _, h, w in batch["image_grid_thw"]]
    return batch, prompt, None


def _open_source(spec: str, data_dir: str | None, task: Task):
    import inspect

    if "task" in inspect.signature(open_eval_source).parameters:
        return open_eval_source(spec, data_dir, task=task)
    return open_eval_source(spec, data_dir)


def evaluate(checkpoint: str, data: str, task: str, out: str, **options) -> dict:
    """Runs (or finishes) one task's evaluation; → its summary (process 0) or {} (other processes). `options`: those
    of `evaluate_tasks`."""
    summaries = evaluate_tasks(checkpoint, [(task, data, out)], **options)
    return summaries[0] if summaries else {}


def evaluate_tasks(checkpoint: str, jobs: list[tuple[str, str, str]], *, batch_size: int = 8,
                   max_new_tokens: int | None = None, data_dir: str | None = None, limit: int | None = None,
                   dtype: str | None = None, chunk: int = 64, mesh: str = DEFAULT_MESH,
                   scoring: str = "official", ladders: Ladders = Ladders()) -> list[dict]:
    """Runs (or finishes) each (task, data spec, out) in turn on one model load: the compiled programs are reused
    from task to task (a task whose shapes an earlier one built compiles nothing). → the summaries (process 0) or
    [] (other processes); each summary's "compiles" counts the programs built during that task and "padding" the
    share of each padded axis that was padding (generation's PaddingStats over the task). `ladders`: the shape
    buckets (buckets.Ladders; the default is what a user gets)."""
    from qwen2vl_jax.processing import Processor
    from sharding.mesh import initialize_distributed

    if scoring not in ("official", "lenient"):
        raise ValueError(f"--scoring {scoring!r}: choose official or lenient")
    tasks = [get_task(name) for name, _, _ in jobs]
    initialize_distributed()
    processor = Processor.from_pretrained(checkpoint)
    model = open_model(checkpoint, mesh, dtype)
    tasks = [task.for_model(model.config.model_type) for task in tasks]
    param_dtype = str(jax.tree.leaves(model.params)[0].dtype)
    summaries = []
    for task, (_, data, out) in zip(tasks, jobs):
        new_tokens = max_new_tokens or task.max_new_tokens
        settings = run_settings(checkpoint, model.config, processor, task, max_new_tokens=new_tokens, scoring=scoring,
                                dtype=dtype, param_dtype=param_dtype, ladders=ladders)
        summaries.append(run_task(model, processor, task, data, out, batch_size=batch_size, data_dir=data_dir,
                                  max_new_tokens=new_tokens, limit=limit, chunk=chunk, lenient=scoring == "lenient",
                                  settings=settings, ladders=ladders))
    return summaries if jax.process_index() == 0 else []


def run_task(model, processor, task: Task, data: str, out: str, *, batch_size: int, max_new_tokens: int,
             data_dir: str | None, limit: int | None, chunk: int, lenient: bool, settings: dict | None = None,
             ladders: Ladders = Ladders()) -> dict:
    """One task on an opened model: this process's samples generated and written to its part, then (process 0)
    every part merged into `out` and its summary; → the summary (process 0) or {}. `settings` (evaluation.settings):
    checked against those OUT was written with (a difference is refused), recorded beside OUT and in the summary."""
    from qwen2vl_jax.compiles import CompileCounter
    from qwen2vl_jax.generation import STATS, generate_many

    rank, ranks = jax.process_index(), jax.process_count()
    earlier = read_lines(out)
    if settings is not None:
        check_resume(out, settings, bool(earlier or read_lines(part_path(out, rank))))
        if rank == 0 and not epath.Path(settings_path(out)).exists():
            write_whole(settings_path(out), json.dumps(settings, indent=2))
    source = _open_source(data, data_dir, task)
    total = len(source) if limit is None else min(limit, len(source))
    sink = PartWriter(out, rank)
    done = {line["index"] for line in earlier + sink.kept}
    todo = [i for i in range(rank, total, ranks) if i not in done]
    eos = processor.tokenizer.eos_token_ids
    media = MediaUsed()
    padding_before = STATS.real.copy(), STATS.padded.copy()
    start, processed = time.perf_counter(), 0
    with CompileCounter() as compiles, contextlib.closing(sink), \
            tqdm(total=len(range(rank, total, ranks)), initial=len(range(rank, total, ranks)) - len(todo),
                 desc=f"eval {task.name}", unit="sample", disable=rank != 0) as bar:
        for at in range(0, len(todo), chunk):
            samples = [source[i] for i in todo[at:at + chunk]]
            prepared = [prepare(processor, s, task) for s in samples]
            runnable = [k for k, (request, _, _) in enumerate(prepared) if request is not None]
            for k in runnable:
                media.add(prepared[k][0], processor.image_options.patch_size,
                          processor.video_options.temporal_patch_size)
            with model.context():
                results = dict(zip(runnable, generate_many(model.config, model.params,
                                                           [prepared[k][0] for k in runnable], batch_size=batch_size,
                                                           max_new_tokens=max_new_tokens, temperature=0.0,
                                                           eos_token_ids=eos, ladders=ladders)))
            written = []
            for k, (sample, (_, prompt, error)) in enumerate(zip(samples, prepared)):
                result = results.get(k)
                if isinstance(result, Exception):
                    error = f"{type(result).__name__}: {result}"
                prediction, value = None, None
                if not error:
                    prediction = processor.decode(result).strip()
                    try:
                        value = float(task.score(prediction, sample, lenient=lenient))
                    except (ValueError, TypeError, KeyError, IndexError) as e:  # e.g. no reference answers
                        error = f"cannot score: {e}"
                written.append({"index": sample["index"], "id": sample["id"], "prompt": prompt,
                                "prediction": prediction, "answers": sample.get("answers"), "score": value,
                                "error": error})
            sink.write(written)
            processed += len(samples)
            bar.update(len(samples))
        sink.finish()
    seconds = time.perf_counter() - start
    stats = {"samples_per_s": processed / seconds if processed else None, "compiles": dict(compiles.names)}
    used = media.values
    axes = sorted(STATS.real)
    padding = np.array([[STATS.real[a] - padding_before[0][a] for a in axes],
                        [STATS.padded[a] - padding_before[1][a] for a in axes]], np.float64)
    if ranks > 1:
        from jax.experimental import multihost_utils
        stats_all = multihost_utils.process_allgather(np.array([processed, seconds]))
        media_all = multihost_utils.process_allgather(media.values)
        used = np.where(np.arange(len(used)) % 2 == 0, media_all.min(axis=0), media_all.max(axis=0))
        padding = multihost_utils.process_allgather(padding).sum(axis=0)
        multihost_utils.sync_global_devices(f"qwen2vl-eval: {task.name} parts written")
        stats["samples_per_s"] = float(stats_all[:, 0].sum() / stats_all[:, 1].max()) if processed else None
    if rank != 0:
        return {}
    stats["padding"] = {a: round(1 - float(real) / float(padded), 4) if padded else None
                        for a, real, padded in zip(axes, *padding)}
    if settings is not None:
        stats |= {"media_used": MediaUsed.summary(used), "settings": settings}
    return merge(out, ranks, task, total, stats, scoring="lenient" if lenient else "official")


def check_parts(out: str, ranks: int) -> list[list[dict]]:
    """Every process's part lines, once its .done marker and all the lines it counts are visible here; else a
    FileNotFoundError saying that OUT must be on storage every host sees."""
    parts, unseen = [], []
    for r in range(ranks):
        marker = epath.Path(done_path(out, r))
        lines = read_lines(part_path(out, r))
        if not marker.exists():
            unseen.append(f"process {r}: no {marker}")
        elif len(lines) < (count := json.loads(marker.read_text())["lines"]):
            unseen.append(f"process {r}: {part_path(out, r)} holds {len(lines)} of its {count} lines")
        parts.append(lines)
    if unseen:
        raise FileNotFoundError(
            f"process 0 cannot see every process's predictions ({'; '.join(unseen)}). Each process writes "
            f"{out}.part<process> beside --out, so --out must be on storage all hosts see (a shared "
            "filesystem or gs://); the missing parts are at that path on their own hosts. Copy them beside "
            f"{out} and rerun the same command to merge, or rerun with --out on shared storage")
    return parts


def merge(out: str, ranks: int, task: Task | str, total: int, stats: dict, scoring: str = "official") -> dict:
    """Every part + the earlier OUT → OUT in input order (atomic), and the summary beside it."""
    task = get_task(task) if isinstance(task, str) else task
    parts = check_parts(out, ranks)
    lines = {line["index"]: line for part in [read_lines(out)] + parts for line in part}
    ordered = [lines[i] for i in sorted(lines)]
    write_whole(out, "".join(json.dumps(line) + "\n" for line in ordered))
    for r in range(ranks):
        epath.Path(part_path(out, r)).unlink(missing_ok=True)
        epath.Path(done_path(out, r)).unlink(missing_ok=True)
    scored = [line["score"] for line in ordered if line["error"] is None]
    summary = {"task": task.name, "metric": task.metric, "scoring": scoring,
               "value": float(np.mean(scored)) if scored else None, "samples": len(ordered), "of": total,
               "scored": len(scored), "errors": len(ordered) - len(scored), **stats}
    write_whole(summary_path(out), json.dumps(summary, indent=2))
    return summary


def parse_jobs(tasks: str, data: list[str], out: str) -> list[tuple[str, str, str]]:
    """--tasks a,b + --data a=SPEC --data b=SPEC (or one --data "a=SPEC,b=SPEC"; a single task may take a bare
    SPEC) + --out DIR → [(task, spec, DIR/task.jsonl), ...]."""
    names = [n.strip() for n in tasks.split(",") if n.strip()]
    for name in names:
        get_task(name)
    specs: dict[str, str] = {}
    for value in data:
        for item in _split_specs(value):
            name, _, spec = item.partition("=")
            if name in TASKS and spec:
                specs[name] = spec
            elif len(names) == 1 and len(data) == 1:
                specs[names[0]] = value
                break
            else:
                raise ValueError(f"--data {item!r}: with --tasks, give TASK=SPEC for each task ({', '.join(names)})")
    missing = [n for n in names if n not in specs]
    if missing or not names:
        raise ValueError(f"--data gives no SPEC for {', '.join(missing) or 'any task'}; pass --data TASK=SPEC")
    if set(specs) - set(names):
        raise ValueError(f"--data names tasks not in --tasks: {', '.join(sorted(set(specs) - set(names)))}")
    return [(n, specs[n], os.path.join(out, f"{n}.jsonl")) for n in names]


def _split_specs(value: str) -> list[str]:
    """"a=X,b=Y" → ["a=X", "b=Y"]: a comma splits only where a known TASK= follows it."""
    items: list[str] = []
    for piece in value.split(","):
        if items and piece.partition("=")[0] not in TASKS:
            items[-1] += "," + piece
        else:
            items.append(piece)
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwen2vl-eval", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="folder from qwen2vl-convert / qwen2vl-train's export/")
    parser.add_argument("--data", required=True, action="append",
                        help="PATH.jsonl, jsonl:PATH[?root=DIR], tfds:NAME[:SPLIT] (or the other sources "
                             "evaluation.data opens); with --tasks: TASK=SPEC, once per task (repeat --data or join "
                             "them with commas)")
    parser.add_argument("--data-dir", help="tfds data_dir")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", choices=sorted(TASKS), help="one task; --out is its predictions file")
    group.add_argument("--tasks", help="several tasks in one process (one model load, programs compiled once), "
                                       f"comma separated, of: {', '.join(sorted(TASKS))}; --out is a folder")
    parser.add_argument("--out", required=True, help="--task: predictions, one JSON line per sample (resumable); "
                                                     "--tasks: a folder for TASK.jsonl each + summary.md/.json")
    parser.add_argument("--scoring", choices=("official", "lenient"), default="official",
                        help="official: the benchmarks' rules (default); lenient: the earlier, forgiving ones")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="default: the task's (" + ", ".join(
        f"{name} {task.max_new_tokens}" for name, task in sorted(TASKS.items())) + ")")
    parser.add_argument("--limit", type=int, help="the first N samples only (of each task)")
    add_model_flags(parser)
    parser.add_argument("--chunk", type=int, default=64, help="samples prepared, sorted and written at a time")
    from qwen2vl_jax.compiles import add_cache_flag, cache_from_flag

    add_cache_flag(parser)
    args = parser.parse_args(argv)
    options = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, data_dir=args.data_dir,
                   limit=args.limit, dtype=args.dtype, chunk=args.chunk, mesh=args.mesh, scoring=args.scoring)
    try:
        if args.task:
            if len(args.data) != 1:
                raise ValueError("--task takes one --data")
            jobs = [(args.task, args.data[0], args.out)]
        else:
            jobs = parse_jobs(args.tasks, args.data, args.out)
            if not is_remote(args.out):
                os.makedirs(args.out, exist_ok=True)
        with cache_from_flag(args.compile_cache):
            summaries = evaluate_tasks(args.checkpoint, jobs, **options)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"qwen2vl-eval: {error}")
    if summaries and args.tasks:
        write_tables(args.out, summaries, write_whole)
        print(markdown(summaries), end="")
    elif summaries:
        print_table(summaries[0])


if __name__ == "__main__":
    main()

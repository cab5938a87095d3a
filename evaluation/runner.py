"""Batched, resumable evaluation: `qwen2vl-eval --checkpoint DIR --data SPEC --task NAME --out preds.jsonl`.

Each process takes every process_count-th sample (data parallel over hosts) and runs one SPMD program over its
devices (`--mesh`, default data=-1: each batch split over every local device; `tensor=N` splits the weights, for
models one device cannot hold). It prepares each sample with the checkpoint's Processor, generates greedily through
`qwen2vl_jax.generation.generate_many` (bucketed shapes; samples are sorted by size within a chunk so a batch holds
similar shapes) and appends one line per sample to
`OUT.part<process>` as soon as its batch is done (flushed: a killed run loses at most the batch in flight). At the
end process 0 merges every part and any earlier OUT into OUT in input order — so an interrupted run, rerun with the
same --out, ends with the file an uninterrupted run writes — and writes OUT's summary (`preds.summary.json`).

Output line: {"index", "id", "prompt", "prediction", "answers", "score", "error"}; a sample that cannot run (missing
or corrupt image, empty question, too long) gets its error, score null, and the run goes on."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
from etils import epath
from tqdm import tqdm

from data_pipeline.sources import question_text
from evaluation.data import open_eval_source
from evaluation.serving import DEFAULT_MESH, add_model_flags, open_model
from evaluation.metrics import METRICS

METRIC_NAMES = {"vqa": "vqa_accuracy", "docvqa": "anls", "chartqa": "relaxed_accuracy", "refcoco": "acc@iou0.5",
                "exact": "exact_match"}
# appended to the question (the prompts Qwen2-VL was evaluated with); refcoco asks for the box in the question
PROMPT_SUFFIX = {"vqa": "\nAnswer the question using a single word or phrase.",
                 "docvqa": "\nAnswer the question using a single word or phrase.",
                 "chartqa": "\nAnswer the question using a single word or phrase.", "refcoco": "", "exact": ""}
MAX_NEW_TOKENS = {"vqa": 16, "docvqa": 32, "chartqa": 16, "refcoco": 32, "exact": 16}


def summary_path(out: str) -> str:
    return out[:-len(".jsonl")] + ".summary.json" if out.endswith(".jsonl") else out + ".summary.json"


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


def prepare(processor, sample: dict, task: str) -> tuple[dict | None, str, str | None]:
    """sample → (generate request or None, prompt text, error or None)."""
    from data_pipeline.transforms import load_video_frames, read_bytes, with_name
    from qwen2vl_jax.processing.loading import load_image

    if "error" in sample:
        return None, "", sample["error"]
    messages = [dict(m) for m in sample["messages"]]
    question = question_text(messages)
    if not question:
        return None, "", "empty question"
    last = messages[-1]
    suffix = PROMPT_SUFFIX[task]
    if suffix:
        content = last["content"]
        last["content"] = (content + suffix if isinstance(content, str)
                           else list(content) + [{"type": "text", "text": suffix}])
    prompt = question + suffix
    try:
        images = [with_name(r, lambda r: load_image(read_bytes(r))) for r in sample["images"]]
        videos = [with_name(r, load_video_frames) for r in sample["videos"]]
        batch = processor([messages], images=images or None, videos=videos or None)
    except (ValueError, OSError, TypeError) as e:
        return None, prompt, f"{type(e).__name__}: {e}"
    return batch, prompt, None


def evaluate(checkpoint: str, data: str, task: str, out: str, *, batch_size: int = 8,
             max_new_tokens: int | None = None, data_dir: str | None = None, limit: int | None = None,
             dtype: str | None = None, chunk: int = 64, mesh: str = DEFAULT_MESH) -> dict:
    """Runs (or finishes) the evaluation; → the summary (process 0) or {} (other processes)."""
    from qwen2vl_jax.compiles import CompileCounter
    from qwen2vl_jax.generation import generate_many
    from qwen2vl_jax.processing import Processor
    from sharding.mesh import initialize_distributed

    if task not in METRICS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(METRICS)}")
    initialize_distributed()
    rank, ranks = jax.process_index(), jax.process_count()
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[task]
    processor = Processor.from_pretrained(checkpoint)
    model = open_model(checkpoint, mesh, dtype)
    source = open_eval_source(data, data_dir)
    total = len(source) if limit is None else min(limit, len(source))
    part = epath.Path(f"{out}.part{rank}")
    done = {line["index"] for line in read_lines(out) + read_lines(part)}
    todo = [i for i in range(rank, total, ranks) if i not in done]
    score = METRICS[task]
    eos = processor.tokenizer.eos_token_ids
    start, processed = time.perf_counter(), 0
    with CompileCounter() as compiles, part.open("a") as sink, \
            tqdm(total=len(range(rank, total, ranks)), initial=len(range(rank, total, ranks)) - len(todo),
                 desc=f"eval {task}", unit="sample", disable=rank != 0) as bar:
        for at in range(0, len(todo), chunk):
            samples = [source[i] for i in todo[at:at + chunk]]
            prepared = [prepare(processor, s, task) for s in samples]
            runnable = [k for k, (request, _, _) in enumerate(prepared) if request is not None]
            # similar sizes side by side: fewer padded rows and tokens per bucket
            runnable.sort(key=lambda k: (len(prepared[k][0].get("pixel_values", ())), prepared[k][0]["input_ids"].size))
            with model.context():
                results = dict(zip(runnable, generate_many(model.config, model.params,
                                                           [prepared[k][0] for k in runnable], batch_size=batch_size,
                                                           max_new_tokens=max_new_tokens, temperature=0.0,
                                                           eos_token_ids=eos)))
            for k, (sample, (_, prompt, error)) in enumerate(zip(samples, prepared)):
                result = results.get(k)
                if isinstance(result, Exception):
                    error = f"{type(result).__name__}: {result}"
                prediction, value = None, None
                if not error:
                    prediction = processor.decode(result).strip()
                    try:
                        value = score(prediction, sample)
                    except (ValueError, TypeError, KeyError) as e:  # e.g. a sample without reference answers
                        error = f"cannot score: {e}"
                line = {"index": sample["index"], "id": sample["id"], "prompt": prompt, "prediction": prediction,
                        "answers": sample.get("answers"), "score": value, "error": error}
                sink.write(json.dumps(line) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            processed += len(samples)
            bar.update(len(samples))
    seconds = time.perf_counter() - start
    stats = {"samples_per_s": processed / seconds if processed else None, "compiles": dict(compiles.names)}
    if ranks > 1:
        from jax.experimental import multihost_utils
        stats_all = multihost_utils.process_allgather(np.array([processed, seconds]))
        multihost_utils.sync_global_devices("qwen2vl-eval: parts written")
        stats["samples_per_s"] = float(stats_all[:, 0].sum() / stats_all[:, 1].max()) if processed else None
    if rank != 0:
        return {}
    return merge(out, ranks, task, total, stats)


def merge(out: str, ranks: int, task: str, total: int, stats: dict) -> dict:
    """Every part + the earlier OUT → OUT in input order (atomic), and the summary beside it."""
    lines = {line["index"]: line for path in [out] + [f"{out}.part{r}" for r in range(ranks)]
             for line in read_lines(path)}
    ordered = [lines[i] for i in sorted(lines)]
    tmp = epath.Path(out + ".tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in ordered))
    tmp.rename(out)
    for r in range(ranks):
        epath.Path(f"{out}.part{r}").unlink(missing_ok=True)
    scored = [line["score"] for line in ordered if line["error"] is None]
    summary = {"task": task, "metric": METRIC_NAMES[task], "value": float(np.mean(scored)) if scored else None,
               "samples": len(ordered), "of": total, "scored": len(scored), "errors": len(ordered) - len(scored),
               **stats}
    epath.Path(summary_path(out)).write_text(json.dumps(summary, indent=2))
    return summary


MODEL_PROGRAMS = ("prefill", "decode")  # generation's programs; anything else compiled is counted as "other"


def print_table(summary: dict) -> None:
    counts = summary["compiles"]
    compiles = ", ".join(f"{k} {counts.get(k, 0)}" for k in MODEL_PROGRAMS)
    compiles += f", other {sum(v for k, v in counts.items() if k not in MODEL_PROGRAMS)}"
    rate = summary["samples_per_s"]
    rows = [("task", summary["task"]), ("metric", summary["metric"]),
            ("value", "—" if summary["value"] is None else f"{summary['value']:.4f}"),
            ("samples", f"{summary['samples']} of {summary['of']}"), ("scored", summary["scored"]),
            ("errors", summary["errors"]), ("samples/s", "—" if rate is None else f"{rate:.2f}"),
            ("compiles", compiles)]
    for name, value in rows:
        print(f"{name:10s} {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwen2vl-eval", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="folder from qwen2vl-convert / qwen2vl-train's export/")
    parser.add_argument("--data", required=True, help="PATH.jsonl, jsonl:PATH[?root=DIR] or tfds:NAME[:SPLIT]")
    parser.add_argument("--data-dir", help="tfds data_dir")
    parser.add_argument("--task", required=True, choices=sorted(METRICS))
    parser.add_argument("--out", required=True, help="predictions, one JSON line per sample (resumable)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, help="default per task: " + str(MAX_NEW_TOKENS))
    parser.add_argument("--limit", type=int, help="the first N samples only")
    add_model_flags(parser)
    parser.add_argument("--chunk", type=int, default=64, help="samples prepared, sorted and written at a time")
    from qwen2vl_jax.compiles import add_cache_flag, cache_from_flag

    add_cache_flag(parser)
    args = parser.parse_args(argv)
    try:
        with cache_from_flag(args.compile_cache):
            summary = evaluate(args.checkpoint, args.data, args.task, args.out, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, data_dir=args.data_dir, limit=args.limit,
                               dtype=args.dtype, chunk=args.chunk, mesh=args.mesh)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"qwen2vl-eval: {error}")
    if summary:
        print_table(summary)


if __name__ == "__main__":
    main()

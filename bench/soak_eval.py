"""The eval half of the kill soak (bench/soak.py runs both; its harness is shared).

Eval soak: `qwen2vl-eval --task exact` on a random-weight checkpoint of the demo's architecture (untied LM head, so
greedy answers are varied text; written by training.export.export_params, the layout qwen2vl-train exports) and a
JSONL file of synthetic VQA questions with their PNGs (plus a missing image and an empty question: error lines),
--chunk 4: two uninterrupted runs (they must agree), then a run killed (kill -9 of its group) at a random moment and
rerun with the same command, `kills` times, then left to finish. The moments: a uniform random delay after the start
(as for training), or, every other kill, after the first line the run writes (so kills land inside the output, not
only in the startup). runner.py's output lines carry no timings ({"index", "id", "prompt",
"prediction", "answers", "score", "error"}), so the final file must equal the uninterrupted one byte for byte; the
summary must too, except samples_per_s and compiles; no .part / .done file may remain.

`eval_soak` returns the record written to the JSON file."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

from soak import (ORPHAN_S, ROOT, RUN_TIMEOUT_S, STALL_S, Run, environment, log_line, median_max, plan_delay,
                  stall_stacks, tail)


def write_eval_checkpoint(folder: str, seed: int = 1) -> str:
    """A random-weight checkpoint of the demo's architecture with an untied LM head whose special-token columns are
    0 (greedy answers are varied text, never an early end), in the layout qwen2vl-train exports. → folder/ckpt."""
    import dataclasses

    from configs.demo_cpu import get_config
    from qwen2vl_jax.model import init_params
    from qwen2vl_jax.processing.tokenizer import SPECIAL_TOKENS
    from training.export import export_params
    from training.train import model_and_processor, tokenizer_folder

    config = get_config()
    model_config, processor = model_and_processor(config, folder)
    model_config = model_config.replace(text=dataclasses.replace(model_config.text, tie_word_embeddings=False))
    params = init_params(model_config, seed)
    first_special = min(processor.tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)  # they follow the vocabulary
    head = params["language_model"]["lm_head"]["kernel"]
    params["language_model"]["lm_head"]["kernel"] = head.at[:, first_special:].set(0)
    return export_params(os.path.join(folder, "ckpt"), model_config, params, tokenizer_folder(config, folder),
                         {"min_pixels": config.data.min_pixels, "max_pixels": config.data.max_pixels})


def write_eval_data(folder: str, samples: int) -> str:
    """`samples` held-out synthetic VQA questions (JSONL + PNGs), then a missing image and an empty question."""
    from data_pipeline.synthetic import split_start, write_jsonl

    path = write_jsonl(folder, samples, seed=0, start=split_start("test"))
    with open(path, "a") as f:
        f.write(json.dumps({"id": "missing-image", "question": "What colour is the shape?",
                            "image": "images/missing.png", "answers": ["red"]}) + "\n")
        f.write(json.dumps({"id": "empty-question", "question": "", "image": "images/missing.png",
                            "answers": ["red"]}) + "\n")
    return path


def eval_command(checkpoint: str, data: str, out: str, cache: str) -> list[str]:
    return [sys.executable, "-m", "evaluation.runner", "--checkpoint", checkpoint, "--data", data, "--task", "exact",
            "--out", out, "--batch-size", "4", "--chunk", "4", "--max-new-tokens", "8", "--compile-cache", cache]


def comparable(summary: dict) -> dict:
    """All a resumed run's summary must share with an uninterrupted one's: not how the last invocation's work went
    (speed, compiles, padding, the media sizes of the samples it ran)."""
    return {k: v for k, v in summary.items() if k not in ("samples_per_s", "compiles", "padding", "media_used")}


def read_json_lines(path: str) -> tuple[list[dict], int]:
    out, bad = [], 0
    for line in open(path, errors="replace"):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return out, bad


class FileProgress:
    """Progress of an eval run: its part file or the output file changing (size or mtime); the first new line."""

    def __init__(self, part: str, out: str):
        self.part, self.out = part, out
        self.last = self.snapshot()
        self.lines_before = part_lines(part)[0]
        self.first_line: float | None = None  # wall time of the first line this run wrote

    def snapshot(self):
        out = []
        for p in (self.part, self.out):
            try:
                st = os.stat(p)
                out.append((st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                out.append(None)
        return out

    def changed(self) -> bool:
        now = self.snapshot()
        if now == self.last:
            return False
        self.last = now
        if self.first_line is None and (part_lines(self.part)[0] > self.lines_before or now[1] is not None):
            self.first_line = time.time()
        return True


def part_lines(path: str) -> tuple[int, bool]:
    """(complete lines, whether the file ends inside a line) of an eval part file."""
    try:
        data = open(path, "rb").read()
    except FileNotFoundError:
        return 0, False
    return data.count(b"\n"), bool(data) and not data.endswith(b"\n")


def eval_once(args, out: str, log: str, delay: float | None, stall_s: float, clock: str = "start") -> dict:
    """One eval run: kill -9 of its group `delay` s after its start (clock "start") or after the first line it
    writes (clock "output"), or (delay None) left to finish."""
    part = out + ".part0"
    progress = FileProgress(part, out)
    lines_before = progress.lines_before
    run = Run(args, log)
    record = {"kind": "kill9" if delay is not None else "finish", "part_lines_before": lines_before, "log": log}
    if delay is not None:
        record["delay_s"], record["clock"] = round(delay, 2), clock
    last_progress, why = time.monotonic(), None
    while True:
        if progress.changed():
            last_progress = time.monotonic()
            if progress.first_line is not None:
                record["last_output_s"] = round(time.time() - run.wall0, 2)
        if run.poll() is not None:
            why = "exit"
            break
        if delay is not None and (run.elapsed() >= delay if clock == "start" else
                                  progress.first_line is not None and time.time() - progress.first_line >= delay):
            why = "trigger"
            break
        if time.monotonic() - last_progress > stall_s or run.elapsed() > RUN_TIMEOUT_S:
            why = "stall"
            break
        time.sleep(0.02)
    problems = []
    if why == "trigger":
        record["signal_at_s"] = round(run.elapsed(), 2)
        run.kill_group()
        record["part_lines_at_kill"], record["part_cut_line"] = part_lines(part)
    elif why == "stall":
        record["stalled_at_s"] = round(run.elapsed(), 2)
        problems.append(f"stall: no output for {stall_s:.0f} s")
        run.dump_and_kill()
        record["stall_stacks"] = stall_stacks(log)
    else:
        record["exited_by_itself_at_s"] = round(run.elapsed(), 2)
        if delay is not None:
            record["finished_before_signal"] = True
    record |= run.reap()
    record["first_output_s"] = round(progress.first_line - run.wall0, 2) if progress.first_line else None
    if record["orphans"]:
        problems.append(f"{len(record['orphans'])} process(es) of the group alive {ORPHAN_S:.0f} s after exit")
    if why == "exit" and record["exit"] != 0:
        problems.append(f"exit {record['exit']}")
    if problems:
        record["log_tail"] = tail(log)
    record["problems"] = problems
    record["ok"] = not problems
    return record


def eval_soak(root: str, kills: int, seed: int = 0, *, samples: int = 200, checkpoint: str | None = None,
              cache: str | None = None, stall_s: float = STALL_S) -> dict:
    """The eval soak in `root` (see the module docstring). → its record; "passed" says whether every condition
    held."""
    started = time.monotonic()
    os.makedirs(root, exist_ok=True)
    cache = cache or os.path.join(root, "compile_cache")
    if checkpoint is None:
        log_line("eval: writing a random-weight checkpoint")
        checkpoint = os.path.join(root, "model", "ckpt")
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import soak_eval; "
                        "soak_eval.write_eval_checkpoint(sys.argv[2])", os.path.dirname(os.path.abspath(__file__)),
                        os.path.dirname(checkpoint)], cwd=ROOT, env=environment(), check=True,
                       capture_output=True)
    data = write_eval_data(os.path.join(root, "data"), samples)
    total = samples + 2
    result = {"settings": {"kills": kills, "seed": seed, "samples": total, "checkpoint": checkpoint, "task": "exact",
                           "chunk": 4, "batch_size": 4, "max_new_tokens": 8}}

    # two uninterrupted runs: the first fills the compile cache, the second starts as the soak's runs will (its
    # timings plan the kills); their files must be equal
    refs = {}
    for name in ("reference", "reference-2"):
        path = os.path.join(root, f"{name}.jsonl")
        log_line(f"eval {name}: {total} samples")
        refs[name] = eval_once(eval_command(checkpoint, data, path, cache), path, path + ".log", None, stall_s)
        result[name.replace("-", "_")] = {k: refs[name].get(k) for k in (
            "exit", "exited_by_itself_at_s", "first_output_s", "problems", "log_tail")}
        if not refs[name]["ok"] or not os.path.exists(path):
            result[name.replace("-", "_")]["log_tail"] = tail(path + ".log")
            result["passed"] = False
            return result
    reference = os.path.join(root, "reference.jsonl")
    result["references_agree"] = open(reference, "rb").read() == open(os.path.join(root, "reference-2.jsonl"),
                                                                        "rb").read()
    ref = refs["reference-2"]
    ref_lines, _ = read_json_lines(reference)
    first_est = ref["first_output_s"] or 5.0
    # the time per sample while lines are written: a process's exit (merge, teardown) is not work a kill can land in
    per_sample = max(((ref.get("last_output_s") or ref["exited_by_itself_at_s"]) - first_est) / total, 0.005)

    rng = random.Random(seed + 1)
    out = os.path.join(root, "soak.jsonl")
    args = eval_command(checkpoint, data, out, cache)
    runs, firsts = [], []
    for i in range(kills):
        left = total - part_lines(out + ".part0")[0]
        # every other kill is timed from the run's first written line, so kills land inside the output too
        clock = "start" if i % 2 == 0 else "output"
        if clock == "start":
            delay = plan_delay(rng, firsts or [first_est], per_sample, left, kills - i)
        else:
            delay = rng.uniform(0.0, min(2 * left / (kills - i + 1), 0.8 * left) * per_sample)
        log_line(f"eval run {i + 1}/{kills}: kill -9 {delay:.1f} s after its {clock} ({total - left}/{total} "
                 "written)")
        record = eval_once(args, out, os.path.join(root, f"soak-{i + 1:02d}.log"), delay, stall_s, clock)
        record["run"] = i + 1
        runs.append(record)
        if record["first_output_s"] is not None and record["part_lines_before"] < record.get("part_lines_at_kill", 0):
            firsts.append(record["first_output_s"])
        log_line(f"  → exit {record['exit']}, part lines {record['part_lines_before']} → "
                 f"{record.get('part_lines_at_kill')}{' (cut line)' if record.get('part_cut_line') else ''}")
        if record.get("finished_before_signal"):
            break
    if not runs or not runs[-1].get("finished_before_signal"):
        log_line("eval: the last run, left to finish")
        record = eval_once(args, out, os.path.join(root, "soak-final.log"), None, stall_s)
        record["run"] = len(runs) + 1
        runs.append(record)
    result["runs"] = runs
    signalled = [r for r in runs if "signal_at_s" in r]
    result["kills"] = {"tried": len(signalled), "requested": kills,
                       "survived": sum(r["ok"] for r in signalled) if runs[-1]["ok"] and runs[-1]["exit"] == 0 else 0,
                       "part_lines_at_kill": [[r["clock"], r["part_lines_before"], r.get("part_lines_at_kill")]
                                              for r in signalled],
                       "inside_output": sum(r.get("part_lines_at_kill", 0) > r["part_lines_before"]
                                            for r in signalled),
                       "cut_lines_at_kill": sum(bool(r.get("part_cut_line")) for r in signalled),
                       "finished_before_signal": sum(bool(r.get("finished_before_signal")) for r in runs)}
    compared = {"equal_bytes": False}
    if os.path.exists(out):
        ours, bad = read_json_lines(out)
        indexes = [line.get("index") for line in ours]
        compared = {
            "equal_bytes": open(out, "rb").read() == open(reference, "rb").read(),
            "bytes": os.path.getsize(reference), "lines": len(ours), "reference_lines": len(ref_lines),
            "unparseable_lines": bad, "duplicated": len(indexes) - len(set(indexes)),
            "lost": sorted(set(range(total)) - set(indexes))[:20],
            "differing_lines": sum(a != b for a, b in zip(ours, ref_lines)),
            "error_lines": sum(bool(line.get("error")) for line in ours)}
        summaries = [json.load(open(p[:-len(".jsonl")] + ".summary.json")) for p in (out, reference)]
        compared["summary_equal"] = comparable(summaries[0]) == comparable(summaries[1])
    leftovers = sorted(n for n in os.listdir(root) if n.startswith("soak.jsonl.part"))
    compared["leftover_parts"] = leftovers
    result["output"] = compared
    result["bytes_compared"] = compared.get("bytes", 0)
    result["first_output_s"] = median_max([r["first_output_s"] for r in runs])
    result["failures"] = [{"run": r["run"], "problems": r["problems"]} for r in runs if not r["ok"]]
    result["passed"] = (compared["equal_bytes"] and compared.get("summary_equal", False) and not leftovers
                        and not result["failures"] and runs[-1]["exit"] == 0 and len(signalled) == kills
                        and result["references_agree"])
    result["wall_s"] = round(time.monotonic() - started, 1)
    log_line(f"eval soak: {'PASSED' if result['passed'] else 'FAILED'} — {len(signalled)} kills, output equal "
             f"{compared['equal_bytes']}, {result['wall_s']} s")
    return result

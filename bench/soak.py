"""Kill soak: `qwen2vl-train` and `qwen2vl-eval` killed at random moments and restarted with the same command, until
they finish with exactly what an uninterrupted run gives.

    python bench/soak.py --train-kills 20 --eval-kills 10 --seed 0 --out bench/results/soak.json
                         [--workers 2 | 0,2] [--steps 40] [--checkpoint-every 3] [--eval-samples 200]
                         [--max-stalls 5] [--root DIR (kept: every run's log)]

Both halves drive the project's own CLIs (`python -m training.train`, `python -m evaluation.runner`) in subprocesses
started with start_new_session=True (each run is its own process group, grain's workers included), on CPU.

Train soak: the demo config shrunk as tests/test_train_cli.py's `command()` shrinks it (96 examples written once,
batch 4, a metrics record every step, no demo eval, no TensorBoard), with data.workers=2, data.pack=True, a
checkpoint every 3 steps, 40 steps and one compile cache for every run. Two uninterrupted reference runs (the
first fills the compile cache, the second times a start as the soak's runs start; they must agree), then the soak's
runs in their own workdir: each is started, signalled at a random moment and restarted with the same command,
`kills` times, then left to finish. Kinds, cycled in a seeded random order:
  kill9   os.killpg(SIGKILL) after a uniform random delay;
  sigterm SIGTERM to the main process after such a delay: within TERM_EXIT_S it must exit 0 with a checkpoint of
          the last step it logged (a SIGTERM during a step lets that step end, the first one included), or, having
          logged no step (signalled before the handler is installed), exit with an error;
  ckpt    os.killpg(SIGKILL) while a checkpoint is being saved: the checkpoints/ folder is polled every few ms for a
          new Orbax temporary folder (a name with "orbax-checkpoint-tmp") or a new step folder, at or after a
          random target step.
The delay is drawn from U(0, t_first + 2·g·t_step): t_first the median time to first step seen so far, t_step the
reference's time per step and g = steps left / (kills left + 1), so kills land before the first step (startup,
restore, the data iterator's set_state), in the steps, and throughout the run, and the soak still has steps left
for its later kills. Pass conditions (each run's record says which failed):
  - every run logs its next step (a new metrics.jsonl line) within FIRST_STEP_S of its start, unless signalled
    before; time to first step recorded per run (median, max);
  - no run goes STALL_S without progress (a new metrics line, or exiting): such a run is a stall: every process of
    its group gets SIGABRT (PYTHONFAULTHANDLER=1 dumps each one's Python stacks into its log), then SIGKILL; its
    log tail is recorded;
  - no process of a run's group outlives it by ORPHAN_S;
  - the final run exits 0 after step N; the soak's metrics equal the reference's at every step 1..N (`loss` and
    `data_crc`, the CRC of the step's example ids; every record of a step, re-logged ones after a resume
    included); the final checkpoints' state (params, optimizer state, step, rng) and data-iterator state are equal
    leaf by leaf (np.array_equal, dtypes and shapes too), and so are the exports (params and side files).

Eval soak: bench/soak_eval.py.

`train_soak` and `eval_soak` return the records written to the JSON file; tests/test_soak.py runs a short soak."""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

FIRST_STEP_S = 60.0  # a run must log its next step this soon after its start
STALL_S = 120.0  # a run without progress this long is a stall
TERM_EXIT_S = 30.0  # a SIGTERM'd run must have exited this soon after the signal
ORPHAN_S = 10.0  # a run's other processes must be gone this soon after it exits
RUN_TIMEOUT_S = 900.0  # a hard limit on any one run
KINDS = ("kill9", "sigterm", "ckpt")
TMP_MARK = "orbax-checkpoint-tmp"
TRAIN_EXAMPLES = {"train": 96, "test": 16}


def log_line(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ processes

def environment() -> dict:
    """The CLIs' environment: CPU, one device, this checkout first on the path, Python stacks dumped on SIGABRT."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    return env | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                  "PYTHONPATH": ROOT, "PYTHONFAULTHANDLER": "1"}


def _no_core_files() -> None:
    """No core files (a SIGABRT'd run would leave one in the checkout): the soft limit, inherited by every run."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))


def tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors="replace") as f:
            kept = [line for line in f if "Involuntary full rematerialization" not in line]
    except FileNotFoundError:
        return ""
    return "".join(kept[-lines:])


def group_members(pgid: int) -> list[str]:
    """'pid state cmdline' of every process in group `pgid` that is not a zombie (from /proc)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
            if int(fields[2]) != pgid or fields[0] in ("Z", "X"):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            out.append(f"{pid} {fields[0]} {command[:160]}")
        except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
            pass
    return out


class Run:
    """One CLI process (its own session and process group) and its log."""

    def __init__(self, args: list[str], log: str):
        self.args, self.log = args, log
        _no_core_files()
        self.wall0, self.t0 = time.time(), time.monotonic()
        open(log, "w").close()
        with open(log, "a") as sink:  # O_APPEND: the run's processes and the harness's notes never overwrite
            self.proc = subprocess.Popen(args, cwd=ROOT, env=environment(), stdout=sink, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self.pgid = self.proc.pid
        self.exited_at: float | None = None  # monotonic

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
        return rc

    def kill_group(self, sig=signal.SIGKILL) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def dump_and_kill(self) -> None:
        """SIGABRT to each process of the group in turn, the main one last (faulthandler writes each one's Python
        stacks into the log, one process at a time, after a "=== SIGABRT pid ..." line), then SIGKILL."""
        self.kill_group(signal.SIGSTOP)  # frozen first, so no process reacts to another's end before its own dump
        members = [m.split(" ", 2) for m in group_members(self.pgid)]
        order = sorted(members, key=lambda m: (int(m[0]) == self.proc.pid, int(m[0])))
        for pid, _, command in order:
            with open(self.log, "a") as f:
                f.write(f"\n=== SIGABRT pid {pid}{' (main)' if int(pid) == self.proc.pid else ''}: {command}\n")
            try:
                os.kill(int(pid), signal.SIGABRT)
                os.kill(int(pid), signal.SIGCONT)
            except ProcessLookupError:
                continue
            time.sleep(1.0)
        self.kill_group(signal.SIGKILL)
        self.proc.wait()
        self.poll()

    def reap(self) -> dict:
        """Waits for the main process (already told to end) and for the rest of its group (ORPHAN_S); kills what is
        left. → {"exit", "orphans"}."""
        try:
            self.proc.wait(RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill_group()
            self.proc.wait()
        self.poll()
        deadline = time.monotonic() + ORPHAN_S
        while group_members(self.pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        orphans = group_members(self.pgid)
        if orphans:
            self.kill_group()
        return {"exit": self.proc.returncode, "orphans": orphans}


class Lines:
    """The complete JSON lines appended to a file after a given moment (the file only grows)."""

    def __init__(self, path: str):
        self.path = path
        self.offset = os.path.getsize(path) if os.path.exists(path) else 0
        self.records: list[dict] = []
        self.bad: list[str] = []

    def poll(self) -> list[dict]:
        try:
            size = os.path.getsize(self.path)
        except FileNotFoundError:
            return []
        if size <= self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        new = []
        for line in chunk[:end].decode(errors="replace").splitlines():
            if line.strip():
                try:
                    new.append(json.loads(line))
                except json.JSONDecodeError:
                    self.bad.append(line[:200])
        self.records += new
        return new


def stall_stacks(log: str, frames: int = 10) -> list[dict]:
    """The Python stacks a stalled run's processes dumped (after dump_and_kill's "=== SIGABRT" lines), per process:
    each distinct stack (innermost frame first, threading/futures/resource_tracker frames left out) with its
    thread count."""
    text = open(log, errors="replace").read()
    out = []
    for section in text.split("\n=== SIGABRT ")[1:]:
        head, _, body = section.partition("\n")
        counts: dict[str, int] = {}
        for thread in re.split(r"\n(?=Thread 0x|Current thread)", body)[1:]:
            kept = [line.strip() for line in thread.splitlines()[1:] if re.match(r'\s*File ".*", line \d+ in ', line)
                    and not any(s in line for s in ("threading.py", "concurrent/futures", "resource_tracker"))]
            key = "\n".join(kept[:frames])
            counts[key] = counts.get(key, 0) + 1
        out.append({"process": head[:200], "stacks": [{"threads": n, "frames": k.splitlines()}
                                                       for k, n in counts.items() if k]})
    return out


def summary_of(log: str) -> dict | None:
    """The JSON summary qwen2vl-train prints last (None when there is none)."""
    text = open(log, errors="replace").read()
    try:
        at = text.rindex("\n{") + 1
        end = text.index("\n}", at) + 2
        return json.loads(text[at:end])
    except ValueError:
        return None


def median_max(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    return {"n": len(values), "median": round(statistics.median(values), 2) if values else None,
            "max": round(max(values), 2) if values else None}


def plan_delay(rng: random.Random, firsts: list[float], unit_s: float, left: int, kills_left: int) -> float:
    """A uniform random delay after the start: over the run's startup (the median of the times to first progress
    seen, `firsts`) and twice its share g = left / (kills_left + 1) of the work left (`left` units of unit_s each);
    at most the fastest startup seen + 80% of the work left, so the run is still going when the signal comes."""
    share = left / (kills_left + 1)
    return rng.uniform(0.0, min(statistics.median(firsts) + 2 * share * unit_s, min(firsts) + 0.8 * left * unit_s))


def kind_schedule(rng: random.Random, kills: int) -> list[str]:
    """The kinds in a seeded random order, cycled: any 3 consecutive kills hold one of each."""
    out = []
    while len(out) < kills:
        out += rng.sample(KINDS, len(KINDS))
    return out[:kills]


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"head": git("rev-parse", "HEAD"), "modified": git("status", "--short", "--untracked-files=no").splitlines()}


# ------------------------------------------------------------------------------------------------ train soak

def write_train_data(folder: str) -> str:
    """The shrunk demo set (96 training examples), written once before any run."""
    import tensorflow_datasets as tfds

    from data_pipeline.synthetic import write_tfds

    tfds.display_progress_bar(False)
    write_tfds(folder, TRAIN_EXAMPLES, seed=0)
    return folder


def train_command(workdir: str, data_dir: str, cache: str, steps: int, checkpoint_every: int, workers: int,
                  pack: bool) -> list[str]:
    """tests/test_train_cli.py's command(), with the soak's settings."""
    return [sys.executable, "-m", "training.train", "--config", os.path.join(ROOT, "configs", "demo_cpu.py"),
            "--workdir", workdir, f"--config.data.data_dir={data_dir}",
            f"--config.data.demo_set.train={TRAIN_EXAMPLES['train']}",
            f"--config.data.demo_set.test={TRAIN_EXAMPLES['test']}", "--config.data.batch_size=4",
            "--config.log_every=1", "--config.demo_eval=False", "--config.tensorboard=False",
            f"--config.data.workers={workers}", f"--config.data.pack={pack}", f"--config.steps={steps}",
            f"--config.checkpoint_every={checkpoint_every}", f"--config.compile_cache={cache}"]


def checkpoint_steps(folder: str) -> list[int]:
    """Committed checkpoint steps (the digit-named folders) in WORKDIR/checkpoints."""
    try:
        return sorted(int(n) for n in os.listdir(folder) if n.isdigit())
    except FileNotFoundError:
        return []


def set_aside(workdir: str) -> list[str]:
    """WORKDIR/checkpoints/set_aside/: steps a resume found damaged or uncommitted and moved away."""
    try:
        return sorted(os.listdir(os.path.join(workdir, "checkpoints", "set_aside")))
    except FileNotFoundError:
        return []


def logged_steps(workdir: str) -> int:
    """The highest step in WORKDIR/metrics.jsonl (0 when none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    top = 0
    for line in open(path, errors="replace"):
        try:
            top = max(top, json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return top


def watch(run: Run, lines: Lines, trigger=None, interval: float = 0.05, stall_s: float = STALL_S) -> dict:
    """Follows `run` until it exits, `trigger()` says to act, or it stalls. Progress is a new line in `lines`.
    → {"why": "exit" | "trigger" | "stall", "first_step_s", "last_step"}."""
    last_progress = time.monotonic()
    state = {"first_step_s": None, "last_step": None}
    while True:
        new = lines.poll()
        if new:
            last_progress = time.monotonic()
            if state["first_step_s"] is None:
                state["first_step_s"] = round(float(new[0].get("time", time.time())) - run.wall0, 2)
            state["last_step"] = new[-1].get("step", state["last_step"])
        if run.poll() is not None:
            lines.poll()
            why = "exit"
            break
        if trigger is not None and trigger():
            why = "trigger"
            break
        if time.monotonic() - last_progress > stall_s or run.elapsed() > RUN_TIMEOUT_S:
            why = "stall"
            break
        time.sleep(interval)
    if lines.records:
        state["last_step"] = lines.records[-1].get("step")
    return state | {"why": why}


def new_save(folder: str, seen: set, target: int):
    """A trigger: True once checkpoints/ shows an entry not in `seen` for a step ≥ target (an Orbax temporary
    folder, or a committed step folder when the temporary one came and went between two polls)."""
    found = {}

    def trigger() -> bool:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return False
        for name in names:
            if name in seen:
                continue
            match = re.match(r"(\d+)", name)
            if match and int(match.group(1)) >= target and (TMP_MARK in name or name.isdigit()):
                found["entry"] = name
                return True
        return False

    trigger.found = found
    return trigger


def run_once(args, workdir: str, log: str, kind: str | None, delay: float | None, target: int | None,
             steps: int, first_step_s: float, stall_s: float) -> dict:
    """One run of the soak: started, signalled as `kind` says (None: left to finish), reaped and checked."""
    metrics = os.path.join(workdir, "metrics.jsonl")
    before = logged_steps(workdir)
    resumable = checkpoint_steps(os.path.join(workdir, "checkpoints"))
    aside_before = set_aside(workdir)
    lines = Lines(metrics)
    run = Run(args, log)
    record = {"kind": kind or "finish", "steps_before": before, "checkpoint_at_start": max(resumable, default=0),
              "log": log}
    problems = []
    trigger, term_ignored = None, False
    if kind in ("kill9", "sigterm"):
        record["delay_s"] = round(delay, 2)
        trigger = lambda: run.elapsed() >= delay  # noqa: E731
    elif kind == "ckpt":
        record["target_step"] = target
        folder = os.path.join(workdir, "checkpoints")
        trigger = new_save(folder, set(os.listdir(folder)) if os.path.isdir(folder) else set(), target)
    seen = watch(run, lines, trigger, interval=0.004 if kind == "ckpt" else 0.05, stall_s=stall_s)
    record["first_step_s"] = seen["first_step_s"]
    if seen["why"] == "trigger":
        record["signal_at_s"] = round(run.elapsed(), 2)
        lines.poll()  # the training position at the signal: this run's last step, else the step it resumed from
        record["landed_after_step"] = lines.records[-1].get("step") if lines.records else record[
            "checkpoint_at_start"]
        if kind == "sigterm":
            record["before_first_step"] = not lines.records
            signalled = time.monotonic()
            os.kill(run.proc.pid, signal.SIGTERM)
            while run.poll() is None and time.monotonic() - signalled < TERM_EXIT_S:
                lines.poll()
                time.sleep(0.05)
            lines.poll()
            if run.poll() is None:
                problems.append(f"still running {TERM_EXIT_S:.0f} s after SIGTERM")
                term_ignored = True
                run.dump_and_kill()
                record["stall_stacks"] = stall_stacks(log)
            record["exit_after_signal_s"] = round(run.exited_at - signalled, 2)
        else:
            if kind == "ckpt":
                record["saving"] = trigger.found.get("entry")
            run.kill_group()
    elif seen["why"] == "stall":
        record["stalled_at_s"] = round(run.elapsed(), 2)
        record["stalled_after_step"] = lines.records[-1].get("step") if lines.records else record[
            "checkpoint_at_start"]
        problems.append(f"stall: no new metrics line for {stall_s:.0f} s (or {RUN_TIMEOUT_S:.0f} s in all)")
        run.dump_and_kill()
        record["stall_stacks"] = stall_stacks(log)
    else:
        record["exited_by_itself_at_s"] = round(run.elapsed(), 2)
        if kind is not None:
            record["finished_before_signal"] = True
    reaped = run.reap()
    record |= reaped
    lines.poll()
    if lines.records:  # a step finished after the signal (SIGTERM lets the step in flight end) counts too
        record["first_step_s"] = round(float(lines.records[0].get("time", 0)) - run.wall0, 2)
    record["steps_after"] = logged_steps(workdir)
    record["logged"] = [r.get("step") for r in lines.records]
    text = open(log, errors="replace").read()
    match = re.search(r"resumed from step (\d+)", text)
    record["resumed_from"] = int(match.group(1)) if match else None
    lived = record.get("signal_at_s", record.get("stalled_at_s", record.get("exited_by_itself_at_s", 0.0)))
    if (record["first_step_s"] or lived) > first_step_s:  # signalled, stalled or ended later, with no step before
        problems.append(f"no step logged within {first_step_s:.0f} s of the start "
                        f"(first step: {record['first_step_s']} s)")
    if reaped["orphans"]:
        problems.append(f"{len(reaped['orphans'])} process(es) of the group alive {ORPHAN_S:.0f} s after exit")
    if lines.bad:
        problems.append(f"unparseable metrics lines: {lines.bad[:3]}")
    # the newest step folder, unless this run set it aside (a kill cut its save short: no commit marker)
    record["set_aside"] = sorted(set(set_aside(workdir)) - set(aside_before))
    aside_steps = {int(m.group(1)) for name in record["set_aside"] if (m := re.match(r"(\d+)", name))}
    expected = max((s for s in resumable if s not in aside_steps), default=0)
    if (record["resumed_from"] or 0) != expected and (lines.records or record["resumed_from"] is not None):
        problems.append(f"resumed from step {record['resumed_from']}, the newest whole checkpoint was {expected}")
    if lines.records and lines.records[0].get("step") != (record["resumed_from"] or 0) + 1:
        problems.append(f"first step logged {lines.records[0].get('step')}, expected "
                        f"{(record['resumed_from'] or 0) + 1}")
    exit_code = reaped["exit"]
    if kind == "sigterm" and seen["why"] == "trigger" and not term_ignored:
        # the step in flight at the signal may end; a run that goes on training ignored the signal
        after = [r.get("step") for r in lines.records if float(r.get("time", 0)) > run.wall0 + record["signal_at_s"]]
        record["steps_after_signal"] = len(after)
        if len(after) > 1:
            problems.append(f"SIGTERM ignored: {len(after)} steps logged after it (to step {after[-1]})")
        if exit_code == 0:
            stopped = record["logged"][-1] if record["logged"] else None
            record["saved_step"] = stopped
            if stopped is None:
                problems.append("SIGTERM: exit 0 without a step")
            elif stopped not in checkpoint_steps(os.path.join(workdir, "checkpoints")):
                problems.append(f"SIGTERM: exit 0 but no checkpoint of step {stopped}")
            elif "preemption (SIGTERM): saved step" not in text and record["landed_after_step"] != steps:
                problems.append(f"SIGTERM: exit 0 at step {stopped} without the preemption message (not preempted)")
        elif record["logged"] and record["logged"][-1] == steps and steps in checkpoint_steps(
                os.path.join(workdir, "checkpoints")):  # every step done and saved: the signal hit the export
            record["note"] = f"SIGTERM after the last step (during the export): exit {exit_code}"
        elif record["logged"]:
            problems.append(f"SIGTERM after step {record['logged'][-1]}: exit {exit_code}, not 0")
    if kind is None or seen["why"] == "exit":
        summary = summary_of(log)
        if exit_code != 0 or not summary or summary.get("steps") != steps:
            problems.append(f"exit {exit_code} without finishing ({(summary or {}).get('steps')} of {steps} steps)")
    if problems:
        record["log_tail"] = tail(log)
    record["problems"] = problems
    record["ok"] = not problems
    return record


def time_per_step(records: list[dict]) -> float:
    times = [r["time"] for r in records if "time" in r]
    return (times[-1] - times[0]) / max(len(times) - 1, 1) if len(times) > 1 else 0.2


def parse_metrics(workdir: str) -> tuple[dict[int, list[dict]], list[str]]:
    """metrics.jsonl → ({step: every record of it, in order}, unparseable lines)."""
    out: dict[int, list[dict]] = {}
    bad = []
    path = os.path.join(workdir, "metrics.jsonl")
    for line in open(path, errors="replace") if os.path.exists(path) else ():
        if line.strip():
            try:
                record = json.loads(line)
                out.setdefault(record["step"], []).append(record)
            except (json.JSONDecodeError, KeyError, TypeError):
                bad.append(line[:200])
    return out, bad


def compare_metrics(soak: str, reference: str, steps: int) -> dict:
    ours, bad = parse_metrics(soak)
    theirs, bad_ref = parse_metrics(reference)
    mismatches = []
    for step in range(1, steps + 1):
        if step not in ours or step not in theirs:
            mismatches.append({"step": step, "missing_in": "soak" if step not in ours else "reference"})
            continue
        want = theirs[step][-1]
        for i, got in enumerate(ours[step]):
            for key in ("loss", "data_crc"):
                if got.get(key) != want.get(key):
                    mismatches.append({"step": step, "record": i, "field": key, "soak": got.get(key),
                                       "reference": want.get(key)})
    extra = sorted(set(ours) - set(range(1, steps + 1)))
    return {"steps": steps, "records": sum(len(v) for v in ours.values()),
            "relogged_records": sum(len(v) - 1 for v in ours.values()),
            "distinct_data_crc": len({theirs[s][-1].get("data_crc") for s in theirs}),
            "mismatches": mismatches[:20], "mismatch_count": len(mismatches), "extra_steps": extra,
            "unparseable": bad + bad_ref,
            "equal": not mismatches and not extra and not bad and not bad_ref}


def restore_tree(path: str):
    """An Orbax PyTree checkpoint read without a target (host numpy leaves)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # numpy leaves; no accelerator probing in the harness
    import orbax.checkpoint as ocp

    import warnings

    with ocp.PyTreeCheckpointer() as checkpointer, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided")  # host arrays are what we want
        return checkpointer.restore(path)


def compare_trees(a_path: str, b_path: str) -> dict:
    """Every leaf of two Orbax checkpoints: same paths, dtypes, shapes and values (np.array_equal)."""
    import jax
    import numpy as np

    a = dict((jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(
        restore_tree(a_path)))
    b = dict((jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_leaves_with_path(
        restore_tree(b_path)))
    differ = [k for k in sorted(set(a) & set(b))
              if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k])]
    only = sorted(set(a) ^ set(b))
    return {"leaves": len(a), "bytes": int(sum(x.nbytes for x in a.values())), "differ": differ[:20],
            "only_in_one": only[:20], "equal": not differ and not only and bool(a)}


def compare_final(soak: str, reference: str, steps: int) -> dict:
    """The final checkpoints' state and data state, and the exports, soak vs reference."""
    out = {}
    a, b = (os.path.join(w, "checkpoints", str(steps)) for w in (soak, reference))
    if not (os.path.isdir(a) and os.path.isdir(b)):
        return {"equal": False, "error": f"missing final checkpoint: {a} {os.path.isdir(a)}, {b} {os.path.isdir(b)}"}
    out["state"] = compare_trees(os.path.join(a, "state"), os.path.join(b, "state"))
    data = [json.load(open(os.path.join(x, "data", "metadata"))) for x in (a, b)]
    out["data_state"] = {"equal": data[0] == data[1], "soak": data[0] if data[0] != data[1] else None,
                         "reference": data[1] if data[0] != data[1] else None}
    ea, eb = (os.path.join(w, "export") for w in (soak, reference))
    if os.path.isdir(eb) or os.path.isdir(ea):
        params = compare_trees(os.path.join(ea, "params"), os.path.join(eb, "params"))
        names = sorted(n for n in set(os.listdir(ea)) | set(os.listdir(eb)) if n != "params")
        differ = [n for n in names if not (os.path.isfile(os.path.join(ea, n)) and os.path.isfile(os.path.join(eb, n))
                                           and open(os.path.join(ea, n), "rb").read()
                                           == open(os.path.join(eb, n), "rb").read())]
        side = sum(os.path.getsize(os.path.join(eb, n)) for n in names if os.path.isfile(os.path.join(eb, n)))
        out["export"] = {"params": params, "side_files": names, "side_files_differ": differ, "side_bytes": side,
                         "equal": params["equal"] and not differ}
    out["bytes_compared"] = out["state"]["bytes"] + (out["export"]["params"]["bytes"] + out["export"]["side_bytes"]
                                                     if "export" in out else 0)
    out["equal"] = out["state"]["equal"] and out["data_state"]["equal"] and out.get("export", {}).get("equal", True)
    return out


def train_soak(root: str, kills: int, seed: int = 0, *, steps: int = 40, checkpoint_every: int = 3,
               workers: int = 2, pack: bool = True, data_dir: str | None = None, cache: str | None = None,
               first_step_s: float = FIRST_STEP_S, stall_s: float = STALL_S, max_stalls: int = 3) -> dict:
    """The train soak in `root` (see the module docstring). → its record; "passed" says whether every condition
    held."""
    started = time.monotonic()
    os.makedirs(root, exist_ok=True)
    data_dir = data_dir or write_train_data(os.path.join(root, "data"))
    cache = cache or os.path.join(root, "compile_cache")
    reference = os.path.join(root, "reference")
    soak = os.path.join(root, "soak")
    settings = {"steps": steps, "checkpoint_every": checkpoint_every, "workers": workers, "pack": pack,
                "kills": kills, "seed": seed}
    result = {"settings": settings}

    # two uninterrupted runs: the first fills the compile cache, the second starts as the soak's runs will (its
    # time to first step plans the kills); the two must agree, or the soak's comparison would mean nothing
    refs = {}
    for name in ("reference", "reference-2"):
        log_line(f"train {name}: {steps} steps, workers={workers}, pack={pack}")
        os.makedirs(os.path.join(root, name), exist_ok=True)
        refs[name] = run_once(train_command(os.path.join(root, name), data_dir, cache, steps, checkpoint_every,
                                            workers, pack), os.path.join(root, name),
                              os.path.join(root, f"{name}.log"), None, None, None, steps, first_step_s, stall_s)
        result[name.replace("-", "_")] = {k: refs[name].get(k) for k in (
            "exit", "first_step_s", "exited_by_itself_at_s", "problems", "ok", "orphans", "log_tail")}
        if not refs[name]["ok"]:
            result["passed"] = False
            return result
    ref = refs["reference-2"]
    ref_records = parse_metrics(reference)[0]
    step_s = time_per_step([v[-1] for _, v in sorted(ref_records.items())])
    result["reference"]["step_s"] = round(step_s, 3)
    log_line("train: the two uninterrupted runs, compared")
    result["references_agree"] = {"metrics": compare_metrics(os.path.join(root, "reference-2"), reference, steps),
                                  "final": compare_final(os.path.join(root, "reference-2"), reference, steps)}
    result["references_agree"]["equal"] = (result["references_agree"]["metrics"]["equal"]
                                           and result["references_agree"]["final"]["equal"])

    rng = random.Random(seed)
    schedule = kind_schedule(rng, kills)
    args = train_command(soak, data_dir, cache, steps, checkpoint_every, workers, pack)
    os.makedirs(soak, exist_ok=True)
    runs = []
    firsts = [ref["first_step_s"]]
    finished = False
    for i, kind in enumerate(schedule):
        done = logged_steps(soak)
        left = max(steps - max(checkpoint_steps(os.path.join(soak, "checkpoints")), default=0), 1)
        delay = plan_delay(rng, firsts, step_s, left, kills - i)
        span = max(1, round(2 * left / (kills - i + 1)))
        target = min(steps, max(checkpoint_steps(os.path.join(soak, "checkpoints")), default=0) + rng.randint(1, span))
        log_line(f"train run {i + 1}/{kills}: {kind}, " + (f"at save of step ≥ {target}" if kind == "ckpt" else
                                                        f"after {delay:.1f} s") + f" (logged {done}/{steps})")
        record = run_once(args, soak, os.path.join(root, f"soak-{i + 1:02d}.log"), kind, delay, target, steps,
                          first_step_s, stall_s)
        record["run"] = i + 1
        runs.append(record)
        if record["first_step_s"] is not None:
            firsts.append(record["first_step_s"])
        log_line(f"  → exit {record['exit']}, after step {record.get('landed_after_step')}, first step "
                 f"{record['first_step_s']} s, {'ok' if record['ok'] else record['problems']}")
        if record.get("finished_before_signal") and record["exit"] == 0 and logged_steps(soak) >= steps:
            finished = True
            break
        if sum("stalled_at_s" in r for r in runs) >= max_stalls:
            log_line(f"  {max_stalls} stall(s): the soak stops here")
            break
    stalls = sum("stalled_at_s" in r for r in runs)
    if not finished and stalls < max_stalls:
        log_line("train: the last run, left to finish")
        record = run_once(args, soak, os.path.join(root, "soak-final.log"), None, None, None, steps, first_step_s,
                          stall_s)
        record["run"] = len(runs) + 1
        runs.append(record)
        log_line(f"  → exit {record['exit']}, first step {record['first_step_s']} s, "
                 f"{'ok' if record['ok'] else record['problems']}")
    stalls = sum("stalled_at_s" in r for r in runs)
    signalled = [r for r in runs if "signal_at_s" in r]
    resumes = [r for r in runs if r["checkpoint_at_start"] > 0]
    result["runs"] = runs
    result["kills"] = {"tried": len(signalled), "survived": sum(r["ok"] for r in signalled),
                       "requested": kills,
                       "by_kind": {k: {"tried": sum(r["kind"] == k for r in signalled),
                                       "survived": sum(r["kind"] == k and r["ok"] for r in signalled)}
                                   for k in KINDS},
                       "landed_after_step": [[r["kind"], r.get("landed_after_step")] for r in signalled],
                       "ckpt_entries": [r.get("saving") for r in signalled if r["kind"] == "ckpt"],
                       "sigterm_exits": [[r.get("before_first_step"), r["exit"], r.get("exit_after_signal_s")]
                                         for r in signalled if r["kind"] == "sigterm"],
                       "finished_before_signal": sum(bool(r.get("finished_before_signal")) for r in runs),
                       "set_aside": set_aside(soak)}
    result["time_to_first_step_s"] = {
        "resumes": median_max([r["first_step_s"] for r in resumes]),
        "per_resume": [r["first_step_s"] for r in resumes],
        "resumes_signalled_before_first_step": sum(r["first_step_s"] is None for r in resumes),
        "uninterrupted": [refs["reference"]["first_step_s"], ref["first_step_s"]]}
    result["stalls"] = stalls
    final_ok = bool(runs) and runs[-1]["ok"] and runs[-1]["exit"] == 0 and logged_steps(soak) >= steps
    result["metrics"] = compare_metrics(soak, reference, steps)
    log_line("train: comparing the final checkpoints and exports")
    result["final"] = compare_final(soak, reference, steps) if final_ok else {"equal": False,
                                                                              "error": "the soak did not finish"}
    result["bytes_compared"] = result["final"].get("bytes_compared", 0)
    result["failures"] = [{"run": r["run"], "kind": r["kind"], "problems": r["problems"]} for r in runs if not r["ok"]]
    result["passed"] = (final_ok and not result["failures"] and not stalls and result["metrics"]["equal"]
                        and result["final"]["equal"] and len(signalled) == kills
                        and result["references_agree"]["equal"])
    result["wall_s"] = round(time.monotonic() - started, 1)
    log_line(f"train soak: {'PASSED' if result['passed'] else 'FAILED'} — kills survived "
             f"{result['kills']['survived']}/{result['kills']['tried']}, stalls {stalls}, metrics equal "
             f"{result['metrics']['equal']}, final equal {result['final']['equal']}, {result['wall_s']} s")
    return result


# ------------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-kills", type=int, default=20)
    parser.add_argument("--eval-kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", default="2", help="--config.data.workers of the train runs; several (0,2): "
                                                           "one train soak each")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--max-stalls", type=int, default=5, help="a train soak stops after this many stalls")
    parser.add_argument("--root", help="work folder (default: a temporary one, removed at the end)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "soak.json"))
    args = parser.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="qwen2vl-soak-")
    started = time.monotonic()
    result = {"command": "python bench/soak.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "load_avg_at_start": [round(x, 2) for x in os.getloadavg()]},
              "code": git_state(),
              "limits": {"first_step_s": FIRST_STEP_S, "stall_s": STALL_S, "term_exit_s": TERM_EXIT_S,
                         "orphan_s": ORPHAN_S}}
    try:
        if args.train_kills:
            result["train"] = {}
            for workers in (int(w) for w in args.workers.split(",")):
                result["train"][f"workers={workers}"] = train_soak(
                    os.path.join(root, f"train-workers{workers}"), args.train_kills, args.seed, steps=args.steps,
                    checkpoint_every=args.checkpoint_every, workers=workers, max_stalls=args.max_stalls)
        if args.eval_kills:
            from soak_eval import eval_soak
            result["eval"] = eval_soak(os.path.join(root, "eval"), args.eval_kills, args.seed,
                                       samples=args.eval_samples)
    finally:
        result["machine"]["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result["wall_s"] = round(time.monotonic() - started, 1)
        result["passed"] = (all(r["passed"] for r in result.get("train", {}).values())
                            and (not args.train_kills or len(result.get("train", {})) == len(args.workers.split(",")))
                            and (result["eval"]["passed"] if args.eval_kills and "eval" in result
                                 else not args.eval_kills))
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        log_line(f"wrote {args.out}: {'PASSED' if result['passed'] else 'FAILED'}")
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

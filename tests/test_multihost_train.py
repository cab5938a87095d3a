"""Preemption on a (2-process, CPU, gloo) pod: SIGTERM to ONE process makes BOTH save the same step and exit 0, and
a restart resumes; kill -9 of both then a restart resumes; either way the losses are those of an uninterrupted run.
The runs are `qwen2vl-train` subprocesses on the shrunk demo config of tests/test_train_cli.py, one CPU device per
process, sharing one compilation cache."""
import os
import re
import signal
import time

import pytest

from test_multihost import free_port, tail
from test_train_cli import command, data_dir, finish, start, summary_of  # noqa: F401 (data_dir: a fixture)
from training.metrics import read_metrics

TIMEOUT_S = 240
STEPS = 16
ARGS = (f"--config.steps={STEPS}", "--config.checkpoint_every=4", "--config.mesh=data=2",
        "--config.data.length_buckets=(64,128)", "--config.data.vision_buckets=(256,512)")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One compilation cache for every run here: the first job compiles, the later ones load (and start in seconds)."""
    return str(tmp_path_factory.mktemp("compile_cache"))


def start_pair(workdir, data_dir, cache_dir, tag: str, *extra, **env) -> list:
    """Both processes of one 2-process job (`extra`: more command-line overrides); → [(proc, log path)] by process
    id."""
    coordinator = f"localhost:{free_port()}"
    workdir.mkdir(parents=True, exist_ok=True)
    pair = []
    for i in range(2):
        log = str(workdir / f"{tag}.p{i}.log")
        args = command(workdir, data_dir, *ARGS, f"--config.compile_cache={cache_dir}", *extra)
        pair.append((start(args, log, devices=1, JAX_COORDINATOR_ADDRESS=coordinator, JAX_NUM_PROCESSES="2",
                           JAX_PROCESS_ID=str(i), **env), log))
    return pair


def finish_pair(pair) -> list[dict]:
    try:
        for proc, log in pair:
            finish(proc, log, TIMEOUT_S)
    finally:
        kill_pair(pair)
    return [summary_of(log) for _, log in pair]


def kill_pair(pair, sig=signal.SIGKILL) -> None:
    for proc, _ in pair:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
    for proc, _ in pair:
        proc.wait()


def wait_for(condition, pair, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        if any(p.poll() is not None for p, _ in pair) or time.monotonic() > deadline:
            kill_pair(pair)
            logs = "\n".join(f"--- {log} ---\n{tail(log)}" for _, log in pair)
            raise AssertionError(f"a process ended (or {TIMEOUT_S}s passed) before {what}\n{logs}")
        time.sleep(0.02)


def saved_steps(workdir) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def preempt_one(workdir, data_dir, cache_dir, tag: str, who: int, **env) -> list[dict]:
    """Starts a job, SIGTERMs process `who` alone after 3 logged steps; → both summaries (both must exit 0)."""
    pair = start_pair(workdir, data_dir, cache_dir, tag, **env)
    wait_for(lambda: len(read_metrics(workdir)) >= 3, pair, "3 steps were logged")
    os.kill(pair[who][0].pid, signal.SIGTERM)
    return finish_pair(pair)


def assert_saved_together(workdir, summaries) -> int:
    steps = {s["steps"] for s in summaries}
    assert len(steps) == 1, f"the processes stopped at different steps: {steps}"
    step = steps.pop()
    assert all(s["preempted"] for s in summaries) and 3 <= step < STEPS
    assert saved_steps(workdir)[-1] == step  # one complete (committed) step folder for that step
    assert not [p.name for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert (workdir / "checkpoints" / str(step) / "state").is_dir()
    return step


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, cache_dir):
    """An uninterrupted 2-process run (its losses and data order are what every interrupted run must give)."""
    workdir = tmp_path_factory.mktemp("reference")
    finish_pair(start_pair(workdir, data_dir, cache_dir, "run"))
    return read_metrics(workdir)


def assert_losses_equal(run, reference: dict, note: str) -> None:
    ours = read_metrics(run)
    assert sorted(ours) == sorted(reference) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert ours[step]["loss"] == reference[step]["loss"], f"step {step} ({note})"
        assert ours[step]["data_crc"] == reference[step]["data_crc"], f"data order differs at step {step} ({note})"


def finish_resumed(run, data_dir, cache_dir, tag: str, *extra) -> int:
    """Restarts both processes, which must resume and finish; → the step they resumed from."""
    summaries = finish_pair(start_pair(run, data_dir, cache_dir, tag, *extra))
    assert [s["steps"] for s in summaries] == [STEPS, STEPS] and not any(s["preempted"] for s in summaries)
    resumed = [int(re.search(r"resumed from step (\d+)", open(run / f"{tag}.p{i}.log").read())[1]) for i in range(2)]
    assert resumed[0] == resumed[1]
    return resumed[0]


def test_sigterm_to_one_process_saves_the_same_step_on_both_then_resumes_bit_exactly(tmp_path, data_dir, cache_dir,
                                                                                      reference):
    run = tmp_path / "run"
    preempted_at = assert_saved_together(run, preempt_one(run, data_dir, cache_dir, "1-sigterm", who=1))
    assert finish_resumed(run, data_dir, cache_dir, "2-resumed") == preempted_at
    assert_losses_equal(run, reference, f"preempted at {preempted_at}")


def test_kill_9_of_both_processes_then_a_restart_resumes_bit_exactly(tmp_path, data_dir, cache_dir, reference):
    """With 2 worker processes per host decoding (the reference decodes in process: the batches are the same)."""
    run = tmp_path / "run"
    pair = start_pair(run, data_dir, cache_dir, "1-killed", "--config.data.workers=2")
    wait_for(lambda: 8 in saved_steps(run), pair, "checkpoint 8 was written")
    kill_pair(pair)
    assert all(p.returncode == -signal.SIGKILL for p, _ in pair), "the run ended before it could be killed"
    assert max(read_metrics(run)) < STEPS
    resumed = finish_resumed(run, data_dir, cache_dir, "2-resumed", "--config.data.workers=2")
    assert 8 <= resumed < STEPS
    assert_losses_equal(run, reference, f"killed after checkpoint 8, resumed from {resumed}")


def test_without_jax_preemption_service_the_processes_agree_by_all_gather(tmp_path, data_dir, cache_dir):
    """jax_enable_preemption_service=False: no sync service, the per-step all-gather of the SIGTERM flags decides."""
    run = tmp_path / "run"
    summaries = preempt_one(run, data_dir, cache_dir, "sigterm", who=0, JAX_ENABLE_PREEMPTION_SERVICE="false")
    assert_saved_together(run, summaries)


def test_one_process_stops_on_its_own_sigterm_without_any_collective(monkeypatch):
    from jax.experimental import multihost_utils

    from training.checkpoints import Preemption

    def no_collective(*args, **kwargs):
        raise AssertionError("a single process must not call a collective")

    monkeypatch.setattr(multihost_utils, "process_allgather", no_collective)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", no_collective)
    before = signal.getsignal(signal.SIGTERM)
    preemption = Preemption(first_step=5)
    try:
        assert not preemption.stop(6)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler between bytecodes of the main thread
        assert preemption.stop(7) and preemption.requested
    finally:
        preemption.restore()
    assert signal.getsignal(signal.SIGTERM) == before

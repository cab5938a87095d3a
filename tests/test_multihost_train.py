"""Preemption on a (2-process, CPU, gloo) pod: SIGTERM to ONE process makes BOTH save the same step and exit 0;
restarts resume; kill -9 of both then a restart resumes bit-exactly. The runs are `qwen2vl-train` subprocesses on the
shrunk demo config of tests/test_train_cli.py, one CPU device per process."""
import os
import re
import signal
import time

import pytest

from test_multihost import free_port, tail
from test_train_cli import command, finish, start, summary_of
from training.metrics import read_metrics

TIMEOUT_S = 240
STEPS = 16
ARGS = (f"--config.steps={STEPS}", "--config.checkpoint_every=4", "--config.mesh=data=2",
        "--config.data.length_buckets=(64,128)", "--config.data.vision_buckets=(256,512)")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from data_pipeline.synthetic import write_tfds

    folder = str(tmp_path_factory.mktemp("data"))
    write_tfds(folder, {"train": 96, "test": 16}, seed=0)
    return folder


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One compilation cache for every run here: the first job compiles, the later ones load (and start in seconds)."""
    return str(tmp_path_factory.mktemp("compile_cache"))


def start_pair(workdir, data_dir, cache_dir, tag: str, **env) -> list:
    """Both processes of one 2-process job; → [(proc, log path)] by process id."""
    coordinator = f"localhost:{free_port()}"
    workdir.mkdir(parents=True, exist_ok=True)
    pair = []
    for i in range(2):
        log = str(workdir / f"{tag}.p{i}.log")
        args = command(workdir, data_dir, *ARGS, f"--config.compile_cache={cache_dir}")
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


def test_sigterm_to_one_process_saves_the_same_step_on_both_then_resumes_bit_exactly(tmp_path, data_dir, cache_dir):
    reference = tmp_path / "reference"
    finish_pair(start_pair(reference, data_dir, cache_dir, "run"))

    run = tmp_path / "run"
    preempted_at = assert_saved_together(run, preempt_one(run, data_dir, cache_dir, "1-sigterm", who=1))

    # restart both: they resume at the preemption step; kill -9 both once a later checkpoint is committed
    pair = start_pair(run, data_dir, cache_dir, "2-resumed")
    killed_after = (preempted_at // 4 + 1) * 4
    wait_for(lambda: killed_after in saved_steps(run), pair, f"checkpoint {killed_after} was written")
    kill_pair(pair)
    assert all(p.returncode == -signal.SIGKILL for p, _ in pair), "the run ended before it could be killed"
    for _, log in pair:
        assert f"resumed from step {preempted_at}" in open(log).read()

    summaries = finish_pair(start_pair(run, data_dir, cache_dir, "3-after-kill"))
    assert [s["steps"] for s in summaries] == [STEPS, STEPS] and not any(s["preempted"] for s in summaries)
    resumed = int(re.search(r"resumed from step (\d+)", open(run / "3-after-kill.p0.log").read())[1])
    assert killed_after <= resumed < STEPS
    ours, theirs = read_metrics(run), read_metrics(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert ours[step]["loss"] == theirs[step]["loss"], \
            f"step {step} (preempted at {preempted_at}, killed after {killed_after}, resumed from {resumed})"
        assert ours[step]["data_crc"] == theirs[step]["data_crc"], f"data order differs at step {step}"


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

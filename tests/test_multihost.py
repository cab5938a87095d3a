"""Two processes joined with `jax.distributed` (2 CPU devices each, gloo collectives) train exactly like one.

Runs tests/multihost_worker.py three times at once: two processes forming one 4-device job on localhost, and one
process owning 4 devices alone. Both sides shard the same seeded params and batch on a "data=2,fsdp=2" mesh, so the
multi-process one splits the batch and the fsdp-sharded params across processes and its gradients and losses need
cross-process collectives. They must agree on the loss, the train steps' losses and grad norms, and the loss after
the optimizer moved the params."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
WORKER = os.path.join(TESTS, "multihost_worker.py")
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(out: str, log: str, **env) -> tuple[subprocess.Popen, object]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") and k != "XLA_FLAGS"}
    base["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    handle = open(log, "w")
    proc = subprocess.Popen([sys.executable, WORKER, out], cwd=ROOT, env=base | env, stdout=handle,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, handle


def tail(path: str, lines: int = 30) -> str:
    with open(path) as f:
        kept = [line for line in f if "Involuntary full rematerialization" not in line]
    return "".join(kept[-lines:])


def test_two_processes_train_like_one(tmp_path):
    out = str(tmp_path / "result.json")
    coordinator = f"localhost:{free_port()}"
    runs = {"single": dict(out=out + ".single", env=dict(JAX_LOCAL_DEVICES="4"))}
    for i in range(2):
        runs[f"process{i}"] = dict(out=out, env=dict(JAX_LOCAL_DEVICES="2", JAX_COORDINATOR_ADDRESS=coordinator,
                                                     JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)))
    procs = {}
    try:
        for name, run in runs.items():
            procs[name] = launch(run["out"], str(tmp_path / f"{name}.log"), **run["env"])
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = [p.poll() for p, _ in procs.values()]
            if all(c is not None for c in codes) or any(c not in (None, 0) for c in codes):
                break  # all done, or one died (its partner would wait for it until the deadline)
            time.sleep(0.5)
        failed = {name: "still running" if p.poll() is None else f"exit {p.returncode}"
                  for name, (p, _) in procs.items() if p.poll() != 0}
        if failed:
            logs = "\n".join(f"--- {name} ({why}) ---\n{tail(str(tmp_path / f'{name}.log'))}"
                             for name, why in failed.items())
            raise AssertionError(f"workers failed or ran past {TIMEOUT_S}s: {failed}\n{logs}")
    finally:
        for p, handle in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            handle.close()

    single = json.load(open(out + ".single"))
    multi = [json.load(open(f"{out}.{i}")) for i in range(2)]
    assert (single["process_count"], single["device_count"]) == (1, 4)
    assert [(m["process_index"], m["process_count"], m["device_count"], m["local_device_count"]) for m in multi] == \
        [(0, 2, 4, 2), (1, 2, 4, 2)]
    assert single["loss_after"] < single["loss_before"] - 0.1, "the optimizer step moved the params"
    for m in multi:
        np.testing.assert_allclose(m["loss_before"], single["loss_before"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(m["step_losses"], single["step_losses"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(m["loss_after"], single["loss_after"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(m["grad_norms"], single["grad_norms"], rtol=1e-5)

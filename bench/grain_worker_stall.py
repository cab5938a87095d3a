"""What stalled resumes with data.workers > 0: rules grain 0.2.18's `set_state` out, and reproduces the real deadlock.

grain only, no repository code (the lazy_tfds variant also imports tensorflow_datasets). One trial:

  A = iter(pipeline(num_workers)); read --k elements; state = A.get_state()
  (A stays alive / is closed / is deleted, per variant)
  B = iter(pipeline(num_workers)); [optionally next(B) first]; B.set_state(state); next(B) x3
  The set_state + next() run in a daemon thread (or the main thread) bounded by --timeout, and reading A is
  bounded by a watchdog too; a stall dumps every thread's stack in this process, grain's ProcessPrefetch
  bookkeeping of the stalled pipeline, and (via SIGUSR1 + faulthandler, registered by the mp_prefetch
  worker_init_fn) every worker process's stack (kept with --logs DIR).

pipeline(w) = MapDataset.range(--records).shuffle(seed).repeat(None).map(decode: sleeps --decode-ms)
              .to_iter_dataset(ReadOptions(--threads, --prefetch)).mp_prefetch(num_workers=w)
The "slice" variant instead builds B over `mapped[k:]` (no set_state at all) with A alive, from another thread.

Each trial runs in a fresh child interpreter (like one pytest process running the repository's test), so a stalled
trial's leftover thread and worker processes cannot leak into the next trial; the child is killed after --timeout
plus a grace period. Variants (each changes one thing from "base", which is the repository test's condition):

  base        A alive, set_state+next from another thread, set_state before any next(B), 2 workers
  a_closed    A.close() before B is built
  a_deleted   del A (+ gc.collect()) before B is built
  main_thread set_state+next from the main thread (bounded by a SIGALRM-free watchdog thread that dumps stacks)
  after_next  next(B) once before set_state
  workers1 / workers4   1 or 4 workers (A and B)
  slice       no set_state: B = mp_prefetch over the MapDataset sliced at record k, A alive, another thread
  lazy_tfds   base, but the source is LazyTfdsSource (the repository's TfdsSource pattern: first
              `import tensorflow_datasets` in each worker, from grain's read threads at once) -- the
              condition that actually stalls (an import-lock / functools.cached_property-lock deadlock
              inside a fresh worker process; needs tensorflow_datasets installed)

Findings (grain 0.2.18, Python 3.11.7, 2 shared CPU cores): no set_state variant and not the slice design ever
stalled (0 in 20 each); lazy_tfds stalled 4 in 20, 3 of them while reading A, before any set_state: the hang is
a deadlock in a fresh worker's first, multi-threaded `import tensorflow_datasets`, not in grain's set_state.

Run:  nice -n 10 python bench/grain_worker_stall.py --variant all --trials 20 --timeout 60 --logs /tmp/race_logs \
          --out /tmp/race.json
"""
import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = ("base", "a_closed", "a_deleted", "main_thread", "after_next", "workers1", "workers4", "slice",
            "lazy_tfds")


def _decode(i, delay_s):
    import numpy as np

    time.sleep(delay_s)
    return {"index": int(i), "pixels": np.full((16, 16), i, np.float32)}


def _worker_init(index, count):
    """In each grain worker process: SIGUSR1 dumps all its threads' stacks to stderr."""
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)


class LazyTfdsSource:
    """A random-access source shaped like the repository's TfdsSource (data_pipeline/sources.py): its handle is
    dropped when pickled and reopened on first use in each worker process, and opening does the process's first
    `import tensorflow_datasets` plus an attribute access that goes through etils' lazy modules. grain's read
    threads (ReadOptions.num_threads) reach `_open` concurrently in a fresh worker."""

    def __init__(self, n):
        self.n, self._ds = n, None

    def __getstate__(self):
        return {"n": self.n, "_ds": None}

    def _open(self):
        import tensorflow_datasets as tfds

        self._ds = tfds.data_source  # TfdsSource calls tfds.data_source(...) / tfds.builder_from_directory(...)

    def __len__(self):
        if self._ds is None:
            self._open()
        return self.n

    def __getitem__(self, index):
        if self._ds is None:
            self._open()
        return int(index)


def _mapped(args):
    import functools

    import grain

    if args.variant == "lazy_tfds":
        ds = grain.MapDataset.source(LazyTfdsSource(args.records))
    else:
        ds = grain.MapDataset.range(args.records)
    ds = ds.shuffle(seed=1).repeat(None)
    return ds.map(functools.partial(_decode, delay_s=args.decode_ms / 1000))


def _pipeline(args, workers, start=None):
    import grain

    ds = _mapped(args)
    if start is not None:
        ds = ds[start:]
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=args.threads, prefetch_buffer_size=args.prefetch))
    return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_worker_init)


def _expected(args, n):
    """The first n elements' indices of the stream (mp_prefetch's interleave of ds[i::w] restores ds's order)."""
    ds = _mapped(args)
    return [int(ds[i]["index"]) for i in range(n)]


def _describe(it):
    """Best-effort dump of grain's bookkeeping in an mp_prefetch iterator (InterleaveDatasetIterator)."""
    out = {"type": type(it).__name__}
    try:
        out["next_index_in_datasets"] = it._next_index_in_datasets
        out["iterators_in_use_indices"] = list(it._iterators_in_use_indices)
        shards = []
        for tp in it._iterators_in_use:
            if tp is None:
                shards.append(None)
                continue
            pp = getattr(tp, "_maybe_nonnative_parent", tp)
            proc = getattr(pp, "_prefetch_process", None)
            shards.append({
                "thread_prefetch_thread_alive": bool(getattr(tp, "_prefetch_thread", None)
                                                     and tp._prefetch_thread.is_alive()),
                "thread_prefetch_buffer_qsize": tp._buffer.qsize() if hasattr(tp, "_buffer") else None,
                "process": None if proc is None else {"pid": proc.pid, "alive": proc.is_alive(),
                                                      "exitcode": proc.exitcode},
                "set_state_count (main)": getattr(pp, "_set_state_count", None),
                "set_state_request_count (shared)": getattr(getattr(pp, "_set_state_request_count", None),
                                                            "value", None),
                "exhausted": getattr(pp, "_exhausted", None),
            })
        out["shards"] = shards
        pf = it._prefetch_ds_iter
        out["make_iter_prefetch"] = {"next_returned_index": pf._next_returned_index,
                                     "next_buffered_index": pf._next_buffered_index,
                                     "buffered_futures": [f._state for f in pf._buffer]}
    except Exception as e:  # noqa: BLE001 - diagnostics only
        out["error"] = repr(e)
    return out


def _dump_stacks(tag, it=None):
    import faulthandler
    import multiprocessing
    import signal

    sys.stderr.write(f"\n===== STALL in {tag}: stacks of all threads (main process pid {os.getpid()}) =====\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(all_threads=True)
    if it is not None:
        sys.stderr.write("===== the stalled pipeline's mp_prefetch bookkeeping =====\n"
                         + json.dumps(_describe(it), indent=1) + "\n")
    for child in multiprocessing.active_children():
        sys.stderr.write(f"===== worker process {child.name} pid {child.pid}: SIGUSR1 -> faulthandler =====\n")
        sys.stderr.flush()
        try:
            os.kill(child.pid, signal.SIGUSR1)
        except OSError as e:
            sys.stderr.write(f"  {e}\n")
        time.sleep(0.5)
    sys.stderr.flush()


def _write_result(args, result):
    with open(args._result, "w") as f:
        json.dump(result, f)


def run_trial(args):
    """One trial in this process; writes its result dict to --_result (the parent reads it)."""
    import gc
    import threading

    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app take the defaults
        flags.FLAGS.mark_as_parsed()
    v = args.variant
    workers = {"workers1": 1, "workers4": 4}.get(v, 2)
    k = args.k
    want = _expected(args, k + 4)
    t0 = time.time()

    result = {"variant": v, "workers": workers, "stalled": False, "ok": None, "phase": "start"}
    got = []
    box = {}

    def phase(name):
        result["phase"] = name
        sys.stderr.write(f"[{time.time() - t0:6.1f} s] {name}\n")
        sys.stderr.flush()

    def watch(done, tag):  # a stall in this (main) thread: dump stacks, record it, exit
        if not done.wait(args.timeout):
            _dump_stacks(tag, box.get("it"))
            _write_result(args, dict(result, stalled=True, seconds=round(time.time() - t0, 1)))
            os._exit(3)

    a_done = threading.Event()
    threading.Thread(target=watch, args=(a_done, f"{v}: reading pipeline A"), daemon=True).start()
    a = iter(_pipeline(args, workers))
    box["it"] = a
    got_a = [int(next(a)["index"]) for _ in range(k)]
    assert got_a == want[:k], (got_a, want[:k])
    state = a.get_state()
    a_done.set()
    box.pop("it")
    phase(f"A read {k}, got its state")
    if v == "a_closed":
        a.close()
        phase("A closed")
    elif v == "a_deleted":
        del a
        gc.collect()
        phase("A deleted")

    if v == "slice":
        def resume():
            b = iter(_pipeline(args, workers, start=k))
            box["it"] = b
            phase("B built (sliced)")
            for _ in range(3):
                got.append(int(next(b)["index"]))
                phase(f"next(B) #{len(got)}")
    else:
        b = iter(_pipeline(args, workers))
        box["it"] = b
        phase("B built")
        if v == "after_next":
            next(b)
            phase("next(B) before set_state")

        def resume():
            b.set_state(state)
            phase("B.set_state done")
            for _ in range(3):
                got.append(int(next(b)["index"]))
                phase(f"next(B) #{len(got)}")

    errors = []

    def guarded():
        try:
            resume()
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    if v == "main_thread":
        done = threading.Event()
        threading.Thread(target=watch, args=(done, f"{v}: resuming B"), daemon=True).start()
        guarded()
        done.set()
    else:
        reader = threading.Thread(target=guarded, daemon=True)
        reader.start()
        reader.join(args.timeout)
        if reader.is_alive():
            _dump_stacks(v, box.get("it"))
            result["stalled"] = True
    result["seconds"] = round(time.time() - t0, 1)
    import multiprocessing

    # worker processes alive now: A's (unless closed/deleted) + B's; more means grain leaked an iterator's worker
    result["live_workers"] = len(multiprocessing.active_children())
    result["expected_workers"] = workers * (1 if v in ("a_closed", "a_deleted") else 2)
    if not result["stalled"]:
        result["error"] = errors[0] if errors else None
        result["ok"] = not errors and got == want[k:k + 3]
        if not result["ok"]:
            result["got"], result["want"] = got, want[k:k + 3]
    _write_result(args, result)
    os._exit(0)  # skip interpreter teardown (a stalled trial's daemon thread and workers must not block exit)


def _run_child(cmd, hard_timeout, variant):
    """Run one trial in a child interpreter in its own session; → (result row, child's stderr).

    Output goes to temporary files, not pipes: grain's spawned workers inherit the child's stdout/stderr and
    outlive an os._exit()ed parent, so waiting for pipe EOF would wait for them. The whole session (child,
    its grain workers, its resource tracker) is SIGKILLed afterwards."""
    import signal
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        with open(os.path.join(tmp, "stderr"), "w+") as err:
            proc = subprocess.Popen(cmd + ["--_result", result_path], stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            try:
                proc.wait(hard_timeout)
                killed = False
            except subprocess.TimeoutExpired:
                killed = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: itself, its workers, its tracker
            except ProcessLookupError:
                pass
            proc.wait()
            err.seek(0)
            stderr = err.read()
        if os.path.exists(result_path):
            with open(result_path) as f:
                row = json.load(f)
        elif killed:
            row = {"variant": variant, "stalled": True, "ok": None,
                   "error": f"child killed after {hard_timeout} s without a result"}
        else:
            row = {"variant": variant, "stalled": None, "ok": False,
                   "error": f"child exited {proc.returncode} without a result: {stderr[-2000:]}"}
    return row, stderr


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="all", help=f"one of {', '.join(VARIANTS)}, a comma list, or 'all'")
    p.add_argument("--trials", type=int, default=20, help="trials per variant")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the resumed next() may take before a stall")
    p.add_argument("--out", default=None, help="write a JSON summary here")
    p.add_argument("--k", type=int, default=6, help="elements read from A before get_state")
    p.add_argument("--records", type=int, default=48)
    p.add_argument("--decode-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=16, help="ReadOptions.num_threads (the repo's pipeline uses 16)")
    p.add_argument("--prefetch", type=int, default=500, help="ReadOptions.prefetch_buffer_size (repo: 500)")
    p.add_argument("--logs", default=None, help="directory for each stalled trial's stderr (stack dumps)")
    p.add_argument("--_trial", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._trial:
        return run_trial(args)

    variants = VARIANTS if args.variant == "all" else tuple(args.variant.split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    hidden = ("_trial", "_result", "variant", "out", "logs")
    summary = {"settings": {k: v for k, v in vars(args).items() if k not in hidden},
               "python": sys.version.split()[0], "variants": {}}
    try:
        import importlib.metadata as md

        summary["grain"] = md.version("grain")
    except Exception:  # noqa: BLE001
        pass
    start_all = time.time()
    for v in variants:
        rows = []
        for t in range(args.trials):
            cmd = [sys.executable, os.path.abspath(__file__), "--_trial", "--variant", v]
            for name in ("timeout", "k", "records", "decode_ms", "threads", "prefetch"):
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
            row, stderr = _run_child(cmd, args.timeout + 120, v)
            if (row.get("stalled") or not row.get("ok")) and args.logs:
                path = os.path.join(args.logs, f"{v}_trial{t}.stderr.txt")
                with open(path, "w") as f:
                    f.write(stderr)
                row["log"] = path
            rows.append(row)
            print(f"{v:12s} trial {t + 1:2d}/{args.trials}: "
                  f"{'STALL' if row.get('stalled') else ('ok' if row.get('ok') else 'WRONG/ERROR')}"
                  f" ({row.get('seconds', '?')} s){'' if row.get('ok') or row.get('stalled') else ' ' + str(row)}",
                  flush=True)
        summary["variants"][v] = {
            "trials": len(rows), "stalls": sum(bool(r.get("stalled")) for r in rows),
            "ok": sum(bool(r.get("ok")) for r in rows),
            "wrong_or_error": sum(not r.get("ok") and not r.get("stalled") for r in rows), "rows": rows}
    summary["seconds"] = round(time.time() - start_all, 1)
    print("\nvariant       trials  stalls  ok  wrong/error")
    for v, s in summary["variants"].items():
        print(f"{v:12s}  {s['trials']:6d}  {s['stalls']:6d}  {s['ok']:2d}  {s['wrong_or_error']:2d}")
    print(f"total {summary['seconds']} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()

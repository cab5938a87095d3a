"""Orbax checkpoints of a training run: the train state (params, optimizer state, step, RNG) and the data
iterator's position, every N steps, on SIGTERM (preemption: every host saves the same step) and at the end. Writes
are atomic (Orbax commits a step folder only when complete), so a run killed at any moment resumes from the last
whole checkpoint. `directory` may be a gs:// path.

A step a kill cut short (no commit marker: Orbax writes `commit_success.txt` last) or whose files do not read back
(a truncated array file) is never resumed from: `restore_latest` logs it, moves it to DIRECTORY/set_aside/ and takes
the newest step before it. Orbax's temporary folders of an interrupted save are deleted when the manager opens."""
from __future__ import annotations

import json
import logging
import signal
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)
COMMIT_MARKER = "commit_success.txt"  # the file Orbax writes into a step folder once the step is whole
# what tensorstore/Orbax say when a file is missing or cut short (anything else, e.g. a shape mismatch, is raised)
DAMAGE_SIGNS = ("OUT_OF_RANGE", "DATA_LOSS", "NOT_FOUND", "Error reading", "Error opening", "Unexpected end")


class Checkpoints:
    """`keep_only`: state → the part a checkpoint holds (LoRA: the state without its frozen base, which a resumed
    run reads again from where it first came); restore gives that part back."""

    def __init__(self, directory: str, every: int, keep: int = 2, keep_only=None):
        self.every = every
        self.keep_only = keep_only or (lambda state: state)
        self.directory = epath.Path(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                                 cleanup_tmp_directories=True),
            item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state) -> tuple[int, object, dict] | None:
        """→ (step, state, data iterator state) of the newest step that is complete and reads back, or None when
        there is none. Steps skipped on the way are logged with the reason and moved to DIRECTORY/set_aside/."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            if not (self.directory / str(step) / COMMIT_MARKER).exists():
                self._set_aside(step, f"no {COMMIT_MARKER}: a kill cut its save short")
                continue
            try:
                state, data = self.restore(step, abstract_state)
            except (OSError, ValueError, json.JSONDecodeError) as e:
                if not (isinstance(e, (OSError, json.JSONDecodeError)) or any(s in str(e) for s in DAMAGE_SIGNS)):
                    raise
                self._set_aside(step, f"its files do not read back ({type(e).__name__}: {str(e)[:300]})")
                continue
            return step, state, data
        return None

    def _set_aside(self, step: int, why: str) -> None:
        """Moves step `step` out of the manager's sight (kept for inspection, never deleted) and logs why."""
        target = self.directory / "set_aside" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        log.warning("skipping checkpoint step %d in %s: %s; moved it to %s", step, self.directory, why, target)
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
        self.manager.reload()

    def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
        """Saves when `step` is a multiple of `every` (or `force`), with the iterator's state taken now. The write is
        async: the arrays are copied off the device before this returns, so the caller may donate them."""
        if not (force or step % self.every == 0):
            return False
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.keep_only(state)),
                                                               data=ocp.args.JsonSave(data_iterator.get_state())),
                                 force=True)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """→ (state laid out as `abstract_state` (ShapeDtypeStructs with shardings), data iterator state)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                      data=ocp.args.JsonRestore()))
        return restored["state"], restored["data"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class Preemption:
    """A preemption notice (SIGTERM, as a TPU VM gets) → `stop(step)` is True at one step, the SAME step on every
    process, so all of them save that step together (Orbax's save is a collective) and end the run (exit 0).

    One process: a Python SIGTERM handler sets a flag; no collective. Several processes: JAX's preemption sync
    service (jax.distributed starts it: a SIGTERM notifier and a barrier in the coordination service that picks
    the step after the furthest process's, `multihost_utils.reached_preemption_sync_point`); where that service is
    off (`jax_enable_preemption_service=False`), a Python handler per process and an all-gather of the flags every
    `every` steps (a few bytes; any process's flag stops all). Call `stop` at every step with the same step numbers
    on every process."""

    def __init__(self, first_step: int = 0, every: int = 1):
        self.requested = False  # the run stopped for a preemption
        self.noticed = False  # this process received SIGTERM (Python handler only)
        self.every = every
        self.service = False
        if jax.process_count() > 1:
            try:  # the probe registers `first_step` as this process's position (all processes start there)
                multihost_utils.reached_preemption_sync_point(first_step)
                self.service = True  # its C++ handler owns SIGTERM: a Python handler would silence it
            except RuntimeError:  # "Preemption sync manager has not been initialized"
                pass
        self._previous = None if self.service else signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.noticed = True

    def stop(self, step: int) -> bool:
        """Whether to save `step` and stop: True on every process at the same step once any process was noticed."""
        if self.service:
            stop = multihost_utils.reached_preemption_sync_point(step)
        elif jax.process_count() == 1:
            stop = self.noticed
        elif step % self.every == 0:
            stop = bool(np.max(multihost_utils.process_allgather(np.int32(self.noticed))))
        else:
            stop = False
        self.requested |= stop
        return stop

    def restore(self) -> None:
        if not self.service:  # a handler Python did not install (None) cannot be put back: the default then
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)

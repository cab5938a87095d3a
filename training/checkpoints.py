"""Orbax checkpoints of a training run: the train state (params, optimizer state, step, RNG) and the data
iterator's position, every N steps, on SIGTERM (preemption) and at the end. Writes are atomic (Orbax commits a
step folder only when complete), so a run killed at any moment resumes from the last whole checkpoint. `directory`
may be a gs:// path."""
from __future__ import annotations

import signal

import orbax.checkpoint as ocp
from etils import epath


class Checkpoints:
    def __init__(self, directory: str, every: int, keep: int = 2):
        self.every = every
        self.manager = ocp.CheckpointManager(epath.Path(directory),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
        """Saves when `step` is a multiple of `every` (or `force`), with the iterator's state taken now. The write is
        async: the arrays are copied off the device before this returns, so the caller may donate them."""
        if not (force or step % self.every == 0):
            return False
        return self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
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
    """Notes SIGTERM (a TPU VM's preemption notice) so the loop can checkpoint at the next step and stop."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)

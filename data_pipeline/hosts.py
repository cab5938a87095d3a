"""Keeping the hosts of a pod in step while each reads only its own share of the batch.

Every host builds the batch shards of its own devices (batching.py). Two tiny collectives per step keep them one
program and one batch:

- `HostAgreement.needs` (called by batching.BatchIterator): each host's bucket needs (longest row, vision rows per shard,
  most targets in a row) and an error flag with its message; all hosts take the maximum, so all pad to the same
  rungs and compile the same program. A host whose input failed says so here, and every host raises the same error
  instead of the others waiting forever in the next train step.
- `HostAgreement.check`: after collation, the step, the batch's shape key and a CRC of each shard's example ids;
  hosts at different steps or with different shapes stop with an error naming them (never a hang or a silent mix of
  two batches). It returns the CRC of the whole global batch's ids (the same value whatever the process count).

At a checkpoint, `HostAgreement.states` collects every host's shard positions into one dict, so the checkpoint holds
the whole input state (keyed by shard, independent of the number of processes) and every host restores its own.

On one process nothing is exchanged."""
from __future__ import annotations

import json
import zlib

import numpy as np

_MESSAGE_BYTES = 384


def _gather(values: np.ndarray) -> np.ndarray:
    """int[n] from each process (each value in [0, 2³¹): jax moves int32 unless x64 is on) → int64[processes, n]."""
    import jax
    from jax.experimental import multihost_utils

    values = np.asarray(values, np.int64)
    if values.size and (values.min() < 0 or values.max() >= 2**31):
        raise ValueError("host agreement values must lie in [0, 2**31)")
    if jax.process_count() == 1:
        return values[None]
    gathered = multihost_utils.process_allgather(values.astype(np.int32))
    return np.asarray(gathered, np.int64).reshape(jax.process_count(), -1)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _encode(message: str) -> np.ndarray:
    raw = message.encode("utf-8", "replace")[:_MESSAGE_BYTES]
    return np.frombuffer(raw.ljust(_MESSAGE_BYTES, b"\0"), np.uint8).astype(np.int64)


def _decode(codes: np.ndarray) -> str:
    return bytes(codes.astype(np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


class InputError(RuntimeError):
    """A host could not build its share of a batch; raised on every host alike."""


class HostAgreement:
    """The two per-step exchanges for a process that builds batch shards `shard_ids` of `shards`."""

    def __init__(self, shard_ids, shards: int):
        self.shard_ids, self.shards = tuple(shard_ids), shards
        self.batches = 0  # batches agreed so far (hosts must agree on this count too)

    def needs(self, needs: tuple[int, ...], error: BaseException | None = None) -> tuple[int, ...]:
        """→ the element-wise max of all hosts' needs. When any host's input failed, every host raises InputError
        with that host's message; when any host's data ran out, every host raises StopIteration."""
        import jax

        flag = 0 if error is None else 2 if isinstance(error, StopIteration) else 1
        message = "" if error is None else f"{type(error).__name__}: {error}"
        local = np.concatenate([np.array([self.batches, flag, *needs], np.int64), _encode(message)])
        table = _gather(local)
        self.batches += 1
        failed = np.flatnonzero(table[:, 1] == 1)
        if len(failed):
            p = int(failed[0])
            raise InputError(f"process {p} of {jax.process_count()} failed to build its share of input batch "
                             f"{int(table[p, 0])}: {_decode(table[p, 2 + len(needs):])}")
        if (table[:, 1] == 2).any():
            raise StopIteration
        counts = table[:, 0].tolist()
        if len(set(counts)) > 1:
            raise InputError(f"the processes are at different input batches ({counts} by process): their data "
                             "pipelines diverged; restart all of them from the last checkpoint")
        return tuple(int(x) for x in table[:, 2:2 + len(needs)].max(0))

    def states(self, local: dict) -> dict:
        """{"shards": {shard: state}} of this process → the same dict over every process's shards."""
        import jax

        if jax.process_count() == 1:
            return local
        raw = np.frombuffer(json.dumps(local["shards"]).encode(), np.uint8).astype(np.int64)
        width = int(_gather(np.array([len(raw)], np.int64)).max())
        table = _gather(np.concatenate([[len(raw)], raw, np.zeros(width - len(raw), np.int64)]))
        merged = {}
        for row in table:
            merged |= json.loads(bytes(row[1:1 + int(row[0])].astype(np.uint8)).decode())
        return {"shards": merged}

    def check(self, step: int, batch: dict) -> int:
        """Verifies all hosts are at `step` with one batch shape; → the CRC of the global batch's example ids (each
        shard's CRC in shard order: the same value whatever the number of processes)."""
        shape_key = _crc(repr(sorted(_shapes(batch))))
        ids = batch["example_ids"]  # rows of this process's shards, in shard order
        rows_per_shard = len(ids) // len(self.shard_ids)
        crcs = np.zeros(self.shards, np.int64)
        for i, s in enumerate(self.shard_ids):
            crcs[s] = _crc(json.dumps(ids[i * rows_per_shard:(i + 1) * rows_per_shard]))
        table = _gather(np.concatenate([np.array([step, shape_key], np.int64), crcs]))
        for column, what in ((0, "train step"), (1, "batch shape")):
            values = table[:, column].tolist()
            if len(set(values)) > 1:
                raise InputError(f"processes disagree on the {what} ({values} by process): their input pipelines "
                                 "diverged; restart all of them from the last checkpoint")
        return _crc(json.dumps(table[:, 2:].max(0).tolist()))


def _shapes(batch: dict):
    for key, value in batch.items():
        if isinstance(value, dict):
            yield from ((f"{key}.{k}", s) for k, s in _shapes(value))
        elif hasattr(value, "shape"):
            yield key, tuple(value.shape)

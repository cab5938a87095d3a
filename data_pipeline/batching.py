"""Examples → static-shape training batches: bucketed, optionally packed, one packed ViT sequence per batch shard.

The global batch is cut into `layout.shards` batch shards (the mesh's data × fsdp devices; 1 on one device). Each
shard has its OWN example stream (`Batches(parents, layout, shard_ids)`: one grain IterDataset per shard, reading
records s, s + S, s + 2S, …) and fills its B/S rows and its share of the vision budget from it. A process builds only
the shards of its own devices, so on a pod every host reads and decodes only its share, and the batches do not
depend on how many processes there are: one process with 2 devices builds exactly what 2 processes build together.

Each shard's rows hold one example each (or, packed, several first-fit, each its own segment: segment ids 1, 2, … in
attention_mask, positions restarting per example, so packed examples never see each other). The shards then agree on
one shape (across processes by a small collective, hosts.py): the row length is the smallest length rung that
holds every shard's longest row, the vision rows per shard the smallest rung of the per-shard vision ladder
(data.vision_buckets ÷ S) that holds every shard's patches, the LM-head positions per row the smallest loss fraction
holding every row's targets. A run compiles at most len(length ladder) × len(vision ladder) × len(loss ladder)
(+ text-only) train-step programs.

A batch is a dict of numpy arrays, in `training.step`'s layout (S = shards built here, B = S × rows per shard):
    input_ids int32[B, L]; labels int32[B, L]; loss_index, loss_targets int32[B, K] (positions within each row;
    training.step.selected_cross_entropy);
    prepared: {attention_mask (segment ids) int32[B, L], position_ids int32[3, B, L], splice_index int32[B, L] (into
    the row's own shard's merged features), vision_pos_hw int32[S, V, 2], vision_segment_ids int32[S, V]};
    vision_pixels float32[S, V, 1176] (absent when no shard of the batch has media);
    stats: {examples, skipped, real_tokens, padded_tokens, real_vision_rows, padded_vision_rows} int64 scalars;
    example_ids: the ids of each row's examples (a list per row). stats and example_ids stay on the host.

Resuming is exact: a shard's rows are consecutive examples of its stream, and an example that did not fit is held
for the next batch, so each shard's state is the record index of the first example of its next batch. A resumed
stream opens its records there (pipeline.ShardRecords.open); no live iterator is ever repositioned.
"""
from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from qwen2vl_jax.buckets import rung
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.inputs import IGNORE, splice_index, vision_layout

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class BatchLayout:
    rows: int  # global batch rows (data.batch_size)
    lengths: tuple[int, ...]  # length ladder (tokens per row)
    vision_rows: tuple[int, ...]  # vision ladder (patch rows per global batch; each shard gets rung / shards)
    pack: bool
    config: Qwen2VLConfig  # token ids and merge size
    # the LM head runs on K = f·L positions of each row, f the smallest of these fractions that holds every row's
    # targets (a ladder too); () = on all positions
    loss_fractions: tuple[float, ...] = (0.125, 0.5, 1.0)
    shards: int = 1  # batch shards (the mesh's batch devices): each its own rows, stream and packed ViT sequence

    def __post_init__(self):
        group = self.config.vision.spatial_merge_size**2
        if self.rows % self.shards:
            raise ValueError(f"data.batch_size={self.rows} is not a multiple of the {self.shards} batch shards of the "
                             f"mesh (its data × fsdp devices); set data.batch_size to a multiple of {self.shards}")
        bad = [v for v in self.vision_rows if v % (self.shards * group)]
        if bad:
            raise ValueError(f"data.vision_buckets {list(self.vision_rows)}: {bad} cannot be split into "
                             f"{self.shards} batch shards of whole {group}-patch merge groups; use multiples of "
                             f"{self.shards * group}")

    @property
    def rows_per_shard(self) -> int:
        return self.rows // self.shards

    @property
    def shard_vision_rows(self) -> tuple[int, ...]:
        return tuple(v // self.shards for v in self.vision_rows)


@dataclasses.dataclass(frozen=True)
class Shape:
    """The agreed padded sizes of one batch: tokens per row, vision rows per shard (0: text-only), head positions
    per row (0: the head on every position)."""
    length: int
    vision_rows: int
    loss_rows: int


# a shard's needs as plain ints: longest row, patch rows, most targets in one row
Needs = tuple[int, int, int]


class Batches(grain.IterDataset):
    """Batches over one example stream per batch shard built here: `shards[i]` (a pipeline.ShardRecords: the
    shard's examples in order, opened at any record index) feeds shard `shard_ids[i]` (default 0, 1, …). `hosts` (a
    hosts.HostAgreement; None on one process) merges the shards' bucket needs with the other processes', raises on
    every process when one of them failed, and collects all shards' positions at a checkpoint."""

    def __init__(self, shards, layout: BatchLayout, shard_ids=None, hosts=None):
        self.shards = list(shards) if isinstance(shards, (list, tuple)) else [shards]
        super().__init__([s.examples for s in self.shards])
        self.layout, self.hosts = layout, hosts
        self.shard_ids = tuple(range(len(self.shards)) if shard_ids is None else shard_ids)

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self.shards, self.layout, self.shard_ids, self.hosts)


class BatchIterator(grain.DatasetIterator):
    def __init__(self, shards, layout: BatchLayout, shard_ids, hosts=None):
        super().__init__()
        self.layout, self.shard_ids, self.hosts = layout, shard_ids, hosts
        self._streams = [_ShardStream(s, layout) for s in shards]

    def get_state(self) -> dict:
        """{"shards": {shard id: {"position": record index}}}, over every process's shards when `hosts` is set (call
        it on all processes at once, as a checkpoint does)."""
        local = {"shards": {str(s): stream.get_state() for s, stream in zip(self.shard_ids, self._streams)}}
        return self.hosts.states(local) if self.hosts is not None else local

    def set_state(self, state: dict) -> None:
        if "shards" not in state:  # a checkpoint from before per-shard streams: one stream
            state = {"shards": {"0": state}}
        missing = sorted(set(map(str, self.shard_ids)) - set(state["shards"]))
        if missing:
            raise ValueError(f"the data iterator state has no position for batch shards {missing}: the checkpoint was "
                             f"written with another mesh; resume with the mesh it was trained with")
        for s, stream in zip(self.shard_ids, self._streams):
            stream.set_state(state["shards"][str(s)])

    def close(self) -> None:
        """Stops the worker processes, if any."""
        for stream in self._streams:
            stream.close()

    def __next__(self) -> dict:
        picks, error = [], None
        try:
            picks = [stream.pick() for stream in self._streams]
        except Exception as e:  # StopIteration included: still join the agreement, so other hosts stop with us
            error, picks = e, []
        needs = _merge([_needs(rows, self.layout) for rows, _ in picks])
        if self.hosts is not None:
            needs = self.hosts.needs(needs, error)
        if error is not None:
            raise error
        shape = self._shape(needs)
        parts = [self._collate(rows, shape) for rows, _ in picks]
        return _combine(parts, skipped=sum(skipped for _, skipped in picks))

    def _shape(self, needs: Needs) -> Shape:
        lay = self.layout
        length = rung(lay.lengths, needs[0], "row length")
        vision = rung(lay.shard_vision_rows, needs[1], "vision patch rows per shard") if needs[1] else 0
        return Shape(length, vision, head_rows(lay.loss_fractions, length, needs[2]) if lay.loss_fractions else 0)

    def _collate(self, rows: list[list[dict]], shape: Shape) -> dict:
        """One shard's rows → its part of the batch (arrays of the layout above with S = 1)."""
        lay = self.layout
        dims = (len(rows), shape.length)
        ids, labels = np.full(dims, lay.config.pad_token_id, np.int32), np.full(dims, IGNORE, np.int32)
        segments, positions = np.zeros(dims, np.int32), np.zeros((3,) + dims, np.int32)
        for r, row in enumerate(rows):
            at = 0
            for s, e in enumerate(row, start=1):
                span = slice(at, at + len(e["input_ids"]))
                ids[r, span], labels[r, span], segments[r, span] = e["input_ids"], e["labels"], s
                positions[:, r, span] = e["position_ids"]
                at = span.stop
        examples = [e for row in rows for e in row]
        # the model takes all images (in order of appearance), then all videos
        images = [(g, p) for e in examples for g, p in _split(e["pixels"], e["image_grid_thw"], 0)]
        offset = lambda e: int(e["image_grid_thw"].prod(-1).sum())
        videos = [(g, p) for e in examples for g, p in _split(e["pixels"], e["video_grid_thw"], offset(e))]
        grids = np.array([g for g, _ in images + videos], np.int64).reshape(-1, 3)
        merge = lay.config.vision.spatial_merge_size
        image_tokens = sum(int(np.prod(g)) for g, _ in images) // merge**2
        video_tokens = sum(int(np.prod(g)) for g, _ in videos) // merge**2
        index = splice_index(ids, lay.config, image_tokens, video_tokens)
        real_vision = sum(len(p) for _, p in images + videos)
        layout = vision_layout(grids, merge, shape.vision_rows or None, lay.config.vision.window_units)
        if len(layout.feature_slot):  # the merger's output is in the packed (window) order
            index = np.where(index >= 0, layout.feature_slot[np.maximum(index, 0)], -1).astype(np.int32)
        part = dict(input_ids=ids, labels=labels, prepared=dict(attention_mask=segments, position_ids=positions,
                                                               splice_index=index))
        if shape.loss_rows:
            part.update(loss_positions(labels, segments, per_row=shape.loss_rows))
        if shape.vision_rows:
            part["prepared"].update(vision_pos_hw=layout.pos_hw[None], vision_segment_ids=layout.segment_ids[None])
            pixels = np.zeros((1, shape.vision_rows, lay.config.vision.patch_dim), np.float32)
            if real_vision:
                pixels[0, :real_vision] = np.concatenate([p for _, p in images + videos])[layout.rows[:real_vision]]
            part["vision_pixels"] = pixels
        part["example_ids"] = [[e["id"] for e in row] for row in rows]
        part["stats"] = dict(examples=len(examples), real_tokens=int((segments > 0).sum()), padded_tokens=segments.size,
                             real_vision_rows=real_vision, padded_vision_rows=shape.vision_rows)
        return part


class NoUsableRecords(ValueError):
    """A whole pass over a batch shard's records gave no example to train on."""


class _ShardStream:
    """One batch shard's example stream: picks the examples of its next rows (first-fit when packing), holding back
    the one that did not fit; skips (and reports once) examples that failed to load. Its state is the index of the
    record its next batch starts with; the iterator over the records is opened there on the first pick."""

    REASONS = 3  # reasons quoted when a pass yields nothing

    def __init__(self, records, layout: BatchLayout):
        self.records, self.layout = records, layout
        self._iterator = None  # opened at `_position` by the first pick after construction or set_state
        self._position = 0  # index of the next record the iterator yields
        self._held = None  # (example, its record index) that did not fit the previous batch
        self._reported: set = set()
        self._failing: list = []  # (record id, reason) of the failures since the last usable example

    def get_state(self) -> dict:
        return {"position": self._held[1] if self._held else self._position}

    def set_state(self, state: dict) -> None:
        self.close()
        self._position, self._held = record_position(state), None

    def close(self) -> None:
        if self._iterator is not None and hasattr(self._iterator, "close"):
            self._iterator.close()
        self._iterator = None

    def _next(self) -> tuple[dict, int]:
        """→ (the next example, its record index)."""
        if self._iterator is None:
            self._iterator = self.records.open(self._position)
        example = next(self._iterator)
        self._position += 1
        return example, self._position - 1

    def pick(self) -> tuple[list[list[dict]], int]:
        """→ (rows_per_shard lists of examples, examples skipped). StopIteration when the stream is exhausted;
        NoUsableRecords after a whole pass of records that all failed."""
        lay = self.layout
        rows: list[list[dict]] = [[] for _ in range(lay.rows_per_shard)]
        fill, vision, skipped = [0] * lay.rows_per_shard, 0, 0
        while True:
            if self._held:
                (example, position), self._held = self._held, None
            else:
                try:
                    example, position = self._next()
                except StopIteration:
                    if any(rows):
                        break
                    raise
            if "error" in example:
                skipped += 1
                self._report(example)
                continue
            self._failing.clear()
            n, v = len(example["input_ids"]), len(example["pixels"])
            slot = next((i for i in range(lay.rows_per_shard) if (not rows[i] or lay.pack) and
                         fill[i] + n <= lay.lengths[-1]), None)
            if slot is None or vision + v > lay.shard_vision_rows[-1]:
                self._held = (example, position)
                break
            rows[slot].append(example)
            fill[slot] += n
            vision += v
        return rows, skipped

    def _report(self, example: dict) -> None:
        if example["id"] not in self._reported:
            self._reported.add(example["id"])
            log.warning("skipping sample %s: %s", example["id"], example["error"])
        self._failing.append((example["id"], example["error"]))
        if len(self._failing) >= max(self.records.per_pass, 1):
            reasons = "; ".join(f"{i}: {e}" for i, e in self._failing[:self.REASONS])
            raise NoUsableRecords(
                f"{self.records.name}: none of its {self.records.per_pass} records gave a training example in a "
                f"whole pass (first reasons — {reasons}); fix the file or its media paths (jsonl:PATH?root=DIR) "
                "and run again")


def record_position(state: dict) -> int:
    """A shard stream's state → the index of its next record. Also reads the grain iterator states that checkpoints
    held before positions were plain indices: {"parent": {"next_index": i}} in process, and the per-worker states of
    an mp_prefetch pipeline (worker w had read records w, w + W, …, so their counts add up to the position)."""
    if "position" in state:
        return int(state["position"])
    parent = state.get("parent", state)
    if "next_index" in parent:
        return int(parent["next_index"])
    workers = parent.get("iterators_in_use_states")
    if workers is not None and all(isinstance(w, dict) and "next_index" in w for w in workers):
        return sum(int(w["next_index"]) for w in workers)
    raise ValueError(f"cannot read a record position from the data iterator state {str(state)[:200]}; resume "
                     "with the code version that wrote the checkpoint, or start a new workdir")


def _needs(rows: list[list[dict]], layout: BatchLayout) -> Needs:
    """A shard's (longest row, patch rows, most targets in a row)."""
    longest = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    vision = sum(len(e["pixels"]) for row in rows for e in row)
    targets = max(_row_targets(row) for row in rows) if layout.loss_fractions else 0
    return longest, vision, targets


def _row_targets(row: list[dict]) -> int:
    """Targets a packed row holds: each example's labelled tokens after its first (the shift stays in the example)."""
    return sum(int((np.asarray(e["labels"])[1:] != IGNORE).sum()) for e in row)


def _merge(needs: list[Needs]) -> Needs:
    return tuple(max((n[i] for n in needs), default=0) for i in range(3))


def _combine(parts: list[dict], skipped: int) -> dict:
    """The shards' parts → one batch: rows concatenated, vision arrays stacked on the shard axis."""
    def cat(key, axis, tree=lambda p: p):
        return np.concatenate([tree(p)[key] for p in parts], axis=axis)

    batch = {k: cat(k, 0) for k in ("input_ids", "labels")}
    prepared = {k: cat(k, 0, lambda p: p["prepared"]) for k in ("attention_mask", "splice_index")}
    prepared["position_ids"] = cat("position_ids", 1, lambda p: p["prepared"])
    if "loss_index" in parts[0]:
        batch |= {k: cat(k, 0) for k in ("loss_index", "loss_targets")}
    if "vision_pixels" in parts[0]:
        batch["vision_pixels"] = cat("vision_pixels", 0)
        prepared |= {k: cat(k, 0, lambda p: p["prepared"]) for k in ("vision_pos_hw", "vision_segment_ids")}
    batch["prepared"] = prepared
    batch["example_ids"] = [row for p in parts for row in p["example_ids"]]
    totals = {k: sum(p["stats"][k] for p in parts) for k in parts[0]["stats"]}
    batch["stats"] = {k: np.int64(v) for k, v in (totals | {"skipped": skipped}).items()}
    return batch


def _split(pixels: np.ndarray, grids: np.ndarray, start: int):
    """(grid, its pixel rows) for each grid, reading pixels from row `start`."""
    for g in grids:
        n = int(np.prod(g))
        yield g, pixels[start:start + n]
        start += n


def head_rows(fractions: tuple[float, ...], length: int, targets: int) -> int:
    """LM-head positions per row of `length`: the smallest f·length (f in `fractions`) that holds `targets`."""
    return next((int(f * length) for f in sorted(fractions) if int(f * length) >= targets), length)


def loss_positions(labels: np.ndarray, segments: np.ndarray, fractions: tuple[float, ...] = (0.125, 0.5, 1.0),
                   per_row: int | None = None) -> dict:
    """loss_index int32[B, per_row]: positions p within each row whose next token is a target of the same example;
    loss_targets int32[B, per_row]: those targets, IGNORE where a row has fewer (index 0 there). per_row defaults to
    `head_rows` of the row holding the most targets."""
    B, L = labels.shape
    take = (labels[:, 1:] != IGNORE) & (segments[:, 1:] == segments[:, :-1])
    per_row = head_rows(fractions, L, int(take.sum(1).max())) if per_row is None else per_row
    index, targets = np.zeros((B, per_row), np.int32), np.full((B, per_row), IGNORE, np.int32)
    for r in range(B):
        cols = np.flatnonzero(take[r])
        if len(cols) > per_row:
            raise ValueError(f"row {r} has {len(cols)} targets but the LM head takes {per_row} positions per row")
        index[r, :len(cols)], targets[r, :len(cols)] = cols, labels[r, cols + 1]
    return {"loss_index": index, "loss_targets": targets}

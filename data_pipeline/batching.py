"""Examples → static-shape training batches: bucketed, optionally packed, bad examples counted and skipped.

`Batches(parent, layout)` is a grain IterDataset over examples (from `transforms.ToExample`). Each batch holds
`layout.rows` rows. Without packing a row holds one example; with packing, examples go first-fit into rows of at most
the largest length rung, each example its own segment (segment ids 1, 2, ... in attention_mask; positions restart
per example, so packed examples never see each other). The row length is the smallest length rung that holds the
longest row, and the vision patch rows are padded to the smallest vision rung, so a whole run compiles at most
len(length ladder) × len(vision ladder) (+ text-only) train-step programs.

A batch is a dict of numpy arrays, in `training.step`'s layout:
    input_ids int32[B, L]; labels int32[B, L]; loss_index, loss_targets int32[K] (training.step.selected_cross_entropy);
    prepared: {attention_mask (segment ids) int32[B, L],
    position_ids int32[3, B, L], splice_index int32[B, L], vision_pos_hw int32[V, 2], vision_segment_ids int32[V]};
    vision_pixels float32[V, 1176] (absent when no example of the batch has media);
    stats: {examples, skipped, real_tokens, padded_tokens, real_vision_rows, padded_vision_rows} int64 scalars;
    example_ids: the ids of each row's examples (a list per row). stats and example_ids stay on the host.

Resuming is exact: a batch is made of consecutive examples, and an example that did not fit is held for the next
batch, so the iterator state is the parent's state before the first example of the next batch."""
from __future__ import annotations

import dataclasses
import logging

import grain
import numpy as np

from qwen2vl_jax.buckets import rung
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.inputs import splice_index, vision_layout
from training.step import IGNORE

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
    rows: int
    lengths: tuple[int, ...]  # length ladder (tokens per row)
    vision_rows: tuple[int, ...]  # vision ladder (patch rows per batch)
    pack: bool
    config: Qwen2VLConfig  # token ids and merge size
    # the LM head runs on K = f·B·L positions, f the smallest of these fractions that holds every target (a ladder
    # too); () = on all positions
    loss_fractions: tuple[float, ...] = (0.125, 0.5, 1.0)


class Batches(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, layout: BatchLayout):
        super().__init__(parent)
        self.layout = layout

    def __iter__(self) -> BatchIterator:
        return BatchIterator(self._parent.__iter__(), self.layout)


class BatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, layout: BatchLayout):
        super().__init__(parent)
        self.layout = layout
        self._held = None  # (example, parent state before it) that did not fit the previous batch
        self._reported: set = set()

    def get_state(self) -> dict:
        return {"parent": self._held[1] if self._held else self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(state["parent"])
        self._held = None

    def __next__(self) -> dict:
        lay = self.layout
        rows: list[list[dict]] = [[] for _ in range(lay.rows)]
        fill, vision, skipped = [0] * lay.rows, 0, 0
        while True:
            if self._held:
                example, before = self._held
                self._held = None
            else:
                before = self._parent.get_state()
                try:
                    example = next(self._parent)
                except StopIteration:
                    if any(rows):
                        break
                    raise
            if "error" in example:
                skipped += 1
                self._report(example)
                continue
            n, v = len(example["input_ids"]), len(example["pixels"])
            slot = next((i for i in range(lay.rows) if (not rows[i] or lay.pack) and
                         fill[i] + n <= lay.lengths[-1]), None)
            if slot is None or vision + v > lay.vision_rows[-1]:
                self._held = (example, before)
                break
            rows[slot].append(example)
            fill[slot] += n
            vision += v
        return self._collate(rows, skipped)

    def _report(self, example: dict) -> None:
        if example["id"] not in self._reported:
            self._reported.add(example["id"])
            log.warning("skipping sample %s: %s", example["id"], example["error"])

    def _collate(self, rows: list[list[dict]], skipped: int) -> dict:
        lay = self.layout
        length = rung(lay.lengths, max(sum(len(e["input_ids"]) for e in row) for row in rows), "row length")
        shape = (lay.rows, length)
        ids, labels = np.full(shape, lay.config.pad_token_id, np.int32), np.full(shape, IGNORE, np.int32)
        segments, positions = np.zeros(shape, np.int32), np.zeros((3,) + shape, np.int32)
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
        padded_vision = rung(lay.vision_rows, real_vision, "vision patch rows") if real_vision else 0
        pos_hw, vision_segments = vision_layout(grids, merge, padded_vision)
        batch = dict(input_ids=ids, labels=labels, **loss_positions(labels, segments, lay.loss_fractions),
                     prepared=dict(attention_mask=segments, position_ids=positions, splice_index=index,
                                   vision_pos_hw=pos_hw, vision_segment_ids=vision_segments))
        if real_vision:
            pixels = np.zeros((padded_vision, examples[0]["pixels"].shape[1]), np.float32)
            pixels[:real_vision] = np.concatenate([p for _, p in images + videos])
            batch["vision_pixels"] = pixels
        batch["example_ids"] = [[e["id"] for e in row] for row in rows]
        batch["stats"] = {k: np.int64(v) for k, v in dict(
            examples=len(examples), skipped=skipped, real_tokens=int((segments > 0).sum()),
            padded_tokens=segments.size, real_vision_rows=real_vision, padded_vision_rows=padded_vision).items()}
        return batch


def _split(pixels: np.ndarray, grids: np.ndarray, start: int):
    """(grid, its pixel rows) for each grid, reading pixels from row `start`."""
    for g in grids:
        n = int(np.prod(g))
        yield g, pixels[start:start + n]
        start += n


def loss_positions(labels: np.ndarray, segments: np.ndarray, fractions: tuple[float, ...]) -> dict:
    """loss_index int32[K]: flat positions p (into B·L) whose next token is a target of the same example;
    loss_targets int32[K]: those targets, IGNORE where K is padding."""
    if not fractions:
        return {}
    B, L = labels.shape
    take = (labels[:, 1:] != IGNORE) & (segments[:, 1:] == segments[:, :-1])
    rows, cols = np.nonzero(take)
    need = len(rows)
    per_row = next((int(f * L) for f in sorted(fractions) if int(f * L) * B >= need), L)
    index, targets = np.zeros(B * per_row, np.int32), np.full(B * per_row, IGNORE, np.int32)
    index[:need], targets[:need] = rows * L + cols, labels[rows, cols + 1]
    return {"loss_index": index, "loss_targets": targets}



"""Batched generation on device, from bucketed static shapes (see buckets.py).

    tokens = qwen2vl_jax.generate(config, params, batch, max_new_tokens=32)   # int32[B, 32]

`batch` holds the processor's HF-named arrays (left padded). Per call, on the host: check the ids, pad the batch to
its bucket (extra rows are a single pad token) and lay out M-RoPE positions and the packed ViT, one sequence per
batch shard (`prepare_inputs(..., vision_shards=S)`). Then the two device programs of decoding.py:
  1. prefill, one per batch × length × vision-rows × cache rung: the ViT, the splice of its features into the
     token embeddings (a gather inside each batch shard: the features never leave the device), the decoder over the
     prompt, the first token, and the keys/values in a cache of `cache` slots;
  2. decode, one per batch × cache rung: a `lax.while_loop` over the new tokens — cached decoder step, repetition
     penalty, sampling, eos checks and per-row done flags, the `kv_valid` update — ending when every row is done or
     max_new_tokens are out. The cache is donated and each step writes its keys/values in place.
The tokens come back in one device→host copy. Each row's M-RoPE position is its prompt's last position + 1 + step
(the per-row rope delta); rows stop at an eos id and then emit pad_token_id. Sampling (greedy when temperature is 0,
else temperature / top-k / top-p) runs inside the programs from one seeded key per step, so a fixed seed reproduces
the output. Two programs rather than one keep the decode loop compiled per batch × cache rung only.

Sharded models: inside `sharding.rules.generation_rules(mesh)` (`jax.set_mesh` + the inference rules) with params
placed by those rules (`qwen2vl_jax.load(path, mesh=mesh, rules=GENERATION_RULES)`), the batch is split over the
mesh axes the rules give "batch" and both programs run as one SPMD program on every device: attention per device,
weights tensor-parallel, no parameter gathers per step.

Defaults come from the checkpoint's generation_config.json (`config.generation`): eos ids, and temperature / top-k /
top-p / repetition penalty where the caller passes none."""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwen2vl_jax.attention_sharding import active_batch_axes
from qwen2vl_jax.buckets import Ladders, PaddingStats, batch_rung, rung, shapes_for
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.decoding import make_controls, programs
from qwen2vl_jax.inputs import gather_vision_pixels, grid_array, prepare_inputs, widen_vision

STATS = PaddingStats()  # padding of every generate call in this process


class Timeline:
    """Where generate calls spend their time: pass `timeline=Timeline()` and each call appends (phase, seconds) for
    "prepare" (host: checks, padding, layouts, input transfers), "prefill" and "decode" (one device program each)
    and "fetch" (the one device→host copy of the tokens), and the tokens it made to `steps` (the prefill's first +
    one per decode-loop iteration). A timed phase waits for
    its program to finish, which the next phase would do anyway, so the phases add up to the call."""

    def __init__(self):
        self.phases: list[tuple[str, float]] = []
        self.steps: list[int] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        yield
        self.phases.append((name, time.perf_counter() - start))

    def wait(self, value):
        jax.block_until_ready(value)

    def seconds(self, name: str) -> float:
        return sum(s for n, s in self.phases if n == name)

    def calls(self, name: str) -> int:
        return sum(n == name for n, _ in self.phases)


class _Untimed(Timeline):
    @contextlib.contextmanager
    def phase(self, name: str):
        yield

    def wait(self, value):
        pass


def _padded_batch(config: Qwen2VLConfig, input_ids, attention_mask, batch: int, length: int):
    """Left-pad to [batch, length]; extra rows hold one pad token (outputs discarded)."""
    rows, width = input_ids.shape
    ids = np.full((batch, length), config.pad_token_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    ids[:rows, length - width:] = input_ids
    mask[:rows, length - width:] = attention_mask
    mask[rows:, -1] = 1
    return ids, mask


def check_ids(config: Qwen2VLConfig, input_ids, attention_mask) -> None:
    """ValueError naming the row and position of a real (unmasked) token id outside the vocabulary; ids at masked
    positions are never read, so any value there is fine."""
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask) > 0
    bad = np.argwhere(mask & ((ids < 0) | (ids >= config.text.vocab_size)))
    if len(bad):
        row, position = (int(i) for i in bad[0])
        raise ValueError(f"input_ids[{row}, {position}] = {int(ids[row, position])} is outside this checkpoint's "
                         f"vocabulary (0 … {config.text.vocab_size - 1}), with {len(bad)} such id(s) in all: "
                         "tokenize with the checkpoint's own tokenizer (Processor.from_pretrained on the same folder)")


def _check_batch(config: Qwen2VLConfig, batch: dict, max_new_tokens: int):
    """→ (input_ids, attention_mask) after the checks every generate call makes."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    input_ids = np.asarray(batch["input_ids"])
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be int[batch, length] with length ≥ 1; got shape {input_ids.shape}")
    attention_mask = np.asarray(batch.get("attention_mask", np.ones_like(input_ids)))
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids {input_ids.shape}")
    if np.any(attention_mask[:, -1] == 0):
        raise ValueError("every prompt must end at the last position (left padding): attention_mask[:, -1] has 0s")
    check_ids(config, input_ids, attention_mask)
    return input_ids, attention_mask


def _on_device(params):
    """Params as device arrays. Host (numpy) params are copied once per call, with a warning: load them with
    qwen2vl_jax.load or place them once with jax.device_put, so no call copies the weights again."""
    leaves = jax.tree_util.tree_leaves(params)
    if all(isinstance(x, jax.Array) for x in leaves):
        return params
    warnings.warn("generate got host (numpy) params and copies them to the device on every call; place them once "
                  "(jax.device_put(params), or qwen2vl_jax.load, which returns device arrays)", stacklevel=3)
    return jax.device_put(params)


def _place(arrays: dict, batch_axes: tuple[str, ...]) -> dict:
    """Host arrays → device arrays split over the batch axes of the current mesh (the leading dim, or dim 1 of
    position_ids); unchanged without a mesh (the jitted call copies them)."""
    if not batch_axes:
        return arrays
    mesh, spec = jax.sharding.get_mesh(), batch_axes[0] if len(batch_axes) == 1 else batch_axes
    def put(name, x):
        dims = (None, spec) if name == "position_ids" else (spec,)
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*dims)))
    return {name: put(name, x) for name, x in arrays.items()}


def generate(config: Qwen2VLConfig, params, batch: dict, *, max_new_tokens: int, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
             seed: int = 0, eos_token_ids: Sequence[int] | None = None, ladders: Ladders = Ladders(),
             timeline: Timeline | None = None) -> np.ndarray:
    """New tokens int32[B, max_new_tokens] for the processor's HF-named `batch` (input_ids, attention_mask,
    pixel_values + image_grid_thw, pixel_values_videos + video_grid_thw); pad_token_id after a row's eos.

    Sampling options left None take the checkpoint's generation_config.json (`config.generation`; greedy when it
    has none); eos_token_ids None → its eos list, else config.eos_token_id; [] never stops early. Raises ValueError
    for a request that cannot run (its message names the input); check requests one by one first when a batch
    mixes good and bad ones (`generate_many` does). `timeline`: a Timeline that records where the call's time goes."""
    timeline = timeline or _Untimed()
    with timeline.phase("prepare"):
        input_ids, attention_mask = _check_batch(config, batch, max_new_tokens)
        params = _on_device(params)
        merge = config.vision.spatial_merge_size
        images = grid_array(batch.get("image_grid_thw"), "image_grid_thw", merge)
        videos = grid_array(batch.get("video_grid_thw"), "video_grid_thw", merge)
        image_pixels, video_pixels = batch.get("pixel_values"), batch.get("pixel_values_videos")
        pixels = [np.asarray(p, np.float32) for p in (image_pixels, video_pixels) if p is not None]
        batch_axes, shards = active_batch_axes()
        length = rung(ladders.length, input_ids.shape[1], "prompt length (tokens, image placeholders included)")
        ids, mask = _padded_batch(config, input_ids, attention_mask, batch_rung(ladders, len(input_ids), shards),
                                  length)
        prepared = prepare_inputs(config, ids, mask, images if len(images) else None,
                                  videos if len(videos) else None,
                                  image_rows=None if image_pixels is None else len(image_pixels),
                                  video_rows=None if video_pixels is None else len(video_pixels),
                                  vision_shards=shards, second_per_grid_ts=batch.get("second_per_grid_ts"))
        rows = int((prepared["vision_rows"] >= 0).sum(1).max()) if pixels else 0  # the fullest shard's patches
        shapes = shapes_for(ladders, len(input_ids), input_ids.shape[1], rows, max_new_tokens, shards)
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=prepared["position_ids"],
                      splice_index=prepared["splice_index"])
        if pixels:
            vision = widen_vision(prepared, shapes.vision_rows)
            inputs |= dict(vision_pixels=gather_vision_pixels(np.concatenate(pixels), vision["vision_rows"])
                           .astype(jax.numpy.dtype(config.dtype)),  # the ViT's dtype: bf16 halves the copy
                           vision_pos_hw=vision["vision_pos_hw"], vision_segment_ids=vision["vision_segment_ids"])
        inputs = _place(inputs, batch_axes)
        controls = make_controls(config, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                                 eos_token_ids)
        prefill, decode = programs(config, tuple(nn.get_logical_axis_rules()), jax.sharding.get_abstract_mesh())
        done = np.arange(shapes.batch) >= len(input_ids)
        next_position = (prepared["position_ids"].max(axis=(0, 2)) + 1).astype(np.int32)  # last prompt position + 1
    with timeline.phase("prefill"):
        token, cache, kv_valid, seen = prefill(params, inputs, controls, cache_length=shapes.cache)
        del inputs  # on a mesh these are device buffers: free them before the decode loop
        timeline.wait(token)
    with timeline.phase("decode"):
        state = dict(token=token, kv_valid=kv_valid, seen=seen, start=np.int32(shapes.length),
                     **_place(dict(done=done, next_position=next_position), batch_axes))
        tokens, steps, _ = decode(params, cache, state, controls)
        timeline.wait(tokens)
    with timeline.phase("fetch"):
        tokens, steps = jax.device_get((tokens, steps))
    timeline.steps.append(int(steps))
    STATS.add(shapes, tokens=int(attention_mask.sum()), vision_rows=sum(len(p) for p in pixels),
              cache_used=int(attention_mask.sum()) + len(input_ids) * max_new_tokens)
    return np.ascontiguousarray(tokens[:len(input_ids), shapes.length:shapes.length + max_new_tokens])


def collate(requests: Sequence[dict], pad_token_id: int) -> dict:
    """Single requests (HF-named arrays, batch 1 each, as the processor returns) → one left-padded batch, pixels
    concatenated in request order."""
    rows = [np.asarray(r["input_ids"])[0][np.asarray(r.get("attention_mask", np.ones_like(r["input_ids"])))[0] > 0]
            for r in requests]
    length = max(len(row) for row in rows)
    ids = np.full((len(rows), length), pad_token_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
    out = {"input_ids": ids, "attention_mask": mask}
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [r for r in requests if r.get(pixels) is not None]
        if parts:
            out[pixels] = np.concatenate([np.asarray(r[pixels]) for r in parts])
            out[grid] = np.concatenate([np.asarray(r[grid]).reshape(-1, 3) for r in parts])
    videos = [r for r in requests if r.get("pixel_values_videos") is not None]
    if any(r.get("second_per_grid_ts") is not None for r in videos):  # 1.0 per video of a request without (HF's default)
        out["second_per_grid_ts"] = np.concatenate([
            np.asarray(r["second_per_grid_ts"], np.float32).reshape(-1) if r.get("second_per_grid_ts") is not None
            else np.ones(len(np.asarray(r["video_grid_thw"]).reshape(-1, 3)), np.float32) for r in videos])
    return out


def check_request(config: Qwen2VLConfig, request: dict, max_new_tokens: int, ladders: Ladders = Ladders()) -> None:
    """ValueError naming what is wrong with one request (placeholders vs pixels, grids, bucket limits), without
    running the model."""
    ids = np.asarray(request["input_ids"])
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"a request is one prompt: input_ids int[1, length ≥ 1], got shape {ids.shape}")
    check_ids(config, ids, request.get("attention_mask"))
    image_pixels, video_pixels = request.get("pixel_values"), request.get("pixel_values_videos")
    prepare_inputs(config, ids, request.get("attention_mask"), request.get("image_grid_thw"),
                   request.get("video_grid_thw"),
                   image_rows=None if image_pixels is None else len(image_pixels),
                   video_rows=None if video_pixels is None else len(video_pixels),
                   second_per_grid_ts=request.get("second_per_grid_ts"))
    rows = sum(len(p) for p in (image_pixels, video_pixels) if p is not None)
    shapes_for(ladders, 1, ids.shape[1], rows, max_new_tokens)


def request_size(request: dict) -> tuple[int, int]:
    """(vision patch rows, prompt tokens) of a single request: requests sorted by it batch with their like."""
    rows = len(request.get("pixel_values", ())) + len(request.get("pixel_values_videos", ()))
    return rows, request["input_ids"].size


def generate_many(config: Qwen2VLConfig, params, requests: Sequence[dict], *, batch_size: int = 8,
                  max_new_tokens: int, **options) -> list[np.ndarray | ValueError]:
    """Generate for many single requests, `batch_size` at a time, batched in `request_size` order (similar sizes
    side by side: fewer padded rows and tokens per bucket); a request that cannot run gets its ValueError in its
    place and the others run as if it were absent. → per request, in input order: int32[max_new_tokens] tokens or
    the error. `options`: those of `generate` (temperature, top_k, top_p, seed, eos_token_ids, ladders)."""
    results: list = [None] * len(requests)
    good = []
    for i, request in enumerate(requests):
        try:
            check_request(config, request, max_new_tokens, options.get("ladders", Ladders()))
            good.append(i)
        except ValueError as error:
            results[i] = error
    good.sort(key=lambda i: request_size(requests[i]))
    for start in range(0, len(good), batch_size):
        chunk = good[start:start + batch_size]
        tokens = generate(config, params, collate([requests[i] for i in chunk], config.pad_token_id),
                          max_new_tokens=max_new_tokens, **options)
        for i, row in zip(chunk, tokens):
            results[i] = row
    return results

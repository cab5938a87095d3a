"""Batched generation from bucketed static shapes: vision encoder, prefill and a cached decode step, each compiled
once per bucket (see buckets.py).

    tokens = qwen2vl_jax.generate(config, params, batch, max_new_tokens=32)   # int32[B, 32]

`batch` holds the processor's HF-named arrays (left padded). Per call, on the host: pad the batch to its bucket
(extra rows are a single pad token), lay out M-RoPE positions and the packed ViT sequence (`prepare_inputs`), then
  1. encode all images and frame-pairs in one packed sequence of `vision_rows` rows (one program per rung),
  2. prefill: splice the features into the embeddings, run the decoder, sample the first token and return the
     keys/values in a cache of `cache` slots (one program per batch × length × cache rung),
  3. decode: one token per call with the cache (one program per batch × cache rung); each row's M-RoPE position is
     its prompt's last position + 1 + step (the per-row rope delta), rows stop at an eos id and then emit
     pad_token_id; the loop ends when every row has stopped.
Sampling (greedy when temperature is 0, else temperature / top-k / top-p) runs inside those programs from one
seeded key per step, so it costs no extra compile and a fixed seed reproduces the output."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.buckets import Ladders, PaddingStats, Shapes, shapes_for
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.inputs import grid_array, prepare_inputs
from qwen2vl_jax.model import Qwen2VL

STATS = PaddingStats()  # padding of every generate call in this process


def sample(logits, key, temperature, top_k, top_p):
    """logits float32[B, V] → int32[B]. temperature 0: argmax; else softmax(logits / temperature) restricted to
    the top_k largest (0: all) and to the smallest set whose probability reaches top_p (1: all). The sort the
    filters need runs only when sampling (lax.cond), so greedy decoding does not pay for it."""
    def filtered():
        scaled = logits / temperature
        ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, logits.shape[-1]), logits.shape[-1])
        kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, (logits.shape[0], 1)), axis=-1)
        probs = jax.nn.softmax(jnp.where(ordered >= kth, ordered, -jnp.inf), axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the first token is always kept
        cutoff = jnp.min(jnp.where(keep & (ordered >= kth), ordered, jnp.inf), axis=-1, keepdims=True)
        return jax.random.categorical(key, jnp.where(scaled >= cutoff, scaled, -jnp.inf), axis=-1).astype(jnp.int32)

    return jax.lax.cond(temperature > 0, filtered, lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32))


@functools.lru_cache(maxsize=16)
def programs(config: Qwen2VLConfig):
    """The three jitted programs for `config` (cached, so their compiled executables are reused across calls)."""
    model = Qwen2VL(config, decoding=True)

    @jax.jit
    def encode(params, pixels, pos_hw, segment_ids):
        return model.apply({"params": params}, pixels, pos_hw, segment_ids, method=Qwen2VL.encode_vision)

    @functools.partial(jax.jit, static_argnames="cache_length")
    def prefill(params, input_ids, attention_mask, position_ids, features, splice_index, sampling, key, *,
                cache_length):
        logits, kv = model.apply({"params": params}, input_ids, attention_mask, position_ids, features,
                                 splice_index, method=Qwen2VL.prefill)
        # keys/values [..., L, Hkv, hd] (stacked over layers, or one pair per layer) → cache_length slots
        grow = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 3) + [(0, cache_length - a.shape[-3]), (0, 0), (0, 0)])
        return sample(logits, key, *sampling), jax.tree_util.tree_map(grow, kv)

    @functools.partial(jax.jit, donate_argnames="cache")
    def decode(params, tokens, position_ids, cache, index, kv_valid, sampling, key):
        logits, cache = model.apply({"params": params}, tokens[:, None], position_ids, cache, index, kv_valid,
                                    method=Qwen2VL.decode_step)
        return sample(logits[:, 0], key, *sampling), cache

    return encode, prefill, decode


def _padded_batch(config: Qwen2VLConfig, input_ids, attention_mask, shapes: Shapes):
    """Left-pad to [shapes.batch, shapes.length]; extra rows hold one pad token (outputs discarded)."""
    batch, length = input_ids.shape
    ids = np.full((shapes.batch, shapes.length), config.pad_token_id, np.int32)
    mask = np.zeros((shapes.batch, shapes.length), np.int32)
    ids[:batch, shapes.length - length:] = input_ids
    mask[:batch, shapes.length - length:] = attention_mask
    mask[batch:, -1] = 1
    return ids, mask


def generate(config: Qwen2VLConfig, params, batch: dict, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             eos_token_ids: Sequence[int] | None = None, ladders: Ladders = Ladders()) -> np.ndarray:
    """New tokens int32[B, max_new_tokens] for the processor's HF-named `batch` (input_ids, attention_mask,
    pixel_values + image_grid_thw, pixel_values_videos + video_grid_thw); pad_token_id after a row's eos.
    eos_token_ids default to the config's eos_token_id. Raises ValueError for a request that cannot run (its
    message names the input); check requests one by one first when a batch mixes good and bad ones."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
    input_ids = np.asarray(batch["input_ids"])
    if input_ids.ndim != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be int[batch, length] with length ≥ 1; got shape {input_ids.shape}")
    attention_mask = np.asarray(batch.get("attention_mask", np.ones_like(input_ids)))
    if np.any(attention_mask[:, -1] == 0):
        raise ValueError("every prompt must end at the last position (left padding): attention_mask[:, -1] has 0s")
    merge = config.vision.spatial_merge_size
    images = grid_array(batch.get("image_grid_thw"), "image_grid_thw", merge)
    videos = grid_array(batch.get("video_grid_thw"), "video_grid_thw", merge)
    image_pixels, video_pixels = batch.get("pixel_values"), batch.get("pixel_values_videos")
    pixels = [np.asarray(p, np.float32) for p in (image_pixels, video_pixels) if p is not None]
    rows = sum(len(p) for p in pixels)
    shapes = shapes_for(ladders, len(input_ids), input_ids.shape[1], rows, max_new_tokens)
    ids, mask = _padded_batch(config, input_ids, attention_mask, shapes)
    prepared = prepare_inputs(config, ids, mask, images if len(images) else None, videos if len(videos) else None,
                              image_rows=None if image_pixels is None else len(image_pixels),
                              video_rows=None if video_pixels is None else len(video_pixels),
                              vision_pad_to=shapes.vision_rows or None)
    encode, prefill, decode = programs(config)
    dtype = jnp.dtype(config.dtype)
    features = np.zeros((shapes.batch * shapes.length, config.text.hidden_size), dtype)
    if rows:
        padded_pixels = np.zeros((shapes.vision_rows, config.vision.patch_dim), np.float32)
        padded_pixels[:rows] = np.concatenate(pixels)
        merged = encode(params, padded_pixels.astype(dtype), prepared["vision_pos_hw"],
                        prepared["vision_segment_ids"])
        features[:rows // merge**2] = np.asarray(merged[:rows // merge**2])
    sampling = (jnp.float32(temperature), jnp.int32(top_k or 0), jnp.float32(1.0 if top_p is None else top_p))
    key = jax.random.key(seed)
    token, cache = prefill(params, ids, mask, prepared["position_ids"], features, prepared["splice_index"],
                           sampling, jax.random.fold_in(key, 0), cache_length=shapes.cache)
    eos = np.asarray(list(eos_token_ids) if eos_token_ids is not None else [config.eos_token_id])
    out = np.full((shapes.batch, max_new_tokens), config.pad_token_id, np.int32)
    done = np.zeros(shapes.batch, bool)
    done[len(input_ids):] = True
    kv_valid = np.zeros((shapes.batch, shapes.cache), np.int32)
    kv_valid[:, :shapes.length] = mask
    next_position = prepared["position_ids"].max(axis=(0, 2)) + 1  # per row: last prompt position + 1
    for step in range(max_new_tokens):
        token = np.asarray(token)
        out[~done, step] = token[~done]
        done |= np.isin(token, eos)
        if done.all() or step == max_new_tokens - 1:
            break
        index = shapes.length + step
        kv_valid[:, index] = 1
        position = np.broadcast_to((next_position + step)[None, :, None], (3, shapes.batch, 1)).astype(np.int32)
        token, cache = decode(params, token, position, cache, jnp.int32(index), kv_valid, sampling,
                              jax.random.fold_in(key, step + 1))
    STATS.add(shapes, tokens=int(attention_mask.sum()), vision_rows=rows,
              cache_used=int(attention_mask.sum()) + len(input_ids) * max_new_tokens)
    return out[:len(input_ids)]


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
    return out


def check_request(config: Qwen2VLConfig, request: dict, max_new_tokens: int, ladders: Ladders = Ladders()) -> None:
    """ValueError naming what is wrong with one request (placeholders vs pixels, grids, bucket limits), without
    running the model."""
    ids = np.asarray(request["input_ids"])
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"a request is one prompt: input_ids int[1, length ≥ 1], got shape {ids.shape}")
    image_pixels, video_pixels = request.get("pixel_values"), request.get("pixel_values_videos")
    prepare_inputs(config, ids, request.get("attention_mask"), request.get("image_grid_thw"),
                   request.get("video_grid_thw"),
                   image_rows=None if image_pixels is None else len(image_pixels),
                   video_rows=None if video_pixels is None else len(video_pixels))
    rows = sum(len(p) for p in (image_pixels, video_pixels) if p is not None)
    shapes_for(ladders, 1, ids.shape[1], rows, max_new_tokens)


def generate_many(config: Qwen2VLConfig, params, requests: Sequence[dict], *, batch_size: int = 8,
                  max_new_tokens: int, **options) -> list[np.ndarray | ValueError]:
    """Generate for many single requests, `batch_size` at a time; a request that cannot run gets its ValueError in
    its place and the others run as if it were absent. → per request: int32[max_new_tokens] tokens or the error.
    `options`: those of `generate` (temperature, top_k, top_p, seed, eos_token_ids, ladders)."""
    results: list = [None] * len(requests)
    good = []
    for i, request in enumerate(requests):
        try:
            check_request(config, request, max_new_tokens, options.get("ladders", Ladders()))
            good.append(i)
        except ValueError as error:
            results[i] = error
    for start in range(0, len(good), batch_size):
        chunk = good[start:start + batch_size]
        tokens = generate(config, params, collate([requests[i] for i in chunk], config.pad_token_id),
                          max_new_tokens=max_new_tokens, **options)
        for i, row in zip(chunk, tokens):
            results[i] = row
    return results

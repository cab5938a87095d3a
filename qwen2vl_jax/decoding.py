"""The two device programs of generation (see generation.py for the host side that drives them).

prefill (per batch × length × vision-rows × cache rung): the ViT per batch shard, the splice of its features into the
token embeddings, the decoder over the prompt, the first token and the KV cache. decode (per batch × cache rung): a
`lax.while_loop` over the new tokens — cached decoder step, repetition penalty, sampling, eos checks and per-row
done flags, the kv_valid update — with the cache donated and written in place. Both trace under the logical-axis
rules they are built for, so on a mesh they are one SPMD program each."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.buckets import Shapes
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.model import Qwen2VL, abstract_params


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


def penalize(logits, seen, penalty):
    """Repetition penalty as transformers applies it: the logit of every token already in the row (prompt or
    generated; seen bool[B, V]) is divided by `penalty` when positive, multiplied when negative. 1: unchanged."""
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def _mark(seen, tokens, where=None):
    """seen bool[B, V] with tokens int[B, T] (where bool[B, T]) marked."""
    ids = tokens if where is None else jnp.where(where, tokens, seen.shape[1])  # out of range: dropped
    return seen.at[jnp.arange(seen.shape[0])[:, None], ids].set(True, mode="drop")


@functools.lru_cache(maxsize=16)
def programs(config: Qwen2VLConfig, rules: tuple = (), mesh=None):
    """(prefill, decode): the jitted programs for `config` traced under the logical-axis `rules` (and abstract
    `mesh`) of the caller (cached, so their executables are reused across calls)."""
    model = Qwen2VL(config, decoding=True)
    apply = lambda params, *args, method: model.apply({"params": params}, *args, method=method)

    @functools.partial(jax.jit, static_argnames="cache_length")
    def prefill(params, inputs, controls, *, cache_length):
        """inputs: input_ids, attention_mask [B, L], position_ids [3, B, L], splice_index [B, L] and, with vision,
        vision_pixels [S, V, C·T·P·P], vision_pos_hw [S, V, 2], vision_segment_ids [S, V] → (first token int32[B],
        cache (k, v) with cache_length slots, kv_valid int32[B, cache_length], seen bool[B, vocab])."""
        with nn.logical_axis_rules(rules):
            features = None
            if "vision_pixels" in inputs:
                features = apply(params, inputs["vision_pixels"].astype(config.dtype), inputs["vision_pos_hw"],
                                 inputs["vision_segment_ids"], method=Qwen2VL.encode_vision)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            logits, kv = apply(params, ids, mask, inputs["position_ids"], features, inputs["splice_index"],
                               method=Qwen2VL.prefill)
            cache = Qwen2VL.cache_from_prefill(kv, cache_length)
            kv_valid = jnp.pad(mask, ((0, 0), (0, cache_length - mask.shape[1])))
            seen = _mark(jnp.zeros((ids.shape[0], config.text.vocab_size), bool), ids, mask > 0)
            key = jax.random.fold_in(jax.random.key(controls["seed"]), 0)
            token = sample(penalize(logits, seen, controls["repetition_penalty"]), key, *_sampling(controls))
            return token, cache, kv_valid, seen

    @functools.partial(jax.jit, donate_argnames="cache")
    def decode(params, cache, state, controls):
        """state: token int32[B] (the first new token), done bool[B] (rows that emit only padding), kv_valid
        int32[B, C], seen bool[B, V], start int32[] (the cache slot after the prompt), next_position int32[B] (each
        row's first new M-RoPE position). → (tokens int32[B, C]: new token s at column start + s, steps run, the
        final cache)."""
        with nn.logical_axis_rules(rules):
            B, start, pad = state["token"].shape[0], state["start"], jnp.int32(pad_token_id(config))
            key, eos = jax.random.key(controls["seed"]), controls["eos"]
            stops = lambda tokens: jnp.any(tokens[:, None] == eos[None, :], axis=-1)
            write = lambda out, tokens, at: jax.lax.dynamic_update_slice(out, tokens[:, None], (0, at))
            token, done = state["token"], state["done"]
            out = write(jnp.full((B, state["kv_valid"].shape[1]), pad), jnp.where(done, pad, token), start)
            done = done | stops(token)

            def step(carry):
                s, token, done, cache, kv_valid, seen, out = carry
                index = start + s - 1  # the cache slot of the token fed in (new token s - 1)
                position = jnp.broadcast_to((state["next_position"] + s - 1)[None, :, None], (3, B, 1))
                logits, cache = apply(params, token[:, None], position, cache, index, kv_valid,
                                      method=Qwen2VL.decode_step)
                kv_valid = jax.lax.dynamic_update_slice(kv_valid, jnp.ones((B, 1), kv_valid.dtype), (0, index))
                logits = penalize(logits[:, 0], seen, controls["repetition_penalty"])
                token = sample(logits, jax.random.fold_in(key, s), *_sampling(controls))
                out = write(out, jnp.where(done, pad, token), start + s)
                return s + 1, token, done | stops(token), cache, kv_valid, _mark(seen, token[:, None]), out

            def more(carry):
                s, _, done = carry[:3]
                return (s < controls["max_new_tokens"]) & ~jnp.all(done)

            carry = (jnp.int32(1), token, done, cache, state["kv_valid"], _mark(state["seen"], token[:, None]), out)
            carry = jax.lax.while_loop(more, step, carry)
            return carry[-1], carry[0], carry[3]  # the cache too: it aliases the donated input (no second copy)

    return prefill, decode


def pad_token_id(config: Qwen2VLConfig) -> int:
    """The id after a row's end: generation_config.json's pad_token_id, else config.json's."""
    pad = config.generation.pad_token_id
    return config.pad_token_id if pad is None else pad


def _sampling(controls):
    return controls["temperature"], controls["top_k"], controls["top_p"]


def make_controls(config: Qwen2VLConfig, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                  eos_token_ids) -> dict:
    """The traced scalars of a call (host numpy: no compile), defaults from config.generation."""
    defaults = config.generation
    if temperature is None and top_k is None and top_p is None:
        temperature, top_k, top_p = defaults.sampling()
    if repetition_penalty is None:
        repetition_penalty = defaults.repetition_penalty or 1.0
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    if eos_token_ids is None:
        eos_token_ids = defaults.eos_token_ids or (config.eos_token_id,)
    eos = np.full(max(4, 1 << (len(eos_token_ids) - 1).bit_length()), -1, np.int32)  # few sizes: few compiles
    eos[:len(eos_token_ids)] = list(eos_token_ids)
    return dict(temperature=np.float32(temperature or 0.0), top_k=np.int32(top_k or 0),
                top_p=np.float32(1.0 if top_p is None else top_p), repetition_penalty=np.float32(repetition_penalty),
                seed=np.int32(seed), eos=eos, max_new_tokens=np.int32(max_new_tokens))


def abstract_calls(config: Qwen2VLConfig, shapes: Shapes, shards: int = 1, eos_count: int = 1) -> dict:
    """The arguments of both programs for `shapes` as jax.ShapeDtypeStruct trees (params excluded), for AOT
    lowering without data: {"inputs", "controls", "state", "cache"} — prefill(params, inputs, controls,
    cache_length=shapes.cache) and decode(params, cache, state, controls). `shards`: the vision batch shards."""
    B, L, C, V = shapes.batch, shapes.length, shapes.cache, shapes.vision_rows
    spec = lambda shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
    inputs = dict(input_ids=spec((B, L)), attention_mask=spec((B, L)), position_ids=spec((3, B, L)),
                  splice_index=spec((B, L)))
    if V:
        inputs |= dict(vision_pixels=spec((shards, V, config.vision.patch_dim), jnp.dtype(config.dtype)),
                       vision_pos_hw=spec((shards, V, 2)), vision_segment_ids=spec((shards, V)))
    controls = jax.tree_util.tree_map(lambda x: spec(x.shape, x.dtype),
                                      make_controls(config, 1, 0.0, None, None, None, 0, [0] * eos_count))
    prefill, _ = programs(config)
    _, cache, kv_valid, seen = jax.eval_shape(functools.partial(prefill, cache_length=C), _abstract_params(config),
                                              inputs, controls)
    state = dict(token=spec((B,)), done=spec((B,), jnp.bool_), kv_valid=kv_valid, seen=seen, start=spec(()),
                 next_position=spec((B,)))
    return dict(inputs=inputs, controls=controls, state=state, cache=cache)


def _abstract_params(config: Qwen2VLConfig):
    """The params' ShapeDtypeStructs (the boxes' values: nn.unbox would constrain them under active rules)."""
    return jax.tree_util.tree_map(lambda box: box.value, abstract_params(config),
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

"""One optimization step: next-token cross-entropy in float32 over the labelled tokens, and an optax update.

A batch is a dict of static-shape arrays:
    input_ids int32[B, L]; labels int32[B, L] (the token to predict at each position's *next* step, as in
    Hugging Face: labels = input_ids with IGNORE where no loss is wanted; the shift happens here);
    prepared: the dict from `qwen2vl_jax.prepare_inputs` (attention_mask, position_ids, splice_index,
    vision_pos_hw, vision_segment_ids); vision_pixels float[N, C·T·P·P] or absent for text-only batches."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.model import Qwen2VL

IGNORE = -100


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_optimizer(learning_rate: float = 1e-5, *, warmup_steps: int = 0, total_steps: int = 1000,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95, clip_norm: float = 1.0):
    """AdamW with linear warmup (step 0 already moves: lr/warmup_steps) then cosine decay to 0 at total_steps,
    after global-norm clipping."""
    if warmup_steps:
        schedule = optax.warmup_cosine_decay_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps,
                                                      max(total_steps, warmup_steps + 1))
    else:
        schedule = optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits float[B, L, V] at positions 0..L-1 predict labels at 1..L → (summed loss float32, token count)."""
    logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    mask = targets != IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, targets, 0))
    return jnp.sum(losses * mask), jnp.sum(mask)


def loss_fn(params, batch: dict, config: Qwen2VLConfig) -> tuple[jax.Array, jax.Array]:
    """→ (mean loss over labelled tokens, their count)."""
    logits = Qwen2VL(config).apply({"params": params}, batch["input_ids"], batch["prepared"],
                                   batch.get("vision_pixels"), method=Qwen2VL.forward)
    total, count = cross_entropy(logits, batch["labels"])
    return total / jnp.maximum(count, 1), count


def init_state(params, optimizer) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def train_step(state: TrainState, batch: dict, *, config: Qwen2VLConfig, optimizer) -> tuple[TrainState, dict]:
    """Forward, backward and one optimizer update → (new state, {"loss", "grad_norm", "tokens"})."""
    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, config)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def state_shardings(config: Qwen2VLConfig, optimizer, mesh) -> TrainState:
    """Where each part of the train state lives on `mesh` (from the one rules table in sharding/rules.py)."""
    from flax import linen as nn

    from qwen2vl_jax.model import abstract_params
    from sharding.rules import opt_state_shardings, param_shardings

    params = param_shardings(config, mesh)
    opt_state = opt_state_shardings(optimizer, params, nn.unbox(abstract_params(config)), mesh)
    return TrainState(step=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), params=params,
                      opt_state=opt_state)


def jit_train_step(config: Qwen2VLConfig, optimizer, mesh, state_sharding: TrainState, batch_sharding: dict):
    """`train_step` jitted for `mesh`: state donated and kept in `state_sharding`, metrics replicated. Call it (and
    lower it) inside `jax.set_mesh(mesh)`."""
    from sharding.rules import axis_rules

    def step(state, batch):
        with axis_rules(mesh):
            return train_step(state, batch, config=config, optimizer=optimizer)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
                   donate_argnums=0)

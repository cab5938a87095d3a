"""One optimization step: next-token cross-entropy in float32 over the labelled tokens, and an optax update.

A batch is a dict of static-shape arrays:
    input_ids int32[B, L]; labels int32[B, L] (the token to predict at each position's *next* step, as in
    Hugging Face: labels = input_ids with IGNORE where no loss is wanted; the shift happens here);
    prepared: the dict from `qwen2vl_jax.prepare_inputs` (attention_mask, position_ids, splice_index,
    vision_pos_hw, vision_segment_ids); vision_pixels float[N, C·T·P·P] (or [S, N, C·T·P·P], one packed ViT sequence
    per batch shard: data_pipeline.batching) or absent for text-only batches."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.inputs import IGNORE
from qwen2vl_jax.model import Qwen2VL
from training.param_groups import GROUPS, STAGES, group_of, trains, update_scales  # noqa: F401  (names step exports)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array | None = None  # for stochastic layers; saved and restored with the state


def trainable_mask(params, stage: str = "all"):
    """The params tree as bools: True where `stage` (a key of STAGES) trains the parameter."""
    return trains(update_scales(params, stage))


def _gate(param, scale):
    """`param` with its gradient kept only where `scale` (training.param_groups) trains it: a bool or scalar scale
    keeps all or nothing; a per-layer one zeroes the frozen layers' slices (the value stays bit-identical)."""
    scale = np.asarray(scale)
    if scale.ndim == 0 or np.all(scale > 0) or np.all(scale <= 0):
        return param if np.any(scale > 0) else jax.lax.stop_gradient(param)
    fixed = jax.lax.stop_gradient(param)
    mask = (scale > 0).reshape(scale.shape + (1,) * (param.ndim - 1))
    return fixed + jnp.where(mask, param - fixed, 0)


def scale_updates(scales) -> optax.GradientTransformation:
    """Multiplies each update by its parameter's scale (per layer for stacked leaves): learning-rate multipliers,
    and exact zeros for frozen layers of a partly frozen stack. Stateless."""
    def one(u, s):
        if u.ndim < np.ndim(s):  # a wholly frozen leaf's scalar 0 (training.step.gradients)
            return u
        return u * jnp.asarray(s, u.dtype).reshape(np.shape(s) + (1,) * (u.ndim - np.ndim(s)))

    def apply(updates, params=None):
        return jax.tree.map(one, updates, scales)
    return optax.stateless(apply)


def learning_rate_schedule(learning_rate: float, warmup_steps: int, total_steps: int):
    """Linear warmup (step 0 already moves: lr/warmup_steps) then cosine decay to 0 at total_steps."""
    if warmup_steps:
        return optax.warmup_cosine_decay_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps,
                                                  max(total_steps, warmup_steps + 1))
    return optax.cosine_decay_schedule(learning_rate, max(total_steps, 1))


def make_optimizer(learning_rate: float = 1e-5, *, warmup_steps: int = 0, total_steps: int = 1000,
                   weight_decay: float = 0.1, b1: float = 0.9, b2: float = 0.95, clip_norm: float = 1.0,
                   grad_accum: int = 1, trainable=None, scales=None, max_nonfinite: int = 1000):
    """AdamW on `learning_rate_schedule`, after global-norm clipping. `trainable`: a bool tree (trainable_mask) or
    None (all); frozen parameters get zero updates and no optimizer state. `scales` (training.param_groups
    update_scales, None: all 1): each update times its parameter's scale — learning-rate multipliers and frozen layers
    of a stacked leaf. An update whose gradients hold NaN/inf is
    skipped (optax.apply_if_finite; the state counts them). grad_accum > 1: optax.MultiSteps averages that many
    micro-batch gradients per update (a non-finite micro-batch is dropped from the average)."""
    opt = optax.chain(optax.clip_by_global_norm(clip_norm),
                      optax.adamw(learning_rate_schedule(learning_rate, warmup_steps, total_steps),
                                  b1=b1, b2=b2, weight_decay=weight_decay))
    if trainable is not None:
        labels = jax.tree_util.tree_map(lambda t: "train" if t else "frozen", trainable)
        opt = optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, labels)
    if scales is not None:
        opt = optax.chain(opt, scale_updates(scales))
    if grad_accum > 1:
        return optax.MultiSteps(opt, every_k_schedule=grad_accum, should_skip_update_fn=optax.skip_not_finite)
    return optax.apply_if_finite(opt, max_consecutive_errors=max_nonfinite)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits float[B, L, V] at positions 0..L-1 predict labels at 1..L → (summed loss float32, token count)."""
    logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    mask = targets != IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, targets, 0))
    return jnp.sum(losses * mask), jnp.sum(mask)


def skipped_streak(opt_state):
    """How many updates in a row were skipped for NaN/inf gradients (optax.apply_if_finite's count); None under
    grad_accum (optax.MultiSteps drops bad micro-batches without a streak count)."""
    return getattr(opt_state, "notfinite_count", None)


def selected_cross_entropy(hidden: jax.Array, apply_head, loss_index: jax.Array, loss_targets: jax.Array):
    """The LM head and cross-entropy at the K selected positions of each row only (most tokens of a vision-language
    batch — images, system and user turns, padding — carry no loss, and the [B, L, vocab] logits are the step's
    largest tensor). hidden: [B, L, D]; loss_index: int32[B, K], positions within each row whose next token is a
    target; loss_targets: int32[B, K], IGNORE on padding → (summed loss float32, target count). The gather runs along
    the length axis of each row, so on a batch-sharded mesh it (and its backward scatter) stays on the row's device."""
    picked = jnp.take_along_axis(hidden, loss_index[..., None], axis=1)  # [B, K, D]
    logits = apply_head(picked).astype(jnp.float32)  # [B, K, V]
    mask = loss_targets != IGNORE
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(mask, loss_targets, 0))
    return jnp.sum(losses * mask), jnp.sum(mask)


def loss_fn(params, batch: dict, config: Qwen2VLConfig, trainable=None, rng=None) -> tuple[jax.Array, jax.Array]:
    """→ (mean loss over labelled tokens, their count). Frozen parameters (trainable False, or scale 0: a bool tree or
    training.param_groups scales) get no gradient, so XLA drops their backward pass. With batch["loss_index"] /
    ["loss_targets"] (data_pipeline.batching adds them) the head runs on those positions only; otherwise on all of
    them, shifted labels as in Hugging Face. `rng` (a key): the "dropout" stream of stochastic layers (LoRA dropout)."""
    if trainable is not None:
        params = jax.tree_util.tree_map(_gate, params, trainable)
    model = Qwen2VL(config)
    rngs = {} if rng is None else {"dropout": rng}
    apply = lambda *args, **kwargs: model.apply({"params": params}, *args, rngs=rngs, **kwargs)
    args = (batch["input_ids"], batch["prepared"], batch.get("vision_pixels"))
    if "loss_index" in batch:
        hidden = apply(*args, method=Qwen2VL.hidden_states)
        head = lambda x: apply(x, method=Qwen2VL.logits)
        total, count = selected_cross_entropy(hidden, head, batch["loss_index"], batch["loss_targets"])
    else:
        total, count = cross_entropy(apply(*args, method=Qwen2VL.forward), batch["labels"])
    return total / jnp.maximum(count, 1), count


def _differentiated(trainable, params):
    """Per leaf: whether the step takes its gradient — a leaf trained in some layer; never an integer (int8 base)."""
    if trainable is None:
        return jax.tree.map(lambda p: jnp.issubdtype(p.dtype, jnp.inexact), params)
    return jax.tree.map(lambda t, p: bool(np.any(np.asarray(t) > 0)) and jnp.issubdtype(p.dtype, jnp.inexact),
                        trainable, params)


def gradients(params, batch: dict, config: Qwen2VLConfig, trainable=None, rng=None):
    """→ ((loss, count), grads like params): the loss differentiated with respect to the trained leaves only; a
    frozen leaf's gradient is a scalar 0 of its dtype (no full-size zeros, and int8 leaves are never differentiated)."""
    taken = _differentiated(trainable, params)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    flags = treedef.flatten_up_to(taken)
    trained = [leaf for leaf, flag in zip(leaves, flags) if flag]

    def loss_of(trained):
        it = iter(trained)
        full = [next(it) if flag else leaf for leaf, flag in zip(leaves, flags)]
        return loss_fn(jax.tree_util.tree_unflatten(treedef, full), batch, config, trainable, rng)

    value, grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
    it = iter(grads)
    full = [next(it) if flag else jnp.zeros((), leaf.dtype) for leaf, flag in zip(leaves, flags)]
    return value, jax.tree_util.tree_unflatten(treedef, full)


def init_state(params, optimizer, seed: int = 0) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def train_step(state: TrainState, batch: dict, *, config: Qwen2VLConfig, optimizer,
               trainable=None) -> tuple[TrainState, dict]:
    """Forward, backward and one optimizer update → (new state, {"loss", "grad_norm", "tokens"}); `trainable` as in
    make_optimizer (pass the same tree to both)."""
    keys = None if state.rng is None else jax.random.split(jax.random.wrap_key_data(state.rng))
    dropout = keys[1] if keys is not None and config.lora is not None and config.lora.dropout else None
    (loss, count), grads = gradients(state.params, batch, config, trainable, dropout)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "tokens": count}
    rng = None if keys is None else jax.random.key_data(keys[0])
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics


def state_shardings(config: Qwen2VLConfig, optimizer, mesh) -> TrainState:
    """Where each part of the train state lives on `mesh` (from the one rules table in sharding/rules.py)."""
    from flax import linen as nn

    from qwen2vl_jax.model import abstract_params
    from sharding.rules import opt_state_shardings, param_shardings

    params = param_shardings(config, mesh)
    opt_state = opt_state_shardings(optimizer, params, nn.unbox(abstract_params(config)), mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def jit_train_step(config: Qwen2VLConfig, optimizer, mesh, state_sharding: TrainState, batch_sharding: dict,
                   trainable=None):
    """`train_step` jitted for `mesh`: state donated and kept in `state_sharding`, metrics replicated. Call it (and
    lower it) inside `jax.set_mesh(mesh)`."""
    from sharding.rules import axis_rules

    def step(state, batch):
        with axis_rules(mesh):
            return train_step(state, batch, config=config, optimizer=optimizer, trainable=trainable)

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
                   donate_argnums=0)

"""The train step: loss falls, stages freeze their groups bit-exactly (the merger stays trainable), a non-finite
step is skipped, gradient accumulation updates every k micro-batches."""
import functools

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs.demo_cpu import get_config
from data_pipeline.pipeline import training_batches
from data_pipeline.synthetic import make_example, to_messages
from qwen2vl_jax.model import init_params
from training.step import IGNORE, group_of, init_state, loss_fn, make_optimizer, train_step, trainable_mask
from training.train import HOST_KEYS, model_and_processor


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model config, params, a fixed batch of 4 demo examples)."""
    config = get_config()
    model_config, processor = model_and_processor(config, str(tmp_path_factory.mktemp("demo")))
    records = []
    for i in range(4):
        e = make_example(i)
        records.append({"messages": to_messages(e), "images": [e["image"]], "id": str(i)})
    data = ConfigDict(config.data.to_dict() | dict(batch_size=4, shuffle=False, num_epochs=1))
    batch = next(iter(training_batches(records, processor, model_config, data, seed=0)))
    return model_config, init_params(model_config, seed=0), {k: v for k, v in batch.items() if k not in HOST_KEYS}


_STEPS = {}


def _step(setup, stage, lr, optimizer_args):
    """(optimizer, jitted train step) for these settings, built and compiled once per module: runs that differ only
    in their step count or batch share one program."""
    key = (id(setup), stage, lr, tuple(sorted(optimizer_args.items())))
    if key not in _STEPS:
        model_config, params, _ = setup
        trainable = trainable_mask(params, stage)
        optimizer = make_optimizer(lr, warmup_steps=0, total_steps=1000, trainable=trainable, **optimizer_args)
        _STEPS[key] = optimizer, jax.jit(functools.partial(train_step, config=model_config, optimizer=optimizer,
                                                           trainable=trainable))
    return _STEPS[key]


def run(setup, steps, stage="all", lr=3e-3, batch=None, **optimizer_args):
    _, params, fixed = setup
    optimizer, step = _step(setup, stage, lr, optimizer_args)
    state, losses = init_state(params, optimizer), []
    for _ in range(steps):
        state, metrics = step(state, fixed if batch is None else batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_head_on_target_positions_only_gives_the_full_loss_and_gradients(setup):
    model_config, params, batch = setup
    assert batch["loss_index"].size < batch["input_ids"].size  # the demo batch takes the small rung
    full = {k: v for k, v in batch.items() if k not in ("loss_index", "loss_targets")}
    grad = jax.jit(jax.value_and_grad(functools.partial(loss_fn, config=model_config), has_aux=True))
    (a, ca), ga = grad(params, batch)
    (b, cb), gb = grad(params, full)
    assert int(ca) == int(cb) == int((batch["labels"] != IGNORE).sum())
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), ga, gb)


def test_loss_falls_on_a_fixed_batch(setup):
    _, losses = run(setup, 25)
    assert losses[-1] < 0.2 * losses[0], losses


@pytest.mark.parametrize("stage,frozen", [("llm", {"vision"}), ("vision", {"llm"}), ("all", set())])
def test_stages_freeze_their_groups_bit_exactly(setup, stage, frozen):
    _, params, _ = setup
    state, _ = run(setup, 3, stage=stage)
    moved = {"vision": False, "merger": False, "llm": False}
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(params),
                                     jax.tree_util.tree_leaves(state.params)):
        same = np.array_equal(np.asarray(before), np.asarray(after))
        group = group_of(path)
        if group in frozen:
            assert same, f"{jax.tree_util.keystr(path)} moved although stage {stage!r} freezes {group}"
        moved[group] |= not same
    assert moved["merger"], "the merger must stay trainable in every stage"
    assert all(moved[g] for g in moved if g not in frozen)


def test_a_non_finite_step_is_skipped(setup):
    model_config, params, fixed = setup
    poisoned = dict(fixed, vision_pixels=np.full_like(fixed["vision_pixels"], np.nan))
    state, losses = run(setup, 1, batch=poisoned)
    assert not np.isfinite(losses[0])
    assert int(state.opt_state.notfinite_count) == 1 and int(state.step) == 1
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           params, state.params)


def test_gradient_accumulation_updates_every_k_micro_batches(setup):
    _, params, _ = setup
    embed = lambda state: np.asarray(state.params["language_model"]["embed_tokens"])
    one, _ = run(setup, 1, grad_accum=2)
    two, _ = run(setup, 2, grad_accum=2)
    np.testing.assert_array_equal(embed(one), np.asarray(params["language_model"]["embed_tokens"]))
    plain, _ = run(setup, 1)
    np.testing.assert_allclose(embed(two), embed(plain), atol=1e-6)  # two equal micro-batches = one step

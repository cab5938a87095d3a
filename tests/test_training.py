"""The train step: loss falls, stages freeze their groups bit-exactly (the merger stays trainable), a non-finite
step is skipped, gradient accumulation updates every k micro-batches."""
import functools

import jax
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from configs.demo_cpu import get_config
from data_pipeline.pipeline import training_batches
from data_pipeline.synthetic import make_example, to_messages
from qwen2vl_jax.model import init_params
from training.step import IGNORE, group_of, init_state, loss_fn, make_optimizer, train_step, trainable_mask
from training.train import HOST_KEYS, model_and_processor


def demo_setup(folder: str, shards: int = 1):
    """(demo model config, its params, a fixed batch of 4 demo examples laid out for `shards` batch shards)."""
    config = get_config()
    model_config, processor = model_and_processor(config, folder)
    records = []
    for i in range(4):
        e = make_example(i)
        records.append({"messages": to_messages(e), "images": [e["image"]], "id": str(i)})
    data = ConfigDict(config.data.to_dict() | dict(batch_size=4, shuffle=False, num_epochs=1))
    batch = next(iter(training_batches(records, processor, model_config, data, seed=0, shards=shards)))
    return model_config, init_params(model_config, seed=0), {k: v for k, v in batch.items() if k not in HOST_KEYS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model config, params, a fixed batch of 4 demo examples)."""
    return demo_setup(str(tmp_path_factory.mktemp("demo")))


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


def _steps(model_config, params, batch, steps, lr, **groups):
    """`steps` updates of `params` on `batch` with optim.freeze / optim.lr_multipliers as the train CLI builds them."""
    from training.param_groups import is_uniform, trains, update_scales

    scales = update_scales(params, "all", groups.get("freeze", ""), groups.get("lr_multipliers", ""))
    optimizer = make_optimizer(lr, warmup_steps=0, total_steps=1000, trainable=trains(scales),
                               scales=None if is_uniform(scales) else scales)
    step = jax.jit(functools.partial(train_step, config=model_config, optimizer=optimizer, trainable=scales))
    state = init_state(params, optimizer)
    for _ in range(steps):
        state, _ = step(state, batch)
    return state


def test_freeze_by_pattern_in_a_scanned_model(setup):
    """optim.freeze in a scanned model: ViT block 0, a slice of every stacked block leaf, stays bit-identical and
    gets no gradient (its Adam moments stay 0) while blocks 1… train; a whole frozen leaf (the merger's ln_q) holds
    no optimizer state at all."""
    import dataclasses

    from qwen2vl_jax.checkpoint.mapping import stack_layers

    model_config, params, batch = setup
    stacked = stack_layers(params, model_config)
    groups = dict(freeze=r"visual/blocks_0/|visual/merger/ln_q/", lr_multipliers="visual/merger=0.5")
    state = _steps(dataclasses.replace(model_config, scan_layers=True), stacked, batch, 2, 3e-3, **groups)
    after, before = state.params["visual"]["blocks"], stacked["visual"]["blocks"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b)[0]), after, before)
    assert not any(np.array_equal(np.asarray(a)[1], np.asarray(b)[1]) for a, b in
                   zip(jax.tree.leaves(after), jax.tree.leaves(before)) if np.asarray(b)[1].std() > 0)
    ln_q = stacked["visual"]["merger"]["ln_q"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), state.params["visual"]["merger"]["ln_q"], ln_q)
    nu = [x for x in jax.tree.leaves(state.opt_state) if x.shape == before["attn"]["qkv"]["kernel"].shape]
    assert nu and all(not np.asarray(x)[0].any() and np.asarray(x)[1].any() for x in nu)
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * (sum(x.size for x in jax.tree.leaves(stacked)) - sum(x.size for x in jax.tree.leaves(ln_q)))


def test_lr_multipliers_are_adamw_at_that_rate_and_freezing_is_exact():
    """On a toy tree with fixed gradients: a ×0.5 group moves exactly as AdamW at half the rate, a frozen layer of a
    stacked leaf gets an update of exactly 0, and the rest as plain AdamW."""
    from training.param_groups import trains, update_scales
    from training.step import scale_updates

    rng = np.random.default_rng(0)
    params = {"visual": {"blocks": {"w": rng.normal(size=(3, 4, 5)).astype(np.float32)},
                         "merger": {"w": rng.normal(size=(5, 2)).astype(np.float32)}},
              "language_model": {"embed_tokens": rng.normal(size=(7, 4)).astype(np.float32)}}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(3)]
    scales = update_scales(params, freeze=r"visual/blocks_1/", lr_multipliers="merger=0.5")
    assert scales["visual"]["blocks"]["w"].tolist() == [1, 0, 1] and float(scales["visual"]["merger"]["w"]) == 0.5

    def run(optimizer, tree):
        state, out = optimizer.init(tree), tree
        for g in grads:
            g = jax.tree.map(lambda x, s: x * (np.asarray(s) > 0).reshape(np.shape(s) + (1,) * (x.ndim - np.ndim(s))),
                             g, scales)  # what the gated loss gives: no gradient into the frozen layer
            updates, state = optimizer.update(g, state, out)
            out = optax.apply_updates(out, updates)
        return out

    ours = run(make_optimizer(1e-2, warmup_steps=0, total_steps=10, clip_norm=1e9, trainable=trains(scales),
                              scales=scales), params)
    adamw = lambda lr: optax.adamw(optax.cosine_decay_schedule(lr, 10), b1=0.9, b2=0.95, weight_decay=0.1)
    full, half = run(adamw(1e-2), params), run(adamw(5e-3), params)
    np.testing.assert_allclose(ours["visual"]["merger"]["w"], half["visual"]["merger"]["w"], rtol=1e-6)
    np.testing.assert_allclose(ours["language_model"]["embed_tokens"], full["language_model"]["embed_tokens"],
                               rtol=1e-6)
    w = np.asarray(ours["visual"]["blocks"]["w"])
    np.testing.assert_array_equal(w[1], params["visual"]["blocks"]["w"][1])
    np.testing.assert_allclose(w[[0, 2]], np.asarray(full["visual"]["blocks"]["w"])[[0, 2]], rtol=1e-6)
    assert scale_updates(scales).init(params) == optax.EmptyState()


def test_bad_group_patterns_are_named():
    from training.param_groups import update_scales

    params = {"visual": {"blocks_0": {"w": np.zeros(2)}}, "language_model": {"embed_tokens": np.zeros(2)}}
    with pytest.raises(ValueError, match="optim.freeze 'visual/blocks_9/' matches no trained parameter"):
        update_scales(params, freeze="visual/blocks_9/")
    with pytest.raises(ValueError, match="PATTERN=MULTIPLIER"):
        update_scales(params, lr_multipliers="visual=fast")
    with pytest.raises(ValueError, match="leaves nothing to train"):
        update_scales(params, stage="vision", freeze="visual")
    with pytest.raises(ValueError, match="'merger' matches no trained"):
        update_scales(params, lr_multipliers="merger=0.1")

"""Meshes, the logical-axis rules table, and sharded forward / loss / grads / train steps on 8 fake CPU devices."""
import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qwen2vl_jax import Qwen2VL, prepare_inputs
from qwen2vl_jax.inputs import gather_vision_pixels
from reference import reference
from sharding.mesh import device_grid, make_mesh, parse_axes, resolve_axes
from sharding.rules import axis_rules, batch_shard_count, batch_shardings, param_shardings
from test_model import make_batch
from training.step import (IGNORE, init_state, jit_train_step, loss_fn, make_optimizer, state_shardings,
                           train_step)

PIECES = [[2, ("image", (1, 4, 4)), 3], [6, ("image", (1, 8, 6)), 1], [1, ("image", (1, 2, 10)), 9], [4]]
MESHES = ["fsdp=4,tensor=2", "data=2,fsdp=2,tensor=2"]


def train_batch(cfg, pieces=PIECES, seed=0, shards=None) -> dict:
    """A training batch (training/step.py layout) from `make_batch` pieces: labels on every real token. `shards`: the
    packed ViT laid out per batch shard (as the data pipeline builds it for a mesh) instead of one sequence."""
    b = make_batch(cfg, pieces, seed)
    rows = len(b["pixel_values"]) if "pixel_values" in b else None
    prepared = prepare_inputs(cfg, b["input_ids"], b["attention_mask"], b.get("image_grid_thw"), image_rows=rows,
                              vision_shards=shards)
    out = {"input_ids": b["input_ids"], "labels": np.where(b["attention_mask"] == 1, b["input_ids"], IGNORE),
           "prepared": prepared}
    if rows:
        vision_rows = prepared.pop("vision_rows", None)
        out["vision_pixels"] = b["pixel_values"] if shards is None else gather_vision_pixels(b["pixel_values"],
                                                                                              vision_rows)
    return out


def test_mesh_axes_parse_fill_and_refuse():
    assert parse_axes("tensor=2, fsdp=-1") == {"fsdp": -1, "tensor": 2}
    assert resolve_axes({"fsdp": -1, "tensor": 2}, 8) == {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}
    mesh = make_mesh("data=2,fsdp=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    for bad, message in (("fsdp=3", "does not divide 8"), ("fsdp=2", "uses 2 of 8"), ("model=2", "not among"),
                         ("fsdp=-1,tensor=-1", "at most one"), ("fsdp:2", "axis=size")):
        with pytest.raises(ValueError, match=message):
            make_mesh(bad)


def test_multi_slice_grid_keeps_slices_on_the_dcn_axis():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class FakeTpu:  # the attributes mesh_utils reads
        id: int
        slice_index: int
        process_index: int = 0
        platform: str = "cpu"
        device_kind: str = "cpu"

    devices = [FakeTpu(i, slice_index=i // 4) for i in range(8)]
    grid = device_grid((1, 2, 2, 1), (2, 1, 1, 1), devices)  # data across 2 slices, fsdp × tensor inside
    assert grid.shape == (2, 2, 2, 1)
    assert [{d.slice_index for d in grid[k].ravel()} for k in range(2)] == [{0}, {1}]
    with pytest.raises(ValueError, match="Number of slices 1 must equal"):  # CPU: processes (here one) are slices
        make_mesh("fsdp=2,tensor=2", dcn="data=2")


@pytest.mark.parametrize("scan", [False, True])
def test_every_large_parameter_is_sharded(scan):
    cfg = reference("untied")[0].replace(scan_layers=scan)
    shardings = param_shardings(cfg, make_mesh("fsdp=4,tensor=2"))
    from qwen2vl_jax.model import abstract_params

    shapes = jax.tree_util.tree_map(lambda x: x.value.shape, abstract_params(cfg),
                                    is_leaf=lambda x: hasattr(x, "names"))
    flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
    shape_of = dict((jax.tree_util.keystr(k), s) for k, s in
                    jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0])
    replicated = [jax.tree_util.keystr(k) for k, s in flat
                  if np.prod(shape_of[jax.tree_util.keystr(k)]) >= 2048 and all(a is None for a in s.spec)]
    assert replicated == [], "large parameters replicated on every device"
    lm = shardings["language_model"]
    layer = lm["layers"] if scan else lm["layers_1"]
    lead = (None,) if scan else ()
    assert lm["embed_tokens"].spec == P("tensor", "fsdp")
    assert lm["lm_head"]["kernel"].spec == P("fsdp", "tensor")
    assert layer["self_attn"]["q_proj"]["kernel"].spec == P(*lead, "fsdp", "tensor", None)
    assert layer["self_attn"]["k_proj"]["kernel"].spec == P(*lead, "fsdp", "tensor", None)
    assert layer["mlp"]["gate_proj"]["kernel"].spec == P(*lead, "fsdp", "tensor")
    assert layer["mlp"]["down_proj"]["kernel"].spec == P(*lead, "tensor", "fsdp")
    # 3 vision heads do not divide tensor=2: that dim is replicated, the embed dim stays split over fsdp
    block = shardings["visual"]["blocks" if scan else "blocks_0"]
    assert block["attn"]["qkv"]["kernel"].spec == P(*lead, "fsdp", None, None, None)


def _place(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


@functools.lru_cache(maxsize=None)
def _single_device(name: str):
    cfg, _, params = reference(name)
    batch = train_batch(cfg)
    logits = jax.jit(lambda p, b: Qwen2VL(cfg).apply({"params": p}, b["input_ids"], b["prepared"],
                                                     b["vision_pixels"], method=Qwen2VL.forward))(params, batch)
    (loss, _), grads = jax.jit(jax.value_and_grad(functools.partial(loss_fn, config=cfg), has_aux=True))(params, batch)
    return np.asarray(logits), float(loss), jax.tree_util.tree_map(np.asarray, grads)


@pytest.mark.parametrize("axes", MESHES)
def test_sharded_forward_loss_and_grads_equal_one_device(axes):
    """One device runs the batch's ViT as one sequence; the mesh runs it per batch shard (each shard's images its
    own packed sequence, spliced back within the shard): the same logits, loss and gradients."""
    cfg, _, params = reference("untied")
    mesh = make_mesh(axes)
    batch = train_batch(cfg, shards=batch_shard_count(mesh))
    assert batch["vision_pixels"].shape[0] == 4
    logits1, loss1, grads1 = _single_device("untied")
    with jax.set_mesh(mesh), axis_rules(mesh):
        p = _place(params, param_shardings(cfg, mesh))
        b = _place(batch, batch_shardings(batch, mesh))
        assert b["input_ids"].sharding.spec == P(("data", "fsdp") if "data" in axes else "fsdp", None)
        logits = jax.jit(lambda p, b: Qwen2VL(cfg).apply({"params": p}, b["input_ids"], b["prepared"],
                                                         b["vision_pixels"], method=Qwen2VL.forward))(p, b)
        (loss, _), grads = jax.jit(jax.value_and_grad(functools.partial(loss_fn, config=cfg), has_aux=True))(p, b)
    assert logits.sharding.spec[0] is not None, "activations follow the batch sharding"
    np.testing.assert_allclose(np.asarray(logits), logits1, atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(loss), loss1, atol=1e-5, rtol=0)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-5, rtol=0), grads, grads1)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_and_scan_keep_the_gradients(remat):
    cfg, _, params = reference("untied")
    batch = train_batch(cfg)
    _, loss1, grads1 = _single_device("untied")
    from qwen2vl_jax.checkpoint.mapping import stack_layers

    scanned = cfg.replace(scan_layers=True, remat=remat)
    grad_fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, config=scanned), has_aux=True))
    (loss, _), grads = grad_fn(stack_layers(params, cfg), batch)
    np.testing.assert_allclose(float(loss), loss1, atol=1e-6, rtol=0)
    expected = stack_layers(grads1, cfg)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6, rtol=0),
                           grads, expected)


def test_train_step_on_a_mesh_equals_one_device():
    cfg, _, params = reference("untied")
    optimizer = make_optimizer(1e-3, warmup_steps=1, total_steps=10)
    step = jax.jit(functools.partial(train_step, config=cfg, optimizer=optimizer))
    state1, metrics1 = step(init_state(params, optimizer), train_batch(cfg))
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    batch = train_batch(cfg, shards=batch_shard_count(mesh))
    shardings = state_shardings(cfg, optimizer, mesh)
    with jax.set_mesh(mesh):
        state = jax.jit(functools.partial(init_state, optimizer=optimizer), out_shardings=shardings)(
            _place(params, shardings.params))
        b_shard = batch_shardings(batch, mesh)
        sharded_step = jit_train_step(cfg, optimizer, mesh, shardings, b_shard)
        state, metrics = sharded_step(state, _place(batch, b_shard))
    mu = state.opt_state.inner_state[1][0].mu["language_model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert mu.sharding.spec == P("fsdp", "tensor")
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics1["loss"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(metrics1["grad_norm"]), rtol=1e-5)
    # the moments carry the gradients: tight. Adam's first update is lr·g/(|g| + 1e-8), which swings by up to lr
    # where |g| ~ 1e-8, so single parameters may differ by float32 noise × 1e5; most must agree to 1e-6
    for moment in ("mu", "nu"):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0),
                               getattr(state.opt_state.inner_state[1][0], moment), getattr(state1.opt_state.inner_state[1][0], moment))
    diffs = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel() for a, b in zip(
        jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(state1.params))])
    assert diffs.max() <= 1e-3 and np.mean(diffs > 1e-6) < 1e-3
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state1.params, params)
    assert min(jax.tree_util.tree_leaves(moved)) > 1e-4, "the step updated every parameter"

"""LoRA (qwen2vl_jax/lora.py): the step equals a hand-written W + (alpha/rank)·A·B reference (loss and the gradients of A
and B), the base gets no gradient and keeps its bytes (bf16 and int8), only adapters hold optimizer state, merging
gives the adapted model, and 8 fake devices give one device's step without gathering activations."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from qwen2vl_jax import lora
from qwen2vl_jax.checkpoint.mapping import stack_layers
from qwen2vl_jax.model import Qwen2VL, abstract_params
from training.param_groups import adapters_only, trains, update_scales
from training.step import gradients, init_state, loss_fn, make_optimizer, train_step
from test_partitioning import float_gathers_larger_than
from test_training import demo_setup
from test_train_cli import data_dir  # noqa: F401 (fixture)

TARGETS = lora.DECODER_TARGETS + r"|^visual/merger/mlp_0$|^visual/blocks/attn/qkv$"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(scanned float32 model config, its params, a batch of 4 demo examples laid out for 4 batch shards)."""
    model_config, params, batch = demo_setup(str(tmp_path_factory.mktemp("demo")), shards=4)
    return model_config.replace(scan_layers=True), stack_layers(params, model_config), batch


def _adapted(model_config, params, base_dtype="float32", seed=1):
    """(LoRA config, base + adapters with B random too, so every gradient is nonzero)."""
    config = model_config.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS, base_dtype=base_dtype))
    adapters = lora.init_adapters(config, seed)
    key = iter(jax.random.split(jax.random.key(seed + 1), 64))
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(next(key), x.shape), adapters)
    full = lora.merge_trees(params, adapters)
    return config, (lora.quantize(config, full) if base_dtype == "int8" else full)


def _reference_kernels(config, params):
    """Hand-written: every adapted kernel as W + (alpha/rank) · A·B, per layer, A·B as an explicit einsum over the
    flattened in/out axes; the rest of the tree as it is (int8 kernels dequantized by their scales)."""
    base, adapters = lora.split(params)
    out = jax.tree.map(lambda x: x, base)

    def walk(a_node, node, stacked):
        for key, value in a_node.items():
            if "lora_a" not in value:
                walk(value, node[key], stacked or key in ("layers", "blocks"))
                continue
            a, b, kernel = value["lora_a"], value["lora_b"], node[key]["kernel"]
            if "kernel_scale" in node[key]:
                scale = node[key].pop("kernel_scale")
                kernel = kernel.astype(jnp.float32) * scale.reshape(
                    scale.shape[:1] * stacked + (1,) * (kernel.ndim - scale.ndim) + scale.shape[stacked:])
            lead = a.shape[:1] if stacked else ()
            a2 = a.reshape(*lead, -1, a.shape[-1])  # [layers?, in, r]
            b2 = b.reshape(*lead, b.shape[stacked], -1)  # [layers?, r, out]
            delta = jnp.einsum("...ir,...ro->...io", a2, b2).reshape(kernel.shape)
            node[key]["kernel"] = kernel.astype(jnp.float32) + config.lora.alpha / config.lora.rank * delta

    walk(adapters, out, False)
    return out


@pytest.mark.parametrize("base_dtype", ["float32", "int8"])
def test_the_lora_step_is_the_hand_written_reference(setup, base_dtype):
    model_config, params, batch = setup
    config, adapted = _adapted(model_config, params, base_dtype)
    scales = adapters_only(update_scales(adapted, "all"))
    (loss, count), grads = jax.jit(functools.partial(gradients, config=config, trainable=scales))(adapted, batch)

    def reference(adapters):
        kernels = _reference_kernels(config, lora.merge_trees(lora.split(adapted)[0], adapters))
        return loss_fn(kernels, batch, model_config)[0]

    want_loss, want_grads = jax.jit(jax.value_and_grad(reference))(lora.split(adapted)[1])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    got_adapters = lora.split(grads)[1]
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_adapters), jax.tree.leaves(want_grads)):
        assert float(jnp.abs(want).max()) > 0, jax.tree_util.keystr(path)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * float(jnp.abs(want).max()),
                                   err_msg=jax.tree_util.keystr(path))
    base_grads = jax.tree.leaves(lora.split(grads)[0])
    assert all(g.shape == () and float(g) == 0 for g in base_grads)  # no gradient taken for the base


def _lora_step(config, adapted):
    """(adapters-only scales, their optimizer, the jitted one-device train step) for an adapted tree."""
    scales = adapters_only(update_scales(adapted, "all"))
    optimizer = make_optimizer(1e-2, warmup_steps=0, total_steps=100, trainable=trains(scales))
    return scales, optimizer, jax.jit(functools.partial(train_step, config=config, optimizer=optimizer,
                                                        trainable=scales))


def test_training_moves_the_adapters_only_and_int8_bytes_stay(setup):
    model_config, params, batch = setup
    config, adapted = _adapted(model_config, params, "int8")
    _, optimizer, step = _lora_step(config, adapted)
    state, losses = init_state(adapted, optimizer), []
    for _ in range(4):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    before_base, before_adapters = lora.split(adapted)
    after_base, after_adapters = lora.split(state.params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(after_base), jax.tree.leaves(before_base)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)
    assert {str(x.dtype) for x in jax.tree.leaves(after_base) if x.ndim > 1} >= {"int8"}
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after_adapters),
                                                          jax.tree.leaves(before_adapters)))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert moments == 2 * sum(x.size for x in jax.tree.leaves(before_adapters))


def test_merged_weights_give_the_adapted_model(setup):
    model_config, params, batch = setup
    ids = np.arange(80).reshape(2, 40) % 300 + 3  # text only (no vision placeholders)
    logits = jax.jit(lambda config, p: Qwen2VL(config).apply({"params": p}, ids), static_argnums=0)
    for base_dtype in ("float32", "int8"):
        config, adapted = _adapted(model_config, params, base_dtype)
        want = logits(config, adapted)
        got = logits(model_config, lora.merged(config, adapted))
        np.testing.assert_allclose(got, want, atol=2e-5)
        assert not np.allclose(want, logits(model_config, params), atol=1e-3)


def test_a_fresh_adapter_changes_nothing_and_the_tree_is_declared(setup):
    model_config, params, batch = setup
    config = model_config.replace(lora=lora.LoraConfig(rank=8, alpha=16.0, base_dtype="int8"))
    full = lora.quantize(config, lora.merge_trees(params, lora.init_adapters(config, 0)))
    declared = jax.tree.map(lambda x: (x.shape, x.dtype), nn.unbox(abstract_params(config)))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), full) == declared
    q_proj = full["language_model"]["layers"]["self_attn"]["q_proj"]
    assert q_proj["lora_a"].shape == (2, 128, 8) and q_proj["lora_b"].shape == (2, 8, 4, 32)
    assert q_proj["kernel"].dtype == jnp.int8 and q_proj["kernel_scale"].shape == (2, 4, 32)
    ids = np.arange(32)[None] % 300 + 3
    plain = Qwen2VL(model_config).apply({"params": params}, ids)
    np.testing.assert_allclose(Qwen2VL(config.replace(lora=dataclasses.replace(config.lora, base_dtype="float32"))
                                       ).apply({"params": lora.merge_trees(params, lora.split(full)[1])}, ids),
                               plain, atol=1e-6)  # B = 0
    # int8 per-channel rounding: within 1 % of the logits' scale
    assert float(jnp.abs(Qwen2VL(config).apply({"params": full}, ids) - plain).max()) < 0.01 * float(
        jnp.abs(plain).max())


def test_eight_devices_give_one_devices_lora_step(setup):
    from sharding.mesh import make_mesh
    from sharding.rules import local_batch_shards, place_local_batch
    from training.step import jit_train_step, state_shardings

    model_config, params, batch = setup
    config, adapted = _adapted(model_config, params, "int8")
    scales, optimizer, one = _lora_step(config, adapted)
    want_state, want = one(init_state(adapted, optimizer), batch)
    mesh = make_mesh("fsdp=4,tensor=2")
    with jax.set_mesh(mesh):
        shardings = state_shardings(config, optimizer, mesh)
        up = shardings.params["language_model"]["layers"]["mlp"]["up_proj"]
        assert up["lora_b"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # [layers, rank, mlp]
        assert up["lora_a"].spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # [layers, embed, rank]
        state = jax.jit(functools.partial(init_state, optimizer=optimizer), out_shardings=shardings)(adapted)
        device_batch, b_shardings = place_local_batch(batch, mesh, local_batch_shards(mesh))
        step = jit_train_step(config, optimizer, mesh, shardings, b_shardings, scales)
        compiled = step.lower(state, device_batch).compile()
        got_state, got = compiled(state, device_batch)
    # the work divides: nothing larger than a parameter is all-gathered (no activation is gathered whole)
    largest = max(x.size for x in jax.tree.leaves(adapted))
    gathered = float_gathers_larger_than(compiled, largest)
    assert not gathered, [(g.op_name, [str(a) for a in g.arrays]) for g in gathered]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5)
    # after one Adam step (lr 1e-2: each adapter entry moves ~1e-2), a bug would be off by ~lr; summation order
    # leaves ~1e-6 (Adam's g/√v magnifies it where g is tiny), hence 5e-5
    for x, y in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=0, atol=5e-5)


LORA_RUN = ("--config.lora.rank=4", "--config.lora.alpha=8", "--config.lora.base_dtype=int8",
            "--config.lora.targets=" + TARGETS.replace("visual/blocks/", "visual/blocks(_\\d+)?/"),
            "--config.lora.train_also=visual/merger/ln_q", "--config.optim.learning_rate=1e-2",
            "--config.checkpoint_every=3",
            "--config.data.length_buckets=(64,128)", "--config.data.vision_buckets=(256,512)")


def test_a_lora_run_resumes_bit_exactly(tmp_path, data_dir):  # noqa: F811 (test_train_cli's fixture)
    """The train CLI with an int8 base: 6 steps straight, and 3 steps then a resumed run to 6, log the same losses
    bit for bit and export the same merged weights; checkpoints hold what trains (adapters, lora.train_also's
    parameters) with its optimizer state, not the frozen base."""
    import orbax.checkpoint as ocp

    from test_train_cli import command, finish, start
    from training.metrics import read_metrics

    runs = {}
    for name, legs in (("straight", (6,)), ("resumed", (3, 6))):
        workdir = tmp_path / name
        for steps in legs:
            log = str(tmp_path / f"{name}-{steps}.log")
            finish(start(command(workdir, data_dir, *LORA_RUN, f"--config.steps={steps}",
                                 f"--config.compile_cache={tmp_path / 'cache'}"), log), log)
        runs[name] = workdir
    losses = {name: {step: r["loss"] for step, r in read_metrics(str(w)).items()} for name, w in runs.items()}
    assert sorted(losses["straight"]) == list(range(1, 7)) and losses["straight"] == losses["resumed"]
    assert "resumed from step 3" in open(tmp_path / "resumed-6.log").read()
    exports = {name: ocp.StandardCheckpointer().restore(str(w / "export" / "params")) for name, w in runs.items()}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), exports["straight"], exports["resumed"])
    state = ocp.StandardCheckpointer().restore(str(runs["resumed"] / "checkpoints" / "6" / "state"))
    q_proj = state["params"]["language_model"]["layers_0"]["self_attn"]["q_proj"]
    assert set(q_proj) == {"lora_a", "lora_b"}  # the frozen base is not checkpointed: a resume reads it again
    assert "embed_tokens" not in state["params"]["language_model"]
    assert set(state["params"]["visual"]["merger"]["ln_q"]) == {"scale", "bias"}  # trained in full: kept
    assert not (runs["resumed"] / "export" / "adapter").exists()  # train_also: merged weights only, no PEFT folder


def test_an_int8_base_is_quantized_one_array_at_a_time_as_it_is_read(setup, tmp_path):
    """training.train.initial_params with an int8 base and init_from: the checkpoint's arrays are read, placed and
    quantized one at a time (never the whole float base) into exactly what quantizing the loaded base gives, in the
    int8 tree's shardings."""
    from qwen2vl_jax.checkpoint.load import open_checkpoint
    from sharding.mesh import make_mesh
    from sharding.rules import param_shardings
    from training.export import export_params

    model_config, params, _ = setup
    export_params(str(tmp_path / "base"), model_config, params, None)
    config = model_config.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, targets=TARGETS, base_dtype="int8"))
    mesh = make_mesh("fsdp=4,tensor=2")
    shardings = lora.split(param_shardings(config, mesh))[0]
    got = lora.place_quantized(config, open_checkpoint(str(tmp_path / "base"), "float32", True)[1], shardings)
    want = lora.split(lora.quantize(config, lora.merge_trees(params, lora.init_adapters(config, 0))))[0]
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                               jax.tree.leaves(shardings)):
        assert a.dtype == b.dtype and a.sharding == s, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
    assert got["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].dtype == jnp.int8

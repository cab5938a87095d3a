"""On a mesh each device does 1/N of the work: the compiled programs gather no activations, their attention loops
run over local blocks only, and their values equal one device's (8 fake CPU devices, conftest)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from configs.demo_cpu import get_config
from data_pipeline.batching import BatchLayout
from data_pipeline.pipeline import training_batches
from data_pipeline.synthetic import make_example, to_messages
from qwen2vl_jax.attention import dot_product_attention
from qwen2vl_jax.model import init_params
from sharding.hlo_stats import all_gathers, while_loops
from sharding.mesh import make_mesh
from sharding.rules import axis_rules, batch_shard_count, batch_shardings, local_batch_shards, place_local_batch
from training.step import init_state, jit_train_step, make_optimizer, state_shardings, train_step
from training.train import HOST_KEYS, model_and_processor

MESHES = ["fsdp=8", "data=2,fsdp=2,tensor=2"]
TOL = dict(rtol=1e-5, atol=1e-5)


def loop_trips(compiled) -> set:
    """Known trip counts of the while loops that slice blocks out of ≥2-D operands: the blockwise kernel's loop over
    query blocks (lax.map over rows × blocks) — on one device's rows it runs B/N · L/256 times, not B · L/256."""
    return {loop.trip_count for loop in while_loops(compiled)
            if loop.trip_count and any(len(buffer.shape) >= 2 for _, buffer, _ in loop.slices)}


def float_gathers_larger_than(compiled, elements: int) -> list:
    return [g for g in all_gathers(compiled, min_elements=elements + 1)
            if any(a.dtype.startswith(("f", "bf")) for a in g.arrays)]


@pytest.mark.parametrize("mesh_spec", MESHES)
@pytest.mark.parametrize("impl", ["xla_dense", "xla_blockwise"])
def test_attention_runs_per_device_without_gathers(impl, mesh_spec):
    mesh = make_mesh(mesh_spec)
    B, L, H, hkv, D = 8, 512, 4, 2, 16
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((B, L, H, D)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, L, hkv, D)), jnp.float32) for _ in range(2))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, L)), axis=1), jnp.int32)  # left padding (0) + 2 segments

    def loss(q, k, v, seg):
        out = dot_product_attention(q, k, v, segment_ids=seg, causal=True, implementation=impl)
        return jnp.sum(out * jnp.cos(out)), out

    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v, seg)

    def sharded(q, k, v, seg):
        with axis_rules(mesh):
            return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, seg)

    with jax.set_mesh(mesh):
        activation = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
        args = [jax.device_put(x, activation) for x in (q, k, v)]
        args.append(jax.device_put(seg, NamedSharding(mesh, P(("data", "fsdp"), None))))
        compiled = jax.jit(sharded).lower(*args).compile()
        got = compiled(*args)
    assert all_gathers(compiled) == []
    shards = batch_shard_count(mesh)
    if impl == "xla_blockwise":  # forward and backward loops: this device's rows × 2 query blocks of 256
        assert loop_trips(compiled) == {B // shards * L // 256}
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, **TOL)


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    config = get_config()
    config.model.text.update(hidden_size=64, mrope_section=(2, 3, 3))
    config.model.vision.update(embed_dim=64, hidden_size=64)
    return model_and_processor(config, str(tmp_path_factory.mktemp("demo")))


def records(n):
    for i in range(n):
        e = make_example(i)
        yield {"messages": to_messages(e), "images": [e["image"]], "id": str(i)}


def sharded_batch(demo_model, shards, batch_size=8, shard_ids=None):
    """A packed training batch of 1024-token rows for `shards` batch shards (images ~112²: 16 per shard)."""
    model_config, processor = demo_model
    data = ConfigDict(get_config().data.to_dict() | dict(
        batch_size=batch_size, shuffle=False, num_epochs=1, workers=0, pack=True, length_buckets=(1024,),
        vision_buckets=(shards * 1024,), min_pixels=112 * 112, max_pixels=112 * 112))
    return next(iter(training_batches(list(records(160)), processor, model_config, data, seed=0, shards=shards,
                                      shard_ids=shard_ids)))


@pytest.mark.parametrize("mesh_spec", MESHES)
def test_train_step_divides_the_work(demo_model, mesh_spec):
    """The whole step (packed ViT per shard, splice, decoder, head on target positions, AdamW) on the mesh: no
    all-gather of anything larger than a parameter, attention loops over local rows, and one device's values."""
    model_config, _ = demo_model
    mesh = make_mesh(mesh_spec)
    shards = batch_shard_count(mesh)
    batch = sharded_batch(demo_model, shards)
    assert batch["input_ids"].shape == (8, 1024) and batch["vision_pixels"].shape[0] == shards
    host = {k: v for k, v in batch.items() if k not in HOST_KEYS}
    optimizer = make_optimizer(1e-3)
    params = init_params(model_config, seed=0)

    want_state, want = jax.jit(functools.partial(train_step, config=model_config, optimizer=optimizer))(
        init_state(params, optimizer), host)
    with jax.set_mesh(mesh):
        s_shardings = state_shardings(model_config, optimizer, mesh)
        state = jax.jit(functools.partial(init_state, optimizer=optimizer), out_shardings=s_shardings)(params)
        device_batch, b_shardings = place_local_batch(host, mesh, local_batch_shards(mesh))
        step = jit_train_step(model_config, optimizer, mesh, s_shardings, b_shardings)
        compiled = step.lower(state, device_batch).compile()
        got_state, got = compiled(state, device_batch)

    largest_param = max(x.size for x in jax.tree_util.tree_leaves(params))
    gathered = float_gathers_larger_than(compiled, largest_param)
    assert not gathered, [(g.op_name, [str(a) for a in g.arrays]) for g in gathered]
    # query-block loops: the decoder's local rows × 4 blocks of 256 and the ViT's own shard × 4 (1024 patches), not
    # the global 8 × 4 and shards × 4
    assert loop_trips(compiled) == {8 // shards * 4, 4}
    for key in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose(got[key], want[key], **TOL)
    for a, b in zip(jax.tree_util.tree_leaves(got_state.params), jax.tree_util.tree_leaves(want_state.params)):
        np.testing.assert_allclose(a, b, **TOL)


def test_each_shard_reads_only_its_records_and_shards_build_alike(demo_model):
    """Shard s takes records s, s + S, …; building shards one at a time (as separate processes do) gives the rows
    of the all-shards batch once the shapes agree."""
    both = sharded_batch(demo_model, 2, batch_size=4)
    ids = both["example_ids"]
    assert all(int(i) % 2 == 0 for row in ids[:2] for i in row) and all(int(i) % 2 == 1 for row in ids[2:] for i in row)
    for s in (0, 1):
        alone = sharded_batch(demo_model, 2, batch_size=4, shard_ids=(s,))
        assert alone["example_ids"] == ids[2 * s:2 * s + 2]
        np.testing.assert_array_equal(alone["vision_pixels"][0], both["vision_pixels"][s])
        length = alone["input_ids"].shape[1]
        np.testing.assert_array_equal(alone["input_ids"], both["input_ids"][2 * s:2 * s + 2, :length])


def test_a_batch_the_mesh_does_not_divide_is_an_error(demo_model):
    model_config, _ = demo_model
    with pytest.raises(ValueError, match="data.batch_size=12 is not a multiple of the 8 batch shards"):
        BatchLayout(rows=12, lengths=(64,), vision_rows=(1024,), pack=False, config=model_config, shards=8)
    with pytest.raises(ValueError, match="data.vision_buckets.*multiples of 32"):
        BatchLayout(rows=8, lengths=(64,), vision_rows=(1000,), pack=False, config=model_config, shards=8)
    mesh = make_mesh("fsdp=8")
    with pytest.raises(ValueError, match="'input_ids' has 12 along its batch dim.*data.batch_size"):
        batch_shardings({"input_ids": np.zeros((12, 64), np.int32)}, mesh)
    q = jnp.zeros((12, 16, 2, 8))
    with jax.set_mesh(mesh), axis_rules(mesh), pytest.raises(ValueError, match="batch of 12 rows.*8 batch shards"):
        jax.jit(lambda q: dot_product_attention(q, q, q, causal=True))(q)

"""sharding.hlo_stats on programs compiled by XLA:TPU for a compile-only v5e 2×4 slice (libtpu, no TPU): FLOPs from
convolution-form dots inside fusions, async collectives counted once, loop trip counts from the loop counter."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding import hlo_stats

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="XLA:TPU compile needs libtpu (pip install -e '.[tpu-plan]')")


@pytest.fixture(scope="module")
def mesh():
    from sharding.topology import tpu_devices

    return Mesh(np.array(tpu_devices("v5e:2x4")), ("x",))


def spec(mesh, shape, *axes, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))


def test_scanned_fsdp_matmuls(mesh):
    """grad of a 6-layer scan of tanh(h @ w), w[6, 256, 256] sharded on its input dim, h[512, 256] on rows: per
    device and layer the forward h[64, 256] @ w[256, 256] and two backward matmuls of the same size, and w's layer
    all-gathered for the forward and again for the backward."""
    layers, rows, width = 6, 512, 256

    def loss(w, x):
        h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)
        return h.sum()

    compiled = jax.jit(jax.grad(loss)).lower(spec(mesh, (layers, width, width), None, "x", None),
                                             spec(mesh, (rows, width), "x", None)).compile()
    text = compiled.as_text()
    assert "convolution(" in text and " dot(" not in text  # XLA:TPU's matmuls are convolutions (in fusions)
    assert [loop.trip_count for loop in hlo_stats.while_loops(compiled)] == [layers, layers]
    flops = hlo_stats.dot_flops(compiled)
    assert flops["flops"] == 3 * layers * 2 * (rows // 8) * width * width and flops["flops_in_unknown_loops"] == 0
    gathers = hlo_stats.all_gathers(compiled)
    assert {str(a) for g in gathers for a in g.arrays} == {f"bf16[1,{width},{width}]"}
    totals = hlo_stats.collective_totals(compiled)
    assert totals["all-gather"]["bytes_per_step"] == 2 * layers * width * width * 2  # forward + backward, bf16
    assert totals["all-gather"]["executions"] == 2 * layers
    assert any(c.is_async for c in hlo_stats.collectives(compiled))  # XLA:TPU overlaps them with the matmuls


def test_one_matmul_and_its_all_reduce(mesh):
    """[512, 1024] @ [1024, 256] contracted over the 8 devices: one local [512, 128] @ [128, 256] and one
    all-reduce of the [512, 256] bf16 result."""
    compiled = jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P())).lower(
        spec(mesh, (512, 1024), None, "x"), spec(mesh, (1024, 256), "x", None)).compile()
    assert hlo_stats.dot_flops(compiled)["flops"] == 2 * 512 * 128 * 256
    (reduce,) = hlo_stats.collectives(compiled)
    assert (reduce.kind, reduce.group, reduce.bytes, reduce.executions) == ("all-reduce", 8, 512 * 256 * 2, 1)


def test_every_collective_kind(mesh):
    def f(x):
        return (jax.lax.psum_scatter(x, "x", tiled=True), jax.lax.all_to_all(x, "x", 0, 0, tiled=True),
                jax.lax.ppermute(x, "x", [(i, (i + 1) % 8) for i in range(8)]),
                jax.lax.all_gather(x, "x", tiled=True), jax.lax.psum(x, "x"))

    fn = jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=(P("x"),) * 3 + (P(), P()), check_vma=False)
    totals = hlo_stats.collective_totals(jax.jit(fn).lower(spec(mesh, (1024, 256), "x", dtype=jnp.float32)).compile())
    local = 128 * 256 * 4
    expected = {"reduce-scatter": local // 8, "all-to-all": local, "collective-permute": local,
                "all-gather": 8 * local, "all-reduce": local}
    assert {kind: (t["count"], t["bytes_per_step"]) for kind, t in totals.items()} == {
        kind: (1, size) for kind, size in expected.items()}

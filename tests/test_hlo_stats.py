"""sharding.hlo_stats: collectives, loops and dot FLOPs read from compiled HLO, on 8 fake CPU devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding import hlo_stats


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))


def spec(mesh, shape, *axes, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*axes)))


def test_parse_shapes_tuples_layouts_and_comments():
    arrays = hlo_stats.parse_arrays("(f32[8,128]{1,0}, (s32[], bf16[<=4,2]{1,0:T(8,128)(2,1)}), pred[3])")
    assert [str(a) for a in arrays] == ["f32[8,128]", "s32[]", "bf16[4,2]", "pred[3]"]
    assert [a.bytes for a in arrays] == [4096, 4, 16, 3]
    module = hlo_stats.parse_hlo("""HloModule m, num_partitions=4
%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}
ENTRY %main (p: f32[16,8]) -> (f32[16,8], f32[2,8]) {
  %p = f32[16,8]{1,0} parameter(0), sharding={devices=[4,1]<=[4]}
  %ar = f32[16,8]{1,0} all-reduce(%p), channel_id=1, replica_groups=[2,2]<=[4], to_apply=%add
  %rs = f32[2,8]{1,0} reduce-scatter(%p), replica_groups={}, dimensions={0}, to_apply=%add
  ROOT %t = (f32[16,8]{1,0}, /*index=1*/f32[2,8]{1,0}) tuple(%ar, %rs)
}""")
    assert module.entry == "main" and module.num_partitions == 4
    assert module.by_name["t"].arrays[1].shape == (2, 8) and module.by_name["t"].operands == ("ar", "rs")
    ar, rs = hlo_stats.collectives(module)
    assert (ar.kind, ar.group, ar.bytes, ar.executions) == ("all-reduce", 2, 512, 1)
    assert (rs.kind, rs.group, rs.bytes, rs.operand_bytes) == ("reduce-scatter", 4, 64, 512)
    assert ar.wire_bytes == 512 and rs.wire_bytes == 3 * 64  # ring: 2(n-1)/n of the array; (n-1) shards


def test_async_pairs_count_once_with_the_done_shape():
    module = hlo_stats.parse_hlo("""HloModule m, num_partitions=8
ENTRY %main (p: bf16[4,64]) -> bf16[32,64] {
  %p = bf16[4,64]{1,0} parameter(0)
  %ags = (bf16[4,64]{1,0}, bf16[32,64]{1,0}) all-gather-start(%p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = bf16[32,64]{1,0} all-gather-done(%ags)
  %cps = (bf16[32,64]{1,0}, bf16[32,64]{1,0}, u32[], u32[]) collective-permute-start(%agd), source_target_pairs={{0,1},{1,0}}
  ROOT %cpd = bf16[32,64]{1,0} collective-permute-done(%cps)
}""")
    gather, permute = hlo_stats.collectives(module)
    assert gather.is_async and gather.kind == "all-gather" and [str(a) for a in gather.arrays] == ["bf16[32,64]"]
    assert gather.bytes == 32 * 64 * 2 and gather.group == 8 and gather.wire_bytes == 7 / 8 * gather.bytes
    assert permute.kind == "collective-permute" and permute.bytes == 4096 and permute.wire_bytes == 4096
    totals = hlo_stats.collective_totals(module)
    assert totals["all-gather"]["count"] == 1 and totals["all-reduce"]["count"] == 0


def test_sharded_contraction_gives_one_all_reduce_of_the_output(mesh):
    a, b = spec(mesh, (64, 128), None, "x"), spec(mesh, (128, 32), "x", None)
    compiled = jax.jit(lambda a, b: a @ b, out_shardings=NamedSharding(mesh, P())).lower(a, b).compile()
    (reduce,) = hlo_stats.collectives(compiled)
    assert (reduce.kind, reduce.group, reduce.executions) == ("all-reduce", 8, 1)
    assert [str(x) for x in reduce.arrays] == ["f32[64,32]"] and reduce.bytes == 64 * 32 * 4
    totals = hlo_stats.collective_totals(compiled)
    assert totals["all-reduce"]["bytes_per_step"] == 8192 and totals["all-gather"]["count"] == 0
    assert hlo_stats.dot_flops(compiled)["flops"] == 2 * 64 * 32 * 16  # the local [64, 16] @ [16, 32]


def test_explicit_all_gather_in_shard_map(mesh):
    gather = jax.shard_map(lambda x: jax.lax.all_gather(x, "x", tiled=True), mesh=mesh, in_specs=P("x"),
                           out_specs=P(), check_vma=False)
    compiled = jax.jit(gather).lower(spec(mesh, (64, 16), "x", dtype=jnp.bfloat16)).compile()
    largest = hlo_stats.largest_all_gather(compiled)
    assert largest.arrays[0].shape == (64, 16) and largest.group == 8  # 8 devices' [8, 16] each
    assert largest.bytes == 64 * 16 * largest.arrays[0].bytes // largest.arrays[0].elements
    assert hlo_stats.all_gathers(compiled, min_elements=64 * 16 + 1) == []
    assert "all_gather" in largest.op_name


def test_reduce_scatter_all_to_all_and_permute_in_shard_map(mesh):
    def f(x):
        return (jax.lax.psum_scatter(x, "x", tiled=True), jax.lax.all_to_all(x, "x", 0, 0, tiled=True),
                jax.lax.ppermute(x, "x", [(i, (i + 1) % 8) for i in range(8)]))

    fn = jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=(P("x"), P("x"), P("x")))
    totals = hlo_stats.collective_totals(jax.jit(fn).lower(spec(mesh, (512, 16), "x")).compile())
    local = 64 * 16 * 4
    assert totals["reduce-scatter"]["count"] == 1 and totals["reduce-scatter"]["bytes"] == local // 8
    assert totals["all-to-all"]["count"] == 1 and totals["all-to-all"]["bytes"] == local
    assert totals["collective-permute"]["bytes"] == local


def test_data_parallel_program_has_no_collectives(mesh):
    w = jax.ShapeDtypeStruct((16, 16), jnp.float32, sharding=NamedSharding(mesh, P()))
    compiled = jax.jit(lambda x, w: jnp.tanh(x @ w)).lower(spec(mesh, (64, 16), "x"), w).compile()
    assert hlo_stats.collectives(compiled) == []
    assert all(t["count"] == 0 for t in hlo_stats.collective_totals(compiled).values())
    assert hlo_stats.largest_all_gather(compiled) is None


def test_scan_loops_trip_counts_and_collectives_inside(mesh):
    """fsdp-style: weights sharded on their input dim, gathered per layer inside the scan (× the trip count)."""
    def loss(w, x):
        h, _ = jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)
        return h.sum()

    w, x = spec(mesh, (6, 128, 128), None, "x", None), spec(mesh, (64, 128), "x", None)
    compiled = jax.jit(jax.grad(loss)).lower(w, x).compile()
    loops = hlo_stats.while_loops(compiled)
    assert [loop.trip_count for loop in loops] == [6, 6] and {loop.depth for loop in loops} == {0}
    # the body slices one layer of the stacked [6, 16, 128] local weight shard and [6, 8, 128] activations
    sliced = {(str(buf), str(piece)) for loop in loops for op, buf, piece in loop.slices if op == "dynamic-slice"}
    assert ("f32[6,16,128]", "f32[1,16,128]") in sliced
    gathers = hlo_stats.all_gathers(compiled)
    assert gathers and all(g.arrays[0].shape == (128, 128) and g.executions == 6 for g in gathers)
    totals = hlo_stats.collective_totals(compiled)
    assert totals["all-gather"]["bytes_per_step"] == 6 * totals["all-gather"]["bytes"]
    # dots run per layer per device: forward h[8, 128] @ w[128, 128], backward two of the same size
    assert hlo_stats.dot_flops(compiled) == {"flops": 3 * 6 * 2 * 8 * 128 * 128, "flops_in_unknown_loops": 0.0}


def test_loop_with_traced_bounds_has_no_trip_count(mesh):
    def f(n, x):
        return jax.lax.fori_loop(0, n, lambda i, h: h @ h, x)

    compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((8, 8), jnp.float32)).compile()
    (loop,) = hlo_stats.while_loops(compiled)
    assert loop.trip_count is None and loop.executions == 1
    assert hlo_stats.dot_flops(compiled) == {"flops": 0.0, "flops_in_unknown_loops": 2 * 8 * 8 * 8}
    np.testing.assert_equal(hlo_stats.collectives(compiled), [])


def test_trip_count_from_the_condition_when_xla_gives_none():
    module = hlo_stats.parse_hlo("""HloModule m, num_partitions=2
%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}
%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %a = f32[] add(%x, %y)
}
%body (q: (s32[], f32[4])) -> (s32[], f32[4]) {
  %q = (s32[], f32[4]{0}) parameter(0)
  %v = f32[4]{0} get-tuple-element(%q), index=1
  %r = f32[4]{0} all-reduce(%v), replica_groups={{0,1}}, to_apply=%add
  %j = s32[] get-tuple-element(%q), index=0
  ROOT %t = (s32[], f32[4]{0}) tuple(%j, %r)
}
ENTRY %main (a: (s32[], f32[4])) -> (s32[], f32[4]) {
  %a = (s32[], f32[4]{0}) parameter(0)
  ROOT %w = (s32[], f32[4]{0}) while(%a), condition=%cond, body=%body, backend_config={"known_init_step":{"init":"2","step":"5"}}
}""")
    (loop,) = hlo_stats.while_loops(module)
    assert loop.trip_count == 2 and loop.body == "body"  # i = 2, 7 (< 12)
    (reduce,) = hlo_stats.collectives(module)
    assert reduce.executions == 2 and hlo_stats.collective_totals(module)["all-reduce"]["bytes_per_step"] == 32

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
    assert hlo_stats.dot_flops(compiled) == {"flops": 3 * 6 * 2 * 8 * 128 * 128, "flops_in_unknown_loops": 0.0,
                                               "kernel_calls": 0, "kernel_flops": 0.0}


def test_loop_with_traced_bounds_has_no_trip_count(mesh):
    def f(n, x):
        return jax.lax.fori_loop(0, n, lambda i, h: h @ h, x)

    compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((8, 8), jnp.float32)).compile()
    (loop,) = hlo_stats.while_loops(compiled)
    assert loop.trip_count is None and loop.executions == 1
    assert hlo_stats.dot_flops(compiled) == {"flops": 0.0, "flops_in_unknown_loops": 2 * 8 * 8 * 8,
                                               "kernel_calls": 0, "kernel_flops": 0.0}
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


# XLA:TPU's dialect, written by hand (no libtpu needed; tests/test_hlo_stats_tpu.py compiles real ones): a scanned
# loop with no trip-count annotation (counter: copy(constant 0) in, add 1 around, compare < 3), an all-gather run as
# an async chain (the same collective, channel 7, in the start, continuation and done fusions), a matmul written as
# a convolution inside a fusion, and a reduce-scatter behind an async-start/async-done wrapper.
TPU_HLO = """HloModule jit_step, is_scheduled=true, num_partitions=4
%ag_start_comp (param_0: bf16[8,64]) -> (bf16[8,64], bf16[32,64], u32[]) {
  %param_0 = bf16[8,64]{1,0:T(8,128)(2,1)} parameter(0)
  %all-gather.1 = bf16[32,64]{1,0:T(8,128)(2,1)} all-gather(%param_0), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}, frontend_attributes={chain_id="0"}
  ROOT %custom-call.1 = (bf16[8,64]{1,0}, bf16[32,64]{1,0}, u32[]{:S(2)}) custom-call(%all-gather.1), custom_call_target="AsyncCollectiveStart"
}
%matmul_comp (param_0.1: bf16[32,64], param_1.1: bf16[16,32]) -> bf16[16,64] {
  %param_1.1 = bf16[16,32]{1,0:T(8,128)(2,1)} parameter(1)
  %param_0.1 = bf16[32,64]{1,0:T(8,128)(2,1)} parameter(0)
  ROOT %convolution.1 = bf16[16,64]{1,0:T(8,128)(2,1)} convolution(%param_1.1, %param_0.1), dim_labels=bf_io->bf, metadata={op_name="jit(step)/dot_general"}
}
%ag_middle_comp (param_0.2: bf16[8,64], param_1.2: bf16[32,64], param_2.2: bf16[16,32]) -> (bf16[32,64], bf16[16,64]) {
  %param_0.2 = bf16[8,64]{1,0} parameter(0)
  %all-gather.2 = bf16[32,64]{1,0:T(8,128)(2,1)} all-gather(%param_0.2), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}, frontend_attributes={chain_id="0"}
  %param_2.2 = bf16[16,32]{1,0} parameter(2)
  %param_1.2 = bf16[32,64]{1,0} parameter(1)
  %fusion.9 = bf16[16,64]{1,0} fusion(%param_1.2, %param_2.2), kind=kOutput, calls=%matmul_comp
  ROOT %tuple.9 = (bf16[32,64]{1,0}, bf16[16,64]{1,0}) tuple(%all-gather.2, %fusion.9)
}
%ag_done_comp (param_0.3: bf16[8,64], param_1.3: bf16[32,64]) -> bf16[32,64] {
  %param_0.3 = bf16[8,64]{1,0} parameter(0)
  %param_1.3 = bf16[32,64]{1,0} parameter(1)
  %all-gather.3 = bf16[32,64]{1,0:T(8,128)(2,1)} all-gather(%param_0.3), channel_id=7, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %custom-call.3 = bf16[32,64]{1,0} custom-call(%param_0.3, %param_1.3, %all-gather.3), custom_call_target="AsyncCollectiveDone"
}
%body (wide.param: (s32[], bf16[8,64], bf16[16,32])) -> (s32[], bf16[8,64], bf16[16,32]) {
  %one = s32[]{:T(128)} constant(1)
  %wide.param = (s32[]{:T(128)}, bf16[8,64]{1,0}, bf16[16,32]{1,0}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%wide.param), index=0
  %i.copy = s32[]{:T(128)S(6)} copy(%i)
  %w = bf16[8,64]{1,0} get-tuple-element(%wide.param), index=1
  %x = bf16[16,32]{1,0} get-tuple-element(%wide.param), index=2
  %start = (bf16[8,64]{1,0}, bf16[32,64]{1,0}, u32[]{:S(2)}) fusion(%w), kind=kCustom, calls=%ag_start_comp
  %gathering = bf16[32,64]{1,0} get-tuple-element(%start), index=1
  %middle = (bf16[32,64]{1,0}, bf16[16,64]{1,0}) fusion(%w, %gathering, %x), kind=kCustom, calls=%ag_middle_comp
  %gathered = bf16[32,64]{1,0} get-tuple-element(%middle), index=0
  %done = bf16[32,64]{1,0} fusion(%w, %gathered), kind=kCustom, calls=%ag_done_comp
  %next = s32[]{:T(128)} add(%i.copy, %one)
  ROOT %t = (s32[]{:T(128)}, bf16[8,64]{1,0}, bf16[16,32]{1,0}) tuple(%next, %w, %x)
}
%cond (wide.param.1: (s32[], bf16[8,64], bf16[16,32])) -> pred[] {
  %three = s32[]{:T(128)} constant(3)
  %wide.param.1 = (s32[]{:T(128)}, bf16[8,64]{1,0}, bf16[16,32]{1,0}) parameter(0)
  %j = s32[]{:T(128)} get-tuple-element(%wide.param.1), index=0
  ROOT %lt = pred[]{:T(512)} compare(%j, %three), direction=LT
}
%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}
%rs_comp (p: f32[64,16]) -> f32[16,16] {
  %p = f32[64,16]{1,0} parameter(0)
  ROOT %rs = f32[16,16]{1,0} reduce-scatter(%p), channel_id=9, replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
}
ENTRY %main (w0: bf16[8,64], x0: bf16[16,32], g: f32[64,16]) -> (s32[], bf16[8,64], bf16[16,32]) {
  %zero = s32[]{:T(128)} constant(0)
  %zero.copy = s32[]{:T(128)} copy(%zero)
  %w0 = bf16[8,64]{1,0} parameter(0)
  %x0 = bf16[16,32]{1,0} parameter(1)
  %g = f32[64,16]{1,0} parameter(2)
  %rs-start = ((f32[64,16]{1,0}), f32[16,16]{1,0}) async-start(%g), calls=%rs_comp
  %rs-done = f32[16,16]{1,0} async-done(%rs-start), calls=%rs_comp
  %init = (s32[]{:T(128)}, bf16[8,64]{1,0}, bf16[16,32]{1,0}) tuple(%zero.copy, %w0, %x0)
  ROOT %loop = (s32[]{:T(128)}, bf16[8,64]{1,0}, bf16[16,32]{1,0}) while(%init), condition=%cond, body=%body
}"""


def test_tpu_dialect_async_chains_convolutions_and_counter_loops():
    module = hlo_stats.parse_hlo(TPU_HLO)
    (loop,) = hlo_stats.while_loops(module)
    assert loop.trip_count == 3 and loop.executions == 1  # i = 0, 1, 2 (< 3), read from the counter
    gather, scatter = sorted(hlo_stats.collectives(module), key=lambda c: c.kind)
    assert (gather.kind, gather.executions, gather.is_async, gather.group) == ("all-gather", 3, True, 4)
    assert [str(a) for a in gather.arrays] == ["bf16[32,64]"]  # the chain's three copies: one collective
    assert (scatter.kind, scatter.executions, scatter.bytes) == ("reduce-scatter", 1, 16 * 16 * 4)  # run once
    totals = hlo_stats.collective_totals(module)
    assert totals["all-gather"]["count"] == 1 and totals["all-gather"]["bytes_per_step"] == 3 * 32 * 64 * 2
    # the convolution-form matmul [16, 32] @ [32, 64] inside the continuation fusion, three times
    assert hlo_stats.dot_flops(module)["flops"] == 3 * 2 * 16 * 64 * 32


def test_multi_line_instructions_keep_the_rest_of_the_computation():
    """A Mosaic kernel's frontend attributes span lines (one starts with '}}'): the computation goes on after it."""
    module = hlo_stats.parse_hlo("""HloModule m, num_partitions=1
ENTRY %main (p: f32[8,8]) -> f32[8,8] {
  %p = f32[8,8]{1,0} parameter(0)
  %k = f32[8,8]{1,0} custom-call(%p), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{}"
}}, metadata={op_name="pallas_call"}
  ROOT %d = f32[8,8]{1,0} dot(%k, %p), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}""")
    assert [i.name for i in module.computations["main"]] == ["p", "k", "d"] and module.root("main").name == "d"
    assert module.by_name["k"].operands == ("p",) and 'op_name="pallas_call"' in module.by_name["k"].attributes
    assert hlo_stats.dot_flops(module)["flops"] == 2 * 8 * 8 * 8 and hlo_stats.dot_flops(module)["kernel_calls"] == 1


def test_convolution_form_matmuls_count_the_taps_that_read_the_input():
    """XLA:TPU's matmuls as convolutions: spatial dims that are size-1 inputs padded to the window read one input
    element per output position (2B's ViT qkv: [2048, 1280] @ [1280, 3·16·80]); a window over a size-2 input with
    no padding contracts it (a batch-as-spatial dim summed over)."""
    module = hlo_stats.parse_hlo("""HloModule m, num_partitions=1
ENTRY %main (x: bf16[2048,1280,1,1], w: bf16[1280,3,16,80], a: bf16[4,2,64], b: bf16[64,2,32]) -> bf16[4,1,32] {
  %x = bf16[2048,1280,1,1]{3,2,1,0} parameter(0)
  %w = bf16[1280,3,16,80]{3,2,1,0} parameter(1)
  %qkv = bf16[2048,3,16,80]{3,2,1,0} convolution(%x, %w), window={size=3x16 pad=2_2x15_15 rhs_reversal=1x1}, dim_labels=bf01_i01o->b01f
  %a = bf16[4,2,64]{2,1,0} parameter(2)
  %b = bf16[64,2,32]{2,1,0} parameter(3)
  ROOT %summed = bf16[4,1,32]{2,1,0} convolution(%a, %b), window={size=2}, dim_labels=b0f_i0o->b0f
}""")
    assert hlo_stats.dot_flops(module)["flops"] == 2 * 2048 * 1280 * 3 * 16 * 80 + 2 * 4 * 32 * 64 * 2

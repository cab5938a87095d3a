"""XLA:TPU compiles the shipped TPU programs: the train step, the Qwen2.5-VL ViT with windows, generation's prefill
and decode, each lowered for abstract inputs (nothing allocated) on the compile-only devices of a v5e 2×4 slice
(`jax.experimental.topologies`: libtpu, no TPU) with the model's `attention="auto"`, and compiled by XLA:TPU + Mosaic.

Configs are the shipped ones (configs/*.py: model dtype, remat, scan, attention) at their real widths and real
vocabularies with fewer layers (1 text layer, 2 ViT blocks; a Qwen2.5-VL ViT keeps one window block and one full
block); scanned layers compile one body whatever the depth. On each compiled HLO text:

- attention is the Pallas splash kernel (`tpu_custom_call`s named splash_mha_fwd / _dq / _dkv, forward and both
  backward kernels in a train step, in the ViT and in the decoder), not the XLA blockwise loop (a while loop of
  unknown trip count); each kernel sees one device's rows (one batch shard's packed ViT sequence, one text row) and
  heads;
- nothing but parameters is all-gathered: no all-gather result has a token-length, cache-length, patch-row or
  merged-row dimension (the shapes below are picked so that no parameter has such a dimension), and in a train step
  every all-gather holds as many elements as a parameter (or one layer of a scanned one, or its tensor-split part).
  Generation gathers per-row vectors only (its vocab-sharded logits, to sample the next token).

XLA:TPU compiles at `exec_time_optimization_effort` −1 (QWEN2VL_TPU_COMPILE_EFFORT=0 for XLA's default): the same
SPMD partitioning, all-gathers and Mosaic kernels, fewer TPU scheduling passes (no async collective fusion); ~5× less
compile time (the 2.5-7B step: 21 instead of 104 CPU seconds on 2 cores). Whole file: ~2 min on 2 shared cores.
Skipped only when libtpu is not installed (`pip install -e '.[tpu-plan]'`)."""
import os

# before libtpu first loads (at collection, so also for the tests that run before these): no cloud metadata server
# to ask, and other processes may hold libtpu's lockfile
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="XLA:TPU compiles need libtpu (pip install -e '.[tpu-plan]')")

TOPOLOGY = "v5e:2x4"
COMPILER_OPTIONS = {"exec_time_optimization_effort": float(os.environ.get("QWEN2VL_TPU_COMPILE_EFFORT", "-1"))}
TEXT_LAYERS, VISION_DEPTH = 1, 2
HEAD_DIM_LANES = 128  # splash pads head_dim (ViT 80) to the 128 lanes


@dataclasses.dataclass(repr=False)
class Program:
    """One compiled program: its parsed HLO (sharding.hlo_stats), the lengths that mark an activation (token rows,
    cache slots, ViT rows per shard, merged rows), and what a kernel should see per device."""
    name: str
    module: object
    lengths: dict
    seconds: dict
    text: str = ""

    def __repr__(self):
        return f"Program({self.name!r})"


def _log(name: str, seconds: dict) -> None:
    print(f"[tpu-compile] {name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))


def _compile(name: str, lowering, lengths: dict) -> Program:
    from sharding import hlo_stats

    start = time.perf_counter()
    lowered = lowering()
    lower_s = time.perf_counter() - start
    start, cpu = time.perf_counter(), time.process_time()
    compiled = lowered.compile(COMPILER_OPTIONS)
    seconds = {"lower": lower_s, "compile": time.perf_counter() - start, "compile CPU": time.process_time() - cpu}
    _log(name, seconds)
    text = compiled.as_text()
    program = Program(name, hlo_stats.parse_hlo(text), lengths, seconds, text)
    program.compiled = compiled
    return program


def shipped_model(config_module: str, preset: str | None = None, **vision):
    """The model config a shipped training config (configs/NAME.py) trains — its preset (or `preset`) with the
    config's dtype / param_dtype / remat / scan_layers / attention — with TEXT_LAYERS text layers and the ViT fields
    `vision` (depth …)."""
    import importlib

    from qwen2vl_jax import Qwen2VLConfig

    c = importlib.import_module(f"configs.{config_module}").get_config()
    model = dict(c.model)
    config = Qwen2VLConfig.preset(preset or model["preset"])
    overrides = {k: model[k] for k in ("dtype", "param_dtype", "remat", "scan_layers", "attention")}
    assert overrides["attention"] == "auto" and overrides["scan_layers"], overrides
    text = dict(model["text"]) | {"num_hidden_layers": TEXT_LAYERS}
    return config.replace(text=dataclasses.replace(config.text, **text),
                          vision=dataclasses.replace(config.vision, **(dict(model["vision"]) | vision)),
                          **overrides), c


# ------------------------------------------------------------------------------------------------ what the HLO holds

@dataclasses.dataclass(frozen=True)
class Kernel:
    kind: str         # "fwd", "dq" or "dkv"
    part: str | None  # "vision" (Qwen2VL.encode_vision), "text" (the decoder) or None (neither)
    executions: int | None  # per run of the program (loops around it: layers, rows per device)
    arrays: tuple     # its result arrays


def kernels(program: Program) -> list[Kernel]:
    """Every Mosaic kernel call (custom-call tpu_custom_call) of the program; a call that is not a splash kernel
    fails the test."""
    from sharding import hlo_stats

    module = program.module
    runs = hlo_stats.executions(module)
    found = []
    for computation, instructions in module.computations.items():
        for i in instructions:
            if i.opcode != "custom-call" or 'custom_call_target="tpu_custom_call"' not in i.attributes:
                continue
            kind = re.search(r"splash_mha_(fwd|dq|dkv)", i.name + " " + i.attributes)
            op_name = re.search(r'op_name="([^"]*)"', i.attributes)
            op_name = op_name.group(1) if op_name else ""
            part = "vision" if "encode_vision" in op_name else "text" if "language_model" in op_name else None
            assert kind, f"{program.name}: a Mosaic kernel other than splash: {i.name} ({op_name})"
            found.append(Kernel(kind.group(1), part, runs.get(computation), i.arrays))
    return found


def kernel_kinds(program: Program) -> set[tuple[str, str]]:
    return {(k.part, k.kind) for k in kernels(program)}


def unknown_trip_loops(program: Program) -> list:
    """While loops whose trip count XLA does not know: the blockwise attention's kv loop (traced bounds) is one."""
    from sharding import hlo_stats

    return [w for w in hlo_stats.while_loops(program.module) if w.trip_count is None]


def activation_gathers(program: Program) -> list:
    """All-gathers whose result has one of the program's activation lengths as a dimension."""
    from sharding import hlo_stats

    lengths = set(program.lengths.values())
    return [g for g in hlo_stats.all_gathers(program.module) if any(set(a.shape) & lengths for a in g.arrays)]


def describe(gathers) -> str:
    return "; ".join(f"{' '.join(map(str, g.arrays))} ({g.op_name})" for g in gathers)


def parameter_sizes(config, mesh) -> set[int]:
    """Element counts an all-gather of a parameter may have: a whole parameter or one layer of a scanned one, or
    either's part on a tensor shard (gathered over fsdp, still split over tensor)."""
    import flax.linen as nn
    import jax

    from qwen2vl_jax.model import abstract_params

    boxed = abstract_params(config)
    sizes = set()
    for leaf in jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        n = math.prod(leaf.value.shape)
        per_layer = n // leaf.value.shape[0] if leaf.names and leaf.names[0] == "layers" else n
        tensor = mesh.shape["tensor"]
        sizes |= {size // d for size in (n, per_layer) for d in range(1, tensor + 1) if tensor % d == 0}
    return sizes


def check_lengths_are_not_parameter_dims(config, lengths: dict) -> None:
    """The activation lengths must not be dimensions of a parameter, or a parameter's all-gather would be taken for
    an activation's."""
    import flax.linen as nn
    import jax

    from qwen2vl_jax.model import abstract_params

    dims = {d for x in jax.tree_util.tree_leaves(nn.unbox(abstract_params(config))) for d in x.shape}
    assert not dims & set(lengths.values()), (lengths, sorted(dims & set(lengths.values())))


# ------------------------------------------------------------------------------------------------------- the programs

@pytest.fixture(scope="module")
def devices():
    from sharding.topology import tpu_devices  # sets libtpu's environment for compile-only use

    found = tpu_devices(TOPOLOGY)
    assert len(found) == 8 and all(d.platform == "tpu" for d in found)
    return found


def compile_train_step(name, config, mesh_spec, devices, batch, seq, patches_per_sample) -> Program:
    """training/step.py's jit_train_step as sharding/plan.py's plan() lowers it: state and batch as sharded
    ShapeDtypeStructs (sharding.plan.abstract_batch: one packed ViT sequence per batch shard)."""
    import flax.linen as nn
    import jax

    from qwen2vl_jax.model import abstract_params
    from sharding.mesh import make_mesh
    from sharding.plan import abstract_batch
    from sharding.rules import batch_shard_count, batch_shardings
    from training.step import TrainState, init_state, jit_train_step, make_optimizer, state_shardings

    mesh = make_mesh(mesh_spec, devices=devices)
    optimizer = make_optimizer(1e-5, warmup_steps=10, total_steps=1000)
    shardings = state_shardings(config, optimizer, mesh)
    place = lambda tree, s: jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                                   tree, s)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), nn.unbox(abstract_params(config)))
    state = TrainState(*(place(getattr(state, f.name), getattr(shardings, f.name))
                         for f in dataclasses.fields(TrainState)))
    shards = batch_shard_count(mesh)
    batch = abstract_batch(config, batch, seq, patches_per_sample, shards)
    batch_sharding = batch_shardings(batch, mesh)
    batch = place(batch, batch_sharding)
    rows = batch["vision_pixels"].shape[1]
    lengths = {"tokens": seq, "vit_rows": rows, "merged_rows": rows // config.vision.spatial_merge_size ** 2}
    check_lengths_are_not_parameter_dims(config, lengths)
    step = jit_train_step(config, optimizer, mesh, shardings, batch_sharding)
    with jax.set_mesh(mesh):
        program = _compile(name, lambda: step.lower(state, batch), lengths)
    program.config, program.mesh = config, mesh
    program.rows_per_device = batch["input_ids"].shape[0] // shards
    program.loss_positions = batch["loss_index"].shape[1]  # the LM head runs there (abstract_batch: seq / 8)
    return program


@pytest.fixture(scope="module")
def train_2b_fsdp(devices):
    """configs/qwen2vl_2b_v5e8.py's step on its own mesh (fsdp=8): 8 rows × 1024 tokens, one 448² image (1024 ViT
    rows) per row, so each shard packs 1024 ViT rows."""
    config, c = shipped_model("qwen2vl_2b_v5e8", depth=VISION_DEPTH)
    assert c.mesh == "fsdp=8"
    return compile_train_step("train 2B fsdp=8", config, c.mesh, devices, batch=8, seq=1024, patches_per_sample=1024)


@pytest.fixture(scope="module")
def train_2_5_windows(devices):
    """configs/qwen2_5vl_7b_v5p8.py's model (Qwen2.5-VL-7B: window attention in the ViT) on data=2,fsdp=2,tensor=2:
    ViT blocks 0 (windows) and 1 (full); 8 rows × 1024 tokens with 512 ViT rows each, 1024 per batch shard."""
    config, _ = shipped_model("qwen2_5vl_7b_v5p8", depth=VISION_DEPTH, fullatt_block_indexes=(1,))
    assert config.vision.windowed and config.vision.full_attention_blocks == (False, True)
    return compile_train_step("train 2.5-7B data=2,fsdp=2,tensor=2", config, "data=2,fsdp=2,tensor=2", devices,
                              batch=8, seq=1024, patches_per_sample=512)


@pytest.fixture(scope="module")
def generation(devices):
    """qwen2vl_jax.decoding.programs (prefill, decode) as sharding/plan_generate.py lowers them (abstract_calls, the
    generation rules: tensor-parallel params, the batch over fsdp; decode's cache and state in the shardings the
    compiled prefill returns): Qwen2-VL-2B in bf16 on fsdp=4,tensor=2, 8 prompts of ≤ 1024 tokens with 256 ViT rows
    each, 512 new tokens → buckets batch 8, length 1024, cache 2048, 1024 ViT rows per shard."""
    import flax.linen as nn
    import jax

    from qwen2vl_jax.buckets import Ladders, shapes_for
    from qwen2vl_jax.decoding import programs
    from sharding.mesh import make_mesh
    from sharding.plan_generate import decode_arguments, prefill_arguments
    from sharding.rules import GENERATION_RULES, batch_shard_count, generation_rules

    config, _ = shipped_model("qwen2vl_2b_v5e8", depth=VISION_DEPTH)
    config = config.replace(dtype="bfloat16", param_dtype="bfloat16")
    mesh = make_mesh("fsdp=4,tensor=2", devices=devices)
    shards = batch_shard_count(mesh, GENERATION_RULES)
    batch, seq, patches, new_tokens = 8, 1000, 256, 512
    shapes = shapes_for(Ladders(), batch, seq, -(-batch * patches // shards), new_tokens, shards)
    assert (shapes.batch, shapes.length, shapes.cache, shapes.vision_rows) == (8, 1024, 2048, 1024)
    lengths = {"tokens": shapes.length, "cache": shapes.cache, "vit_rows": shapes.vision_rows,
               "merged_rows": shapes.vision_rows // config.vision.spatial_merge_size ** 2}
    check_lengths_are_not_parameter_dims(config, lengths)
    calls, params, inputs, controls = prefill_arguments(config, mesh, shapes, shards)
    with generation_rules(mesh):
        prefill, decode = programs(config, tuple(nn.get_logical_axis_rules()), jax.sharding.get_abstract_mesh())
        compiled_prefill = _compile("prefill 2B fsdp=4,tensor=2", lambda: prefill.lower(
            params, inputs, controls, cache_length=shapes.cache), lengths)
        cache, state = decode_arguments(calls, compiled_prefill.compiled.output_shardings, mesh)
        cache_s = compiled_prefill.compiled.output_shardings[1]
        compiled_decode = _compile("decode 2B fsdp=4,tensor=2", lambda: decode.lower(params, cache, state, controls),
                                   lengths)
    for program in (compiled_prefill, compiled_decode):
        program.config, program.mesh, program.rows_per_device = config, mesh, shapes.batch // shards
    return {"prefill": compiled_prefill, "decode": compiled_decode, "cache_shardings": cache_s, "shapes": shapes}


# ---------------------------------------------------------------------------------------------------------- the tests

def test_detectors_tell_splash_from_the_blockwise_loop(devices):
    """The checks below can fail: on the same mesh, attention="xla" compiles to the blockwise while loop (unknown
    trip count) and no kernel, "auto" to the splash forward kernel and no such loop; an attention output gathered
    off its batch shards is an activation all-gather."""
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax.attention import dot_product_attention
    from sharding.mesh import make_mesh
    from sharding.rules import axis_rules

    mesh = make_mesh("fsdp=8", devices=devices)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    q = jax.ShapeDtypeStruct((8, 1024, 2, 128), jnp.bfloat16, sharding=spec)
    seg = jax.ShapeDtypeStruct((8, 1024), jnp.int32, sharding=spec)
    found = {}
    for implementation in ("xla", "auto"):
        def f(q, seg):
            with axis_rules(mesh):
                out = dot_product_attention(q, q, q, segment_ids=seg, causal=True, implementation=implementation)
                return out.astype(jnp.float32).sum()
        with jax.set_mesh(mesh):
            program = _compile(f"attention {implementation}", lambda: jax.jit(f).lower(q, seg), {"tokens": 1024})
        found[implementation] = (kernel_kinds(program), len(unknown_trip_loops(program)))
        assert not activation_gathers(program), describe(activation_gathers(program))
    assert found["xla"][0] == set() and found["xla"][1] >= 1, found
    assert found["auto"] == ({(None, "fwd")}, 0), found

    def gathered(q, seg):  # the output replicated: every device needs all rows
        with axis_rules(mesh):
            out = dot_product_attention(q, q, q, segment_ids=seg, causal=True)
        return jax.lax.with_sharding_constraint(out, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    with jax.set_mesh(mesh):
        program = _compile("attention, output gathered", lambda: jax.jit(gathered).lower(q, seg), {"tokens": 1024})
    assert [g.arrays[0].shape for g in activation_gathers(program)] == [(8, 1024, 2, 128)]


def check_train_step(program: Program) -> None:
    config, mesh = program.config, program.mesh
    tensor = mesh.shape["tensor"]
    found = kernels(program)
    # splash everywhere attention runs: forward and both backward kernels, in the ViT and in the decoder
    assert {(k.part, k.kind) for k in found} == {(p, k) for p in ("vision", "text") for k in ("fwd", "dq", "dkv")}
    assert not unknown_trip_loops(program), "an XLA loop of unknown trip count (blockwise attention?)"
    # per device: one batch shard's packed ViT rows (16 heads / tensor), one text row of `seq` tokens
    for k in found:
        rows, heads = ((program.lengths["vit_rows"], config.vision.num_heads) if k.part == "vision" else
                       (program.lengths["tokens"], config.text.num_key_value_heads if k.kind == "dkv"
                        else config.text.num_attention_heads))  # dkv returns the (GQA) kv heads' gradients
        blocks = {a.shape for a in k.arrays if len(a.shape) == 3 and a.shape[-1] == HEAD_DIM_LANES}
        assert blocks and {s[1] for s in blocks} == {rows}, (k, rows)
        assert max(s[0] for s in blocks) == heads // tensor, (k, heads, tensor)
        # the ViT kernel runs once per block (both blocks of a Qwen2.5 ViT: window and full), the decoder's once per
        # layer and local row
        expected = ({VISION_DEPTH} if k.part == "vision"
                    else {TEXT_LAYERS, TEXT_LAYERS * program.rows_per_device})
        assert k.executions in expected, (k, expected)
    # nothing but parameters is all-gathered
    assert not activation_gathers(program), describe(activation_gathers(program))
    from sharding import hlo_stats

    sizes = parameter_sizes(config, mesh)
    others = [g for g in hlo_stats.all_gathers(program.module) if any(a.elements not in sizes for a in g.arrays)]
    others = [g for g in others if g not in head_gradient_gathers(program, others)]
    assert not others, describe(others)


def head_gradient_gathers(program: Program, gathers: list) -> list:
    """Of `gathers`, those of the LM head's logits gradient [rows, loss positions, vocab / tensor] in the head's
    backward. XLA:TPU gathers it over the batch shards to form the head weight's gradient shard when that is cheaper
    than reduce-scattering the weight gradient's partial sums [embed, vocab / tensor] — few rows per device, as in
    these tests (2.5-7B, data=2,fsdp=2,tensor=2, 8 × 128 positions: 39 M elements gathered vs 272 M reduced); at 64
    rows it reduce-scatters instead. Allowed only while it is the smaller of the two."""
    t, tensor = program.config.text, program.mesh.shape["tensor"]
    partials = t.hidden_size * t.vocab_size // tensor
    return [g for g in gathers if "lm_head" in g.op_name and all(
        len(a.shape) == 3 and a.shape[1:] == (program.loss_positions, t.vocab_size // tensor) and a.elements < partials
        for a in g.arrays)]


def test_train_step_2b_fsdp(train_2b_fsdp):
    check_train_step(train_2b_fsdp)
    from sharding import hlo_stats

    # fsdp=8: the weights are gathered (the step's only all-gathers)
    assert hlo_stats.all_gathers(train_2b_fsdp.module)


def test_train_step_2_5_vit_windows_data_fsdp_tensor(train_2_5_windows):
    check_train_step(train_2_5_windows)


def test_prefill(generation):
    program = generation["prefill"]
    found = kernels(program)
    assert {(k.part, k.kind) for k in found} == {("vision", "fwd"), ("text", "fwd")}
    assert not unknown_trip_loops(program)
    for k in found:
        rows = program.lengths["vit_rows"] if k.part == "vision" else program.lengths["tokens"]
        assert {a.shape[1] for a in k.arrays if len(a.shape) == 3 and a.shape[-1] == HEAD_DIM_LANES} == {rows}, k
    check_generation_gathers(program)


def test_decode(generation):
    """Cached attention is plain einsums: no kernel, and no loop inside the token loop (the only while loop, of
    unknown trip count: it stops when every row is done). The KV cache stays split over the batch and the KV heads."""
    from sharding import hlo_stats

    program = generation["decode"]
    assert kernels(program) == []
    loops = hlo_stats.while_loops(program.module)
    assert [(w.trip_count, w.depth) for w in loops] == [(None, 0)], loops
    check_generation_gathers(program)
    import jax

    specs = {tuple(s.spec) for s in jax.tree_util.tree_leaves(generation["cache_shardings"])}
    assert specs == {(None, "fsdp", "tensor")}, specs  # [layers, B, Hkv, C, hd]


def check_generation_gathers(program: Program) -> None:
    """No activation (token rows, cache, ViT rows) is all-gathered; what is gathered is at most one vocab-long
    vector per local row (the tensor-split logits the sampler reads)."""
    from sharding import hlo_stats

    assert not activation_gathers(program), describe(activation_gathers(program))
    bound = program.rows_per_device * program.config.text.vocab_size
    large = [g for g in hlo_stats.all_gathers(program.module) if any(a.elements > bound for a in g.arrays)]
    assert not large, describe(large)

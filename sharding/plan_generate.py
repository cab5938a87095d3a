"""Will generation fit? The AOT per-device memory of both generation programs, computed on this machine.

    python -m sharding.plan --generate --preset 7b --mesh tensor=4 --batch 32 --seq 4096 --hbm v5e
    python -m sharding.plan --generate --preset 7b --mesh tensor=4 --batch 32 --seq 4096 --topology v5e:2x2

Lowers and compiles `qwen2vl_jax.generation.programs` — prefill (ViT + splice + decoder over the prompt + first
token + KV cache) and decode (the on-device `while_loop`, cache donated) — for abstract arguments
(`generation.abstract_calls`: jax.ShapeDtypeStruct, nothing allocated) inside `sharding.rules.generation_rules`:
params placed by GENERATION_RULES (tensor-parallel, not split over fsdp), the batch over the mesh axes the rules give
"batch", attention per device. Decode's cache and state take the shardings the compiled prefill returns them with,
as at run time. Shapes are the ladder buckets (`qwen2vl_jax.buckets.shapes_for`) that `batch` prompts of `seq`
tokens holding `patches_per_sample` ViT rows each, with `max_new_tokens`, run with.

Two compilers (sharding/topology.py, as for the train plan): XLA:TPU for a compile-only TPU slice, from libtpu
(`pip install -e '.[tpu-plan]'`) on a machine without a TPU — `--topology v5e:2x2` (any name
`jax.experimental.topologies` knows: v5e:2x4, v5p:2x2x2, …), or by default when `--chip`/`--hbm` names a TPU and
libtpu imports (the compact slice of the mesh's device count) — else XLA:CPU on as many fake CPU devices as the mesh
has (`--compiler cpu` forces it). XLA:CPU has no bfloat16 matmul, so it keeps float32 copies of bf16 weights and of
the KV cache among its temporaries: a bf16 plan's CPU temporaries overstate the TPU's (7B on tensor=4: prefill 14.2
vs 4.0 GB, decode 15.5 vs 0.02 GB); the report's first line names the compiler.

Per program: XLA's argument, output, alias and temporary bytes per device and its peak = arguments + outputs −
aliased + temporaries; "resident" adds what stays on the device meanwhile that the program does not read (decode:
the ViT's params, and the prefill inputs generate() still holds). Beside them the analytic numbers a reader can check:
params per device (from their shardings; ideal = params · itemsize / tensor) and the KV cache per device =
2 · layers · B · Hkv · C · hd · itemsize / (batch shards · tensor shards of Hkv)."""
from __future__ import annotations

import math
import time

from sharding.topology import plan_devices


def analytic_cache_bytes(config, batch: int, cache: int, mesh_shape: dict, batch_shards: int) -> dict:
    """KV cache bytes (global and per device) of `batch` rows × `cache` slots: k and v, [layers, B, Hkv, C, hd] in
    the compute dtype, split over the batch shards and over `tensor` where it divides Hkv."""
    from sharding.plan import _itemsize

    t = config.text
    tensor = mesh_shape.get("tensor", 1)
    heads_split = tensor if t.num_key_value_heads % tensor == 0 else 1
    total = 2 * t.num_hidden_layers * batch * t.num_key_value_heads * cache * t.head_dim * _itemsize(config.dtype)
    return {"total": total, "per_device": total / (batch_shards * heads_split), "heads_split": heads_split}


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    out = {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def _place(tree, shardings):
    """ShapeDtypeStructs of `tree` with the matching `shardings`."""
    import jax

    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _replicated(tree, device_mesh):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return _place(tree, jax.tree_util.tree_map(lambda _: NamedSharding(device_mesh, PartitionSpec()), tree))


def prefill_arguments(config, device_mesh, shapes, shards: int):
    """→ (`decoding.abstract_calls`' dict, params, inputs, controls): prefill's abstract arguments, sharded as
    generation places them (GENERATION_RULES: tensor-parallel params, the batch over the rules' batch axes)."""
    import flax.linen as nn

    from qwen2vl_jax.decoding import abstract_calls
    from qwen2vl_jax.model import abstract_params
    from sharding.rules import GENERATION_RULES, batch_shardings, param_shardings

    calls = abstract_calls(config, shapes, shards)
    params = _place(nn.unbox(abstract_params(config)), param_shardings(config, device_mesh, GENERATION_RULES))
    inputs = _place(calls["inputs"], batch_shardings(calls["inputs"], device_mesh, GENERATION_RULES))
    return calls, params, inputs, _replicated(calls["controls"], device_mesh)


def decode_arguments(calls: dict, prefill_output_shardings, device_mesh):
    """→ (cache, state): decode's abstract arguments, sharded as the compiled prefill returns them (token, cache,
    kv_valid, seen), the rest of the state by batch row or replicated."""
    from jax.sharding import NamedSharding

    from sharding.rules import GENERATION_RULES, spec_for

    token_s, cache_s, kv_valid_s, seen_s = prefill_output_shardings
    rows = calls["state"]["done"].shape[0]
    by_batch = NamedSharding(device_mesh, spec_for((rows,), ("batch",), device_mesh, GENERATION_RULES))
    s = calls["state"]
    state = dict(token=_place(s["token"], token_s), done=_place(s["done"], by_batch),
                 kv_valid=_place(s["kv_valid"], kv_valid_s), seen=_place(s["seen"], seen_s),
                 start=_replicated(s["start"], device_mesh), next_position=_place(s["next_position"], by_batch))
    return _place(calls["cache"], cache_s), state


def plan_generate(preset: str, mesh: str, batch: int, seq: int, *, max_new_tokens: int = 512,
                  patches_per_sample: int = 1024, dtype: str = "bfloat16", dcn: str | None = None, config=None,
                  attention: str | None = None, ladders=None, topology: str | None = None,
                  compile: bool = True, compiler_options: dict | None = None) -> dict:
    """The generation plan as a dict of byte counts and timings (see the module docstring). Params and compute in
    `dtype`; `config` overrides the preset (e.g. fewer layers); `topology` compiles for that TPU slice;
    `compiler_options` go to XLA as they are (tests pass {"exec_time_optimization_effort": -1} for a faster
    XLA:TPU compile)."""
    import flax.linen as nn
    import jax

    from qwen2vl_jax import Qwen2VLConfig
    from qwen2vl_jax.buckets import Ladders, shapes_for
    from qwen2vl_jax.decoding import programs
    from sharding.mesh import make_mesh
    from sharding.plan import _bytes, _itemsize, analytic_param_count
    from sharding.rules import GENERATION_RULES, batch_shard_count, generation_rules

    config = (config or Qwen2VLConfig.preset(preset)).replace(scan_layers=True, dtype=dtype, param_dtype=dtype)
    config = config.replace(attention=attention) if attention else config
    device_mesh = make_mesh(mesh, dcn=dcn, devices=plan_devices(topology, dcn))
    shards = batch_shard_count(device_mesh, GENERATION_RULES)
    shapes = shapes_for(ladders or Ladders(), batch, seq, -(-batch * patches_per_sample // shards), max_new_tokens,
                        shards)
    calls, params, inputs, controls = prefill_arguments(config, device_mesh, shapes, shards)
    t = config.text
    param_count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    out = {"preset": preset, "mesh": dict(device_mesh.shape), "devices": device_mesh.size,
           "compiler": f"XLA:TPU {topology}" if topology else "XLA:CPU", "batch": batch, "seq": seq,
           "max_new_tokens": max_new_tokens, "patches_per_sample": patches_per_sample, "dtype": dtype,
           "attention": config.attention, "batch_shards": shards, "layers": t.num_hidden_layers,
           "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
           "shapes": {"batch": shapes.batch, "length": shapes.length, "cache": shapes.cache,
                      "vision_rows_per_shard": shapes.vision_rows},
           "param_count": param_count, "analytic_param_count": analytic_param_count(config)}
    out["params_bytes"], out["params_per_device"] = _bytes(params)
    out["analytic_params_per_device"] = param_count * _itemsize(dtype) / device_mesh.shape.get("tensor", 1)
    out["inputs_per_device"], out["controls_bytes"] = _bytes(inputs)[1], _bytes(controls)[1]
    out["analytic_cache"] = analytic_cache_bytes(config, shapes.batch, shapes.cache, dict(device_mesh.shape), shards)
    if not compile:
        return out
    with generation_rules(device_mesh):
        prefill, decode = programs(config, tuple(nn.get_logical_axis_rules()), jax.sharding.get_abstract_mesh())
        start = time.perf_counter()
        compiled_prefill = prefill.lower(params, inputs, controls, cache_length=shapes.cache).compile(compiler_options)
        out["prefill_seconds"] = time.perf_counter() - start
        cache, state = decode_arguments(calls, compiled_prefill.output_shardings, device_mesh)
        start = time.perf_counter()
        compiled_decode = decode.lower(params, cache, state, controls).compile(compiler_options)
        out["decode_seconds"] = time.perf_counter() - start
    out["cache_per_device"], out["state_per_device"] = _bytes(cache)[1], _bytes(state)[1]
    out["cache_specs"] = sorted({str(x.sharding.spec) for x in jax.tree_util.tree_leaves(cache)})
    out["prefill"], out["decode"] = _memory(compiled_prefill), _memory(compiled_decode)
    # resident while each program runs: all params (XLA counts those the program reads: decode skips the ViT's),
    # its other arguments, outputs and temporaries; during decode generate() still holds the prefill inputs
    held = {"prefill": out["params_per_device"] + out["inputs_per_device"] + out["controls_bytes"],
            "decode": out["params_per_device"] + out["cache_per_device"] + out["state_per_device"]
            + out["controls_bytes"] + out["inputs_per_device"]}
    for name, resident in held.items():
        m = out[name]
        m["resident_peak"] = resident + m["outputs"] - m["aliased"] + m["temporaries"]
    out["peak_per_device"] = max(out["prefill"]["resident_peak"], out["decode"]["resident_peak"])
    out["params_cache_max_temp"] = (out["params_per_device"] + out["cache_per_device"]
                                    + max(out["prefill"]["temporaries"], out["decode"]["temporaries"]))
    return out


def report(result: dict, hbm: float | None) -> str:
    gb = lambda x: f"{x / 1e9:9.3f} GB"
    s, a = result["shapes"], result["analytic_cache"]
    lines = [f"generation plan ({result['compiler']}): {result['preset']} ({result['layers']} layers, "
             f"{result['kv_heads']} KV heads × {result['head_dim']}), {result['param_count'] / 1e9:.3f} B params in "
             f"{result['dtype']}, attention {result['attention']}, mesh {result['mesh']} = {result['devices']} "
             f"devices ({result['batch_shards']} batch shards)",
             f"request: batch {result['batch']} × seq {result['seq']} + {result['patches_per_sample']} "
             f"patches/sample, max_new_tokens {result['max_new_tokens']} → buckets batch {s['batch']}, length "
             f"{s['length']}, cache {s['cache']} slots, {s['vision_rows_per_shard']} ViT rows per shard",
             f"{'per device':<16}{'plan':>12}{'analytic':>13}",
             f"{'parameters':<16}{gb(result['params_per_device'])}{gb(result['analytic_params_per_device'])}"
             f"  (analytic: all params / tensor; norms, biases and undivided dims are replicated)",
             f"{'KV cache':<16}{gb(result.get('cache_per_device', a['per_device']))}{gb(a['per_device'])}  "
             f"(2·{result['layers']}·{s['batch']}·{result['kv_heads']}·{s['cache']}·{result['head_dim']}·itemsize"
             f" / ({result['batch_shards']}·{a['heads_split']}); specs {', '.join(result.get('cache_specs', ['?']))})",
             f"{'prefill inputs':<16}{gb(result['inputs_per_device'])}"]
    if "prefill" in result:
        lines.append(f"{'XLA memory':<16}{'arguments':>12}{'outputs':>12}{'aliased':>12}{'temporaries':>12}"
                     f"{'XLA peak':>12}{'resident':>12}{'compile':>9}")
        for name in ("prefill", "decode"):
            m = result[name]
            lines.append(f"{name:<16}" + "".join(gb(m[k]) for k in ("arguments", "outputs", "aliased", "temporaries",
                                                                     "peak", "resident_peak"))
                         + f"{result[name + '_seconds']:>7.1f} s")
        lines += ["  XLA peak = arguments + outputs − aliased + temporaries (only the arguments a program reads: "
                  "decode skips the ViT's params); resident = that + all params + (decode) the prefill inputs "
                  "generate() still holds",
                  f"peak per device: {result['peak_per_device'] / 1e9:.3f} GB (params + cache + max(temp) = "
                  f"{result['params_cache_max_temp'] / 1e9:.3f} GB)"]
        if result["compiler"] == "XLA:CPU" and result["dtype"] == "bfloat16":
            lines.append("  XLA:CPU keeps float32 copies of bf16 weights and cache in its temporaries (no bf16 "
                         "matmul): an upper bound; --topology (libtpu) gives XLA:TPU's numbers")
        if hbm:
            verdict = "fits" if result["peak_per_device"] <= hbm else "does NOT fit"
            lines.append(f"HBM {hbm / 1e9:.0f} GB per device: {verdict} "
                         f"({100 * result['peak_per_device'] / hbm:.0f} % used)")
    return "\n".join(lines)


def run(args, hbm: float | None, compiler=None) -> dict:
    """`python -m sharding.plan --generate ...` (plan.main's parsed args; `compiler`: its sharding.topology.Compiler,
    whose topology is args.topology)."""
    from sharding.plan import _config, compiler_lines, model_attention

    start = time.perf_counter()
    result = plan_generate(args.preset, args.mesh, args.batch, args.seq, max_new_tokens=args.max_new_tokens,
                           patches_per_sample=args.patches_per_sample, dtype=args.dtype, dcn=args.dcn,
                           config=_config(args.preset, args.text_layers), attention=model_attention(args.attention),
                           topology=args.topology)
    result["planner_seconds"] = time.perf_counter() - start
    result["hbm"] = hbm
    result["compiler_reason"] = compiler.reason if compiler else ""
    print("\n".join(compiler_lines(result)))
    print(report(result, hbm))
    print(f"planner run time {result['planner_seconds']:.1f} s")
    return result

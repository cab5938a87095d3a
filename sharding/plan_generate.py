"""Will generation fit? The AOT per-device memory of both generation programs, computed on this machine.

    python -m sharding.plan --generate --preset 7b --mesh tensor=4 --batch 32 --seq 4096 --hbm v5e

Lowers and compiles `qwen2vl_jax.generation.programs` — prefill (ViT + splice + decoder over the prompt + first
token + KV cache) and decode (the on-device `while_loop`, cache donated) — for abstract arguments
(`generation.abstract_calls`: jax.ShapeDtypeStruct, nothing allocated) on as many fake CPU devices as the mesh has,
inside `sharding.rules.generation_rules(mesh)`: params placed by GENERATION_RULES (tensor-parallel, not split over
fsdp), the batch over the mesh axes the rules give "batch", attention per device. Decode's cache and state take the
shardings the compiled prefill returns them with, as they do at run time.

Shapes are the ladder buckets (`qwen2vl_jax.buckets.shapes_for`) a call of `batch` prompts of `seq` tokens holding
`patches_per_sample` ViT rows each, with `max_new_tokens`, runs with. Per program: XLA's argument, output, alias and
temporary bytes per device, and the peak = arguments + outputs − aliased + temporaries; beside them the analytic
numbers a reader can check: params per device (from their shardings; ideal = params · itemsize / tensor) and the KV
cache per device = 2 · layers · B · Hkv · C · hd · itemsize / (batch shards · tensor shards of Hkv). XLA:CPU's
buffer assignment differs from XLA:TPU's, so temporaries estimate the same program rather than measure a TPU."""
from __future__ import annotations

import math
import time


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
           "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes,
           "code": m.generated_code_size_in_bytes}
    out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
    return out


def plan_generate(preset: str, mesh: str, batch: int, seq: int, *, max_new_tokens: int = 512,
                  patches_per_sample: int = 1024, dtype: str = "bfloat16", dcn: str | None = None, config=None,
                  ladders=None, compile: bool = True, devices=None) -> dict:
    """The generation plan as a dict of byte counts and timings (see the module docstring). Params and compute in
    `dtype`; `config` overrides the preset (e.g. fewer layers)."""
    import flax.linen as nn
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from qwen2vl_jax import Qwen2VLConfig
    from qwen2vl_jax.buckets import Ladders, shapes_for
    from qwen2vl_jax.generation import abstract_calls, programs
    from qwen2vl_jax.model import abstract_params
    from sharding.mesh import make_mesh
    from sharding.plan import _bytes, _itemsize, analytic_param_count
    from sharding.rules import (GENERATION_RULES, batch_shard_count, batch_shardings, generation_rules,
                                param_shardings, spec_for)

    config = (config or Qwen2VLConfig.preset(preset)).replace(scan_layers=True, dtype=dtype, param_dtype=dtype)
    device_mesh = make_mesh(mesh, dcn=dcn, devices=devices)
    shards = batch_shard_count(device_mesh, GENERATION_RULES)
    if batch % shards or (batch * patches_per_sample) % shards:
        raise ValueError(f"batch {batch} (and its ViT rows) must split over the {shards} batch shards")
    shapes = shapes_for(ladders or Ladders(), batch, seq, batch * patches_per_sample // shards, max_new_tokens,
                        shards)
    calls = abstract_calls(config, shapes, shards)
    place = lambda tree, shardings: jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    replicated = lambda tree: place(tree, jax.tree_util.tree_map(
        lambda _: NamedSharding(device_mesh, PartitionSpec()), tree))
    params = place(nn.unbox(abstract_params(config)), param_shardings(config, device_mesh, GENERATION_RULES))
    inputs = place(calls["inputs"], batch_shardings(calls["inputs"], device_mesh, GENERATION_RULES))
    controls = replicated(calls["controls"])
    t = config.text
    param_count = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params))
    cache = analytic_cache_bytes(config, shapes.batch, shapes.cache, dict(device_mesh.shape), shards)
    out = {"preset": preset, "mesh": dict(device_mesh.shape), "devices": device_mesh.size, "batch": batch,
           "seq": seq, "max_new_tokens": max_new_tokens, "patches_per_sample": patches_per_sample, "dtype": dtype,
           "shapes": {"batch": shapes.batch, "length": shapes.length, "cache": shapes.cache,
                      "vision_rows_per_shard": shapes.vision_rows},
           "batch_shards": shards, "layers": t.num_hidden_layers, "kv_heads": t.num_key_value_heads,
           "head_dim": t.head_dim, "param_count": param_count, "analytic_param_count": analytic_param_count(config)}
    out["params_bytes"], out["params_per_device"] = _bytes(params)
    out["analytic_params_per_device"] = param_count * _itemsize(dtype) / device_mesh.shape.get("tensor", 1)
    out["inputs_per_device"] = _bytes(inputs)[1]
    out["controls_bytes"] = _bytes(controls)[1]
    out["analytic_cache"] = cache
    if not compile:
        return out
    with generation_rules(device_mesh):
        prefill, decode = programs(config, tuple(nn.get_logical_axis_rules()), jax.sharding.get_abstract_mesh())
        start = time.perf_counter()
        compiled_prefill = prefill.lower(params, inputs, controls, cache_length=shapes.cache).compile()
        out["prefill_seconds"] = time.perf_counter() - start
        # decode's arguments, sharded as the compiled prefill returns them (token, cache, kv_valid, seen)
        token_s, cache_s, kv_valid_s, seen_s = compiled_prefill.output_shardings
        batch_spec = spec_for((shapes.batch,), ("batch",), device_mesh, GENERATION_RULES)
        by_batch = NamedSharding(device_mesh, batch_spec)
        state = calls["state"]
        state = dict(token=place(state["token"], token_s), done=place(state["done"], by_batch),
                     kv_valid=place(state["kv_valid"], kv_valid_s), seen=place(state["seen"], seen_s),
                     start=replicated(state["start"]), next_position=place(state["next_position"], by_batch))
        kv = place(calls["cache"], cache_s)
        start = time.perf_counter()
        compiled_decode = decode.lower(params, kv, state, controls).compile()
        out["decode_seconds"] = time.perf_counter() - start
    out["cache_per_device"] = _bytes(kv)[1]
    out["state_per_device"] = _bytes(state)[1]
    out["cache_specs"] = [str(s.spec) for s in jax.tree_util.tree_leaves(cache_s)]
    out["prefill"], out["decode"] = _memory(compiled_prefill), _memory(compiled_decode)
    # resident while each program runs: all params (XLA counts only those the program reads: decode skips the
    # ViT's), its other arguments, outputs and temporaries; during decode generate() still holds the prefill inputs
    resident = {"prefill": out["params_per_device"] + out["inputs_per_device"] + out["controls_bytes"],
                "decode": out["params_per_device"] + out["cache_per_device"] + out["state_per_device"]
                + out["controls_bytes"] + out["inputs_per_device"]}
    for name, held in resident.items():
        m = out[name]
        m["resident_peak"] = held + m["outputs"] - m["aliased"] + m["temporaries"]
    out["peak_per_device"] = max(out["prefill"]["resident_peak"], out["decode"]["resident_peak"])
    out["params_cache_max_temp"] = (out["params_per_device"] + out["cache_per_device"]
                                    + max(out["prefill"]["temporaries"], out["decode"]["temporaries"]))
    return out


def report(result: dict, hbm: float | None) -> str:
    gb = lambda x: f"{x / 1e9:9.3f} GB"
    s, a = result["shapes"], result["analytic_cache"]
    lines = [f"generation plan: {result['preset']} ({result['layers']} layers, {result['kv_heads']} KV heads × "
             f"{result['head_dim']}), {result['param_count'] / 1e9:.3f} B params in {result['dtype']}, mesh "
             f"{result['mesh']} = {result['devices']} devices ({result['batch_shards']} batch shards)",
             f"request: batch {result['batch']} × seq {result['seq']} + {result['patches_per_sample']} patches/sample, "
             f"max_new_tokens {result['max_new_tokens']} → buckets batch {s['batch']}, length {s['length']}, cache "
             f"{s['cache']} slots, {s['vision_rows_per_shard']} ViT rows per shard",
             f"{'per device':<34}{'plan':>12}{'analytic':>13}",
             f"{'parameters':<34}{gb(result['params_per_device'])}{gb(result['analytic_params_per_device'])}"
             f"  (ideal: all / tensor)"]
    cache = result.get("cache_per_device", a["per_device"])
    lines.append(f"{'KV cache':<34}{gb(cache)}{gb(a['per_device'])}  (2·{result['layers']}·{s['batch']}·"
                 f"{result['kv_heads']}·{s['cache']}·{result['head_dim']}·itemsize / "
                 f"{result['batch_shards']}·{a['heads_split']}; specs {result.get('cache_specs', '?')})")
    lines.append(f"{'prefill inputs':<34}{gb(result['inputs_per_device'])}")
    if "prefill" in result:
        lines.append(f"{'XLA memory':<14}{'arguments':>12}{'outputs':>12}{'aliased':>12}{'temporaries':>13}"
                     f"{'XLA peak':>12}{'resident':>12}{'compile':>9}")
        for name in ("prefill", "decode"):
            m = result[name]
            lines.append(f"{name:<14}" + "".join(f"{m[k] / 1e9:>9.3f} GB" for k in ("arguments", "outputs", "aliased"))
                         + f"{m['temporaries'] / 1e9:>10.3f} GB{m['peak'] / 1e9:>9.3f} GB"
                         f"{m['resident_peak'] / 1e9:>9.3f} GB{result[name + '_seconds']:>8.1f} s")
        lines += ["XLA peak = arguments + outputs − aliased + temporaries (the arguments the program reads: decode "
                  "skips the ViT's params); resident = the same with all params, and for decode the prefill inputs "
                  "generate() still holds",
                  f"peak per device: {result['peak_per_device'] / 1e9:.3f} GB (params + cache + max(temp) = "
                  f"{result['params_cache_max_temp'] / 1e9:.3f} GB)"]
        if hbm:
            verdict = "fits" if result["peak_per_device"] <= hbm else "does NOT fit"
            lines.append(f"HBM {hbm / 1e9:.0f} GB per device: {verdict} "
                         f"({100 * result['peak_per_device'] / hbm:.0f} % used)")
    return "\n".join(lines)

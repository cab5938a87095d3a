"""Will it fit? An ahead-of-time memory plan of the full train step on a pod, computed on this machine.

    python -m sharding.plan --preset 2b --mesh fsdp=8 --batch 16 --seq 2048 --chip v5e     # XLA:TPU v5e:2x4
    python -m sharding.plan --preset 2b --mesh fsdp=8 --batch 16 --seq 2048 --topology v5e:2x4
    python -m sharding.plan --preset 72b --mesh fsdp=16,tensor=4 --batch 64 --seq 4096 --hbm 95G  # XLA:CPU
    python -m sharding.plan --generate --preset 7b --mesh tensor=4 --batch 32 --seq 4096 --hbm v5e

(`--generate`: the generation programs instead, sharding/plan_generate.py.)

Lowers and compiles the whole train step — ViT + merger + decoder + masked cross-entropy + AdamW update, jitted with
the shardings of `sharding/rules.py` — for abstract inputs (jax.ShapeDtypeStruct: nothing is allocated), then prints
per-device bytes: parameters, optimizer state and batch (from their shardings), XLA's temporaries and the peak,
against the HBM given, beside an analytic estimate.

Two compilers (sharding/topology.py; the report's first line names the one used). XLA:TPU: when `--topology` names
a slice, or `--chip`/`--hbm` names a TPU generation and libtpu is installed (`pip install -e '.[tpu-plan]'`), the
step compiles for compile-only TPU devices of that slice (default: the compact slice of the mesh's device count,
v5e 8 → v5e:2x4, v5p 8 → v5p:2x2x2, v5p 64 → v5p:4x4x4) — TPU buffer assignment, fusion and async collectives,
on a machine without a TPU. XLA:CPU otherwise (or with `--compiler cpu`), on as many fake CPU devices as the mesh has:
it keeps float32 copies of bf16 buffers (no bf16 matmul) and fuses differently, so its temporaries overstate a
TPU's; the plan says so loudly. `--attention auto` (the default) lets the model pick the kernel from the devices
compiled for (splash on TPU); `xla` is the blockwise (flash-style) loop from 512 rows, memory linear in length.

It also prints, per device and per step: model FLOPs (6 · params touched · tokens + attention; sharding/flops.py
states the formula), the matmul FLOPs of the compiled dots and XLA's own cost analysis, every collective of the
compiled HLO by kind (sharding/hlo_stats.py: the bytes it returns and those a ring sends), and with `--chip` the
MFU ceiling those collectives leave on that TPU (which also sets the default --hbm). Collectives and FLOPs are
the compiled program's: XLA:TPU's own (fusions, convolution-form dots, async collectives) under XLA:TPU."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from qwen2vl_jax.config import PRESETS

HBM = {"v5e": 16e9, "v5p": 95e9, "v4": 32e9, "v6e": 32e9}  # = sharding.flops.CHIPS[chip]["hbm"]


def analytic_param_count(config) -> int:
    """Closed-form parameter count from the config's sizes (checked against the model's own in the tests)."""
    v, t = config.vision, config.text
    e, m, group = v.embed_dim, v.mlp_dim, v.spatial_merge_size**2 * v.embed_dim
    norms = 2 * e if v.windowed else 4 * e  # two RMSNorm scales, or two LayerNorms with biases
    mlp = 3 * e * m + 2 * m + e if v.windowed else e * m + m + m * e + e  # SwiGLU (with biases) or fc1/fc2
    vision = (v.patch_dim * e + v.depth * (norms + 3 * e * e + 3 * e + e * e + e + mlp)
              + (e if v.windowed else 2 * e) + group * group + group + group * v.hidden_size + v.hidden_size)
    d, q, kv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    layer = 2 * d + d * q + q + 2 * (d * kv + kv) + q * d + 3 * d * t.intermediate_size
    text = t.vocab_size * d * (1 if t.tie_word_embeddings else 2) + t.num_hidden_layers * layer + d
    return vision + text


def _bytes(tree) -> tuple[int, int]:
    """(global bytes, bytes on the busiest device) of a tree of jax.ShapeDtypeStruct with shardings."""
    import jax

    total, per_device = 0, 0
    for leaf in jax.tree_util.tree_leaves(tree):
        itemsize = leaf.dtype.itemsize
        total += math.prod(leaf.shape) * itemsize
        per_device += math.prod(leaf.sharding.shard_shape(leaf.shape)) * itemsize
    return total, per_device


def abstract_batch(config, batch: int, seq: int, patches_per_sample: int, shards: int = 1,
                   head_fraction: int = 8) -> dict:
    """ShapeDtypeStructs of a training batch (training/step.py's layout), S = `shards` batch shards, V = batch ·
    `patches_per_sample` ViT rows (1024 = one 448×448 image per sample), packed per shard:
        input_ids, labels int32[B, L]; prepared: attention_mask, splice_index int32[B, L], position_ids
        int32[3, B, L], vision_pos_hw int32[S, V/S, 2], vision_segment_ids int32[S, V/S];
        vision_pixels dtype[S, V/S, patch_dim]; loss_index, loss_targets int32[B, L/head_fraction] (the LM head
        runs on those positions only; head_fraction 0: no selection, the head runs on all B·L)."""
    import jax
    import jax.numpy as jnp

    rows = batch * patches_per_sample
    if rows % shards or batch % shards:
        raise ValueError(f"batch {batch} (and its {rows} ViT rows) must split over the {shards} batch shards")
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    out = {"input_ids": i32(batch, seq), "labels": i32(batch, seq),
           "prepared": {"attention_mask": i32(batch, seq), "position_ids": i32(3, batch, seq),
                        "splice_index": i32(batch, seq)}}
    if rows:
        out["prepared"] |= {"vision_pos_hw": i32(shards, rows // shards, 2),
                            "vision_segment_ids": i32(shards, rows // shards)}
        out["vision_pixels"] = jax.ShapeDtypeStruct((shards, rows // shards, config.vision.patch_dim),
                                                    jnp.dtype(config.dtype))
    if head_fraction:
        out["loss_index"] = out["loss_targets"] = i32(batch, seq // head_fraction)
    return out


def analytic_bytes(config, mesh_shape: dict, batch: int, seq: int, patches_per_sample: int,
                   head_positions: int | None = None) -> dict:
    """Per-device estimate, ideal sharding: params + AdamW moments (param dtype) + gradients, and the activations
    a scanned, fully rematerialized step keeps (each layer's input) plus the float32 logits and their gradient at
    the `head_positions` the LM head runs on (default all B·L)."""
    devices = math.prod(mesh_shape.values())
    batch_ways = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
    tensor = mesh_shape.get("tensor", 1)
    params = analytic_param_count(config)
    pbytes = params * _itemsize(config.param_dtype) / devices
    act = _itemsize(config.dtype)
    rows_local = batch * patches_per_sample / batch_ways
    tokens_local = batch * seq / batch_ways
    saved = (tokens_local * config.text.hidden_size * config.text.num_hidden_layers
             + rows_local * config.vision.embed_dim * config.vision.depth) * act
    head_local = (batch * seq if head_positions is None else head_positions) / batch_ways
    logits = 2 * head_local * config.text.vocab_size / tensor * 4
    full = config.lora is None  # LoRA: the adapters' moments and gradients are negligible (int8 counted as bf16)
    opt, grads = (2 * pbytes, pbytes) if full else (0.0, 0.0)
    return {"params": pbytes, "opt_state": opt, "grads": grads, "saved_activations": saved,
            "logits_fp32_x2": logits, "total": pbytes + opt + grads + saved + logits}


ATTENTION = ("auto", "pallas_tpu", "xla", "xla_dense")


def model_attention(requested: str) -> str:
    """The config's attention for the planner's `--attention`: as asked, except "auto" on a model that does not
    know it yet (qwen2vl_jax.attention.IMPLEMENTATIONS), which plans with "xla" (the blockwise loop)."""
    from qwen2vl_jax.attention import IMPLEMENTATIONS

    if requested not in ATTENTION:
        raise ValueError(f"--attention {requested!r}: choose one of {ATTENTION}")
    return "xla" if requested == "auto" and "auto" not in IMPLEMENTATIONS else requested


def _itemsize(dtype: str) -> int:
    import numpy as np
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(dtype)).itemsize


def plan(preset: str, mesh: str, batch: int, seq: int, *, remat: str = "full", patches_per_sample: int = 1024,
         dtype: str = "bfloat16", param_dtype: str = "float32", dcn: str | None = None, compile: bool = True,
         attention: str = "auto", config=None, head_fraction: int = 8, chip: str | None = None,
         topology: str | None = None, hlo_path: str | None = None) -> dict:
    """The plan as a dict of byte counts, FLOPs, collectives and timings (see the module docstring); `chip` (a key
    of sharding.flops.CHIPS) adds the MFU ceiling; `topology` (e.g. "v5e:2x4") compiles with XLA:TPU for that
    slice (× the slices of `dcn`) instead of XLA:CPU on this machine's devices; `hlo_path` saves the compiled HLO
    text (re-read it with sharding.hlo_stats)."""
    import jax
    import flax.linen as nn

    from qwen2vl_jax import Qwen2VLConfig
    from qwen2vl_jax.model import abstract_params
    from sharding.mesh import make_mesh
    from sharding.rules import batch_shardings
    from sharding.topology import plan_devices
    from training.step import TrainState, init_state, jit_train_step, make_optimizer, state_shardings

    config = config or Qwen2VLConfig.preset(preset)
    if config.lora is not None:  # the frozen base in the adapters' storage (training.train.model_and_processor)
        param_dtype = "float32" if config.lora.base_dtype == "float32" else "bfloat16"
    config = config.replace(scan_layers=True, remat=remat, dtype=dtype, param_dtype=param_dtype,
                            attention=model_attention(attention))
    device_mesh = make_mesh(mesh, dcn=dcn, devices=plan_devices(topology, dcn))
    params = nn.unbox(abstract_params(config))
    scales = None
    if config.lora is not None:  # adapters train, the base is frozen (no gradient, no optimizer state)
        from training.param_groups import adapters_only, trains, update_scales
        scales = adapters_only(update_scales(params, "all"))
    optimizer = make_optimizer(1e-5, warmup_steps=10, total_steps=1000,
                               trainable=None if scales is None else trains(scales))
    shardings = state_shardings(config, optimizer, device_mesh)
    state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    with_sharding = lambda tree, s: jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, s)
    state = TrainState(step=with_sharding(state.step, shardings.step),
                       params=with_sharding(state.params, shardings.params),
                       opt_state=with_sharding(state.opt_state, shardings.opt_state),
                       rng=with_sharding(state.rng, shardings.rng))
    shards = device_mesh.shape.get("data", 1) * device_mesh.shape.get("fsdp", 1)
    batch_abstract = abstract_batch(config, batch, seq, patches_per_sample, shards, head_fraction)
    batch_sharding = batch_shardings(batch_abstract, device_mesh)
    batch_abstract = with_sharding(batch_abstract, batch_sharding)
    out = {"preset": preset, "compiler": f"XLA:TPU {topology}" if topology else "XLA:CPU",
           "mesh": dict(device_mesh.shape), "devices": device_mesh.size, "batch": batch,
           "seq": seq, "patches_per_sample": patches_per_sample, "head_positions": batch * (seq // head_fraction
                                                                                            if head_fraction else seq), "remat": remat, "dtype": dtype, "attention": attention,
           "model_attention": config.attention,
           "param_dtype": param_dtype, "lora": None if config.lora is None else dict(
               rank=config.lora.rank, base_dtype=config.lora.base_dtype, targets=config.lora.targets),
           "layers": config.text.num_hidden_layers, "param_count": sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)),
           "analytic_param_count": analytic_param_count(config)}
    (out["params_bytes"], out["params_per_device"]) = _bytes(state.params)
    (_, out["opt_state_per_device"]) = _bytes(state.opt_state)
    (_, out["batch_per_device"]) = _bytes(batch_abstract)
    out["analytic_per_device"] = analytic_bytes(config, dict(device_mesh.shape), batch, seq, patches_per_sample,
                                                out["head_positions"])
    if not compile:
        return out
    step = jit_train_step(config, optimizer, device_mesh, shardings, batch_sharding, scales)
    with jax.set_mesh(device_mesh):
        start = time.perf_counter()
        lowered = step.lower(state, batch_abstract)
        out["lower_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as error:  # XLA:TPU refuses a program over HBM, saying how much it needs
            needed = over_hbm(error)
            if needed is None:
                raise
            return out | {"peak_per_device": needed, "refused": True,
                          "compile_seconds": time.perf_counter() - start}
        out["compile_seconds"] = time.perf_counter() - start
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(compiled.as_text())
    memory = compiled.memory_analysis()
    out["xla"] = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                  "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
                  "code": memory.generated_code_size_in_bytes}
    out["peak_per_device"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                              - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    out.update(compute_stats(config, out, compiled, chip))
    return out


def over_hbm(error: BaseException) -> float | None:
    """The bytes per device XLA:TPU said a program needs when it refused to compile it for exceeding HBM, else
    None."""
    import re

    needed = re.search(r"memory required for .*?\(([\d.]+)G\) exceeds available HBM", str(error))
    return None if needed is None else float(needed.group(1)) * 2**30


def compute_stats(config, out: dict, compiled, chip: str | None) -> dict:
    """FLOPs (analytic, XLA's cost analysis, HLO dots) and collectives per device per step of the compiled step,
    and the MFU ceiling on `chip` (sharding/flops.py's model)."""
    from sharding import flops, hlo_stats

    start = time.perf_counter()
    module = hlo_stats.parse_hlo(compiled.as_text())
    model = flops.model_flops(config, out["batch"], out["seq"], out["patches_per_sample"], out["head_positions"])
    devices = out["devices"]
    stats = {"model_flops": model, "model_flops_per_device": model["total"] / devices,
             "hardware_flops_per_device": flops.hardware_flops(model, out["remat"]) / devices,
             "hlo_dot_flops": hlo_stats.dot_flops(module), "collectives": hlo_stats.collective_totals(module)}
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        stats["xla_cost_flops"] = float(cost.get("flops")) if cost and cost.get("flops") is not None else None
    except Exception:  # not every backend implements it
        stats["xla_cost_flops"] = None
    stats["all_gathers"] = [{"arrays": [str(a) for a in g.arrays], "bytes": g.bytes, "executions": g.executions,
                             "op_name": g.op_name} for g in hlo_stats.all_gathers(module)[:20]]  # largest first
    stats["largest_all_gather"] = stats["all_gathers"][0] if stats["all_gathers"] else None
    stats["loops"] = [{"trip_count": w.trip_count, "depth": w.depth} for w in hlo_stats.while_loops(module)]
    # the splice of merged vision features into the text embeddings (Qwen2VL.embed, less the token-table lookup),
    # forward and backward: 0 when each batch shard splices its own ViT shard's features
    stats["splice_bytes_per_device"] = sum(
        c.bytes * (c.executions or 1) for c in hlo_stats.collectives(module)
        if "Qwen2VL.embed" in c.op_name and "language_model" not in c.op_name and c.group != 1)
    wire = sum(t["wire_bytes_per_step"] for t in stats["collectives"].values())
    stats["wire_bytes_per_device"] = wire
    if chip:
        stats["chip"] = chip
        stats["mfu"] = flops.mfu_ceiling(stats["model_flops_per_device"], stats["hardware_flops_per_device"], wire,
                                         chip)
    stats["stats_seconds"] = time.perf_counter() - start
    return stats


def _size(text: str) -> float:
    text = text.strip().upper().rstrip("B")
    for suffix, factor in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if text.endswith(suffix):
            return float(text[:-1]) * factor
    return float(text)


def _report(result: dict, hbm: float | None) -> str:
    gb = lambda x: f"{x / 1e9:8.2f} GB"
    a = result["analytic_per_device"]
    lines = compiler_lines(result) + [
        f"{result['preset']} ({result['layers']} layers): {result['param_count'] / 1e9:.3f} B params (analytic "
        f"{result['analytic_param_count'] / 1e9:.3f} B), mesh {result['mesh']} = {result['devices']} devices, "
        f"batch {result['batch']} × seq {result['seq']} + {result['patches_per_sample']} patches/sample, "
        f"remat {result['remat']}, {result['dtype']} compute / {result['param_dtype']} params"
        + ("" if not result.get("lora") else f" + LoRA rank {result['lora']['rank']} ({result['lora']['base_dtype']} "
           "base)") + ", attention "
        f"{result.get('model_attention', result['attention'])}",
        f"{'per device':<28}{'plan':>11}{'analytic':>14}",
        f"{'parameters':<28}{gb(result['params_per_device'])}{gb(a['params'])}",
        f"{'optimizer state':<28}{gb(result['opt_state_per_device'])}{gb(a['opt_state'])}",
        f"{'batch':<28}{gb(result['batch_per_device'])}"]
    if "xla" in result:
        x = result["xla"]
        lines += [f"{'temporaries (XLA)':<28}{gb(x['temporaries'])}"
                  f"{gb(a['grads'] + a['saved_activations'] + a['logits_fp32_x2'])}  (grads + saved activations "
                  f"+ fp32 logits ×2)",
                  f"{'peak (args + out − alias + temp)':<28}{gb(result['peak_per_device'])}{gb(a['total'])}"]
        if hbm:
            verdict = "fits" if result["peak_per_device"] <= hbm else "does NOT fit"
            lines.append(f"HBM {hbm / 1e9:.0f} GB per device: {verdict} "
                         f"({100 * result['peak_per_device'] / hbm:.0f} % used)")
        lines.append(f"lower {result['lower_seconds']:.1f} s, compile {result['compile_seconds']:.1f} s")
    if result.get("refused"):
        lines.append(f"XLA:TPU refused to compile the step: it needs {result['peak_per_device'] / 1e9:.2f} GB per "
                     f"device" + (f" > {hbm / 1e9:.0f} GB HBM: does NOT fit" if hbm else ""))
    if "collectives" in result:
        lines += _report_compute(result)
    return "\n".join(lines)


def compiler_lines(result: dict) -> list[str]:
    """The report's first line(s): the compiler ("XLA:TPU v5e:2x4" or "XLA:CPU") and why, and under XLA:CPU the
    warning that its figures overstate a TPU's memory."""
    from sharding.topology import cpu_warning

    compiler = result.get("compiler", "XLA:CPU")
    lines = [compiler + (f" ({result['compiler_reason']})" if result.get("compiler_reason") else "")]
    return lines + ([f"!!! {cpu_warning(result.get('compiler_reason', ''))}"] if compiler == "XLA:CPU" else [])


def _report_compute(result: dict) -> list[str]:
    """The FLOPs / collectives / MFU lines of the report."""
    tf = lambda x: "n/a" if x is None else f"{x / 1e12:.4g} TFLOP"
    m, devices = result["model_flops"], result["devices"]
    lines = [f"per device per step: model FLOPs (6·params·tokens + attention, sharding/flops.py) "
             f"{tf(result['model_flops_per_device'])}  [text {m['text'] / devices / 1e12:.2f}, LM head on "
             f"{result['head_positions']} positions {m['head'] / devices / 1e12:.2f}, ViT {m['vision'] / devices / 1e12:.2f}"
             f", attention text {m['attention_text'] / devices / 1e12:.2f} + ViT "
             f"{m['attention_vision'] / devices / 1e12:.2f}]",
             f"{'':<20}executed with remat {result['remat']}: {tf(result['hardware_flops_per_device'])}",
             f"{'':<20}HLO dots × known trip counts: {tf(result['hlo_dot_flops']['flops'])} (+ "
             f"{tf(result['hlo_dot_flops']['flops_in_unknown_loops'])} in loops of unknown trip count — the "
             f"blockwise attention's — counted once)" + (
                 f"; + {result['hlo_dot_flops']['kernel_calls']} Pallas kernel calls (splash attention), FLOPs not "
                 f"counted" if result["hlo_dot_flops"].get("kernel_calls") else ""),
             f"{'':<20}{result.get('compiler', 'XLA:CPU').split()[0]} cost_analysis() 'flops': "
             f"{tf(result['xla_cost_flops'])} (loop bodies counted once: not a per-step figure)",
             f"{'collectives per device per step':<34}{'ops':>5}{'runs':>7}{'result bytes':>15}{'sent (ring)':>15}"]
    for kind, t in result["collectives"].items():
        runs = "?" if t["executions"] is None else str(t["executions"])
        lines.append(f"  {kind:<32}{t['count']:>5}{runs:>7}{t['bytes_per_step'] / 1e9:>12.3f} GB"
                     f"{t['wire_bytes_per_step'] / 1e9:>12.3f} GB" + (f"  (+ {t['trivial']} over 1-device groups)"
                                                                      if t["trivial"] else ""))
    lines.append(f"  vision features spliced across devices: {result['splice_bytes_per_device'] / 1e6:.3f} MB "
                 "(each batch shard splices its own ViT shard's features)")
    gather = result["largest_all_gather"]
    if gather:
        lines.append(f"  largest all-gather: {' '.join(gather['arrays'])} ({gather['bytes'] / 1e6:.1f} MB, "
                     f"{gather['executions']} runs)")
    if "mfu" in result:
        f = result["mfu"]
        lines.append(f"MFU ceiling on {result['chip']}: compute {1e3 * f['compute_seconds']:.1f} ms, collectives "
                     f"{1e3 * f['collective_seconds']:.1f} ms at half the bidirectional ICI → "
                     f"{100 * f['mfu_not_overlapped']:.1f} % not overlapped, {100 * f['mfu_overlapped']:.1f} % "
                     f"fully overlapped (upper bounds; sharding/flops.py)")
    return lines


def _config(preset: str, text_layers: int | None, lora_rank: int = 0, lora_base: str = "bfloat16"):
    import dataclasses

    from qwen2vl_jax import Qwen2VLConfig
    from qwen2vl_jax.lora import LoraConfig

    config = Qwen2VLConfig.preset(preset)
    if lora_rank:
        config = config.replace(lora=LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, base_dtype=lora_base))
    return config if not text_layers else config.replace(
        text=dataclasses.replace(config.text, num_hidden_layers=text_layers))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sharding.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="2b", choices=sorted(PRESETS))
    parser.add_argument("--mesh", default="fsdp=8", help="axis=size,... over data, fsdp, tensor (sizes multiply "
                                                         "to the device count; no -1 here)")
    parser.add_argument("--dcn", help="slices per axis for multi-slice, e.g. data=2")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--patches-per-sample", type=int, default=1024, help="ViT rows per sample (448² image: 1024)")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--attention", default="auto", choices=ATTENTION,
                        help="auto: the model picks from the devices compiled for (splash on TPU); pallas_tpu: splash;"
                             " xla: blockwise (flash-like) from 512 rows; xla_dense: full scores")
    parser.add_argument("--text-layers", type=int, help="override the preset's decoder depth (compile-time check)")
    parser.add_argument("--lora-rank", type=int, default=0, help="> 0: plan LoRA fine-tuning (adapters on the "
                                                                  "decoder's projections; base frozen)")
    parser.add_argument("--lora-base", default="bfloat16", choices=["bfloat16", "float32", "int8"],
                        help="how LoRA's frozen base is stored")
    parser.add_argument("--chip", choices=sorted(HBM), help="TPU generation: peak FLOP/s and ICI for the MFU "
                                                            "ceiling, and the default --hbm")
    parser.add_argument("--hbm", help=f"HBM per device, e.g. 16G or a chip name {sorted(HBM)}")
    parser.add_argument("--head-fraction", type=int, default=8, help="the LM head runs on L/N positions per row "
                                                                     "(loss_index); 0: on all of them")
    parser.add_argument("--json", help="also write the plan to this file")
    parser.add_argument("--generate", action="store_true", help="plan generation instead (sharding/plan_generate.py"
                                                                 "): prefill + decode, params and compute in --dtype")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="--generate: sizes the KV cache bucket")
    parser.add_argument("--topology", help="compile with XLA:TPU for this slice (e.g. v5e:2x4, v5p:2x2x2; "
                                           "libtpu, no TPU needed); default with a TPU --chip/--hbm and libtpu: "
                                           "the compact slice of the mesh's device count")
    parser.add_argument("--compiler", default="auto", choices=["auto", "tpu", "cpu"],
                        help="auto: XLA:TPU when --topology or a TPU --chip/--hbm is given and libtpu imports, else "
                             "XLA:CPU; cpu: force XLA:CPU on fake CPU devices; tpu: XLA:TPU or an error")
    parser.add_argument("--hlo", help="also write the compiled step's HLO text to this file (train plan)")
    args = parser.parse_args(argv)
    from sharding.mesh import parse_axes

    per_slice = math.prod(parse_axes(args.mesh).values())
    devices = per_slice * math.prod(parse_axes(args.dcn).values() or [1])
    if devices < 1:
        parser.error("--mesh sizes must be positive (the planner needs the device count)")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    hbm = args.hbm or args.chip
    hbm = None if not hbm else HBM.get(hbm, None) or _size(hbm)
    compiler = _compiler(parser, args, per_slice)
    args.topology = compiler.topology
    if args.generate:
        from sharding.plan_generate import run

        result = run(args, hbm, compiler)
        return _write_json(result, args.json)
    start = time.perf_counter()
    result = plan(args.preset, args.mesh, args.batch, args.seq, remat=args.remat,
                  patches_per_sample=args.patches_per_sample, dtype=args.dtype, param_dtype=args.param_dtype,
                  dcn=args.dcn, attention=args.attention, config=_config(args.preset, args.text_layers, args.lora_rank, args.lora_base),
                  head_fraction=args.head_fraction, chip=args.chip or (args.hbm if args.hbm in HBM else None),
                  topology=compiler.topology, hlo_path=args.hlo)
    result["planner_seconds"] = time.perf_counter() - start
    result["hbm"], result["compiler_reason"] = hbm, compiler.reason
    print(_report(result, hbm))
    print(f"planner run time {result['planner_seconds']:.1f} s")
    return _write_json(result, args.json)


def _compiler(parser, args, devices_per_slice: int):
    """The sharding.topology.Compiler for the parsed args (a TPU chip from --chip, else from --hbm's name); a
    --topology whose chip differs from --chip's is an error."""
    from sharding.topology import choose_compiler, warn_cpu

    chip = args.chip or (args.hbm if args.hbm in HBM else None)
    if args.topology and chip and not args.topology.startswith(chip + ":"):
        parser.error(f"--topology {args.topology} is not a {chip} slice (--chip/--hbm {chip}); drop one of them")
    try:
        compiler = choose_compiler(chip, args.topology, args.compiler, devices_per_slice)
    except ValueError as error:
        parser.error(str(error))
    warn_cpu(compiler)
    return compiler


def _write_json(result: dict, path: str | None) -> dict:
    if path:
        import json

        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

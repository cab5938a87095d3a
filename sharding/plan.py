"""Will it fit? An ahead-of-time memory plan of the full train step on a pod, computed on this machine.

    python -m sharding.plan --preset 72b --mesh fsdp=64,tensor=4 --batch 256 --seq 4096 --remat full --hbm 95G

Lowers and compiles the whole train step — ViT + merger + decoder + masked cross-entropy + AdamW update, jitted with
the shardings of `sharding/rules.py` — for abstract inputs (jax.ShapeDtypeStruct: nothing is allocated) on as many
fake CPU devices as the mesh has, then prints per-device bytes: parameters, optimizer state and batch (from their
shardings), XLA's temporaries and the peak, against the HBM given, beside an analytic estimate.

Attention is planned as the TPU runs it: `xla` attention lowers to our blockwise (flash-style) kernel for sequences of
512 rows or more, whose memory is linear in length, like the Pallas kernel on TPU. XLA:CPU's buffer assignment and
fusion differ from XLA:TPU's, so temporaries are an estimate of the same program, not a TPU measurement."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

HBM = {"v5e": 16e9, "v5p": 95e9, "v4": 32e9, "v6e": 32e9}


def analytic_param_count(config) -> int:
    """Closed-form parameter count from the config's sizes (checked against the model's own in the tests)."""
    v, t = config.vision, config.text
    e, m, group = v.embed_dim, v.mlp_dim, v.spatial_merge_size**2 * v.embed_dim
    vision = (v.patch_dim * e + v.depth * (4 * e + 3 * e * e + 3 * e + e * e + e + e * m + m + m * e + e)
              + 2 * e + group * group + group + group * v.hidden_size + v.hidden_size)
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


def abstract_batch(config, batch: int, seq: int, patches_per_sample: int) -> dict:
    """ShapeDtypeStructs of a training batch (training/step.py's layout): `patches_per_sample` ViT rows per sample
    (1024 = one 448×448 image), all packed into one sequence."""
    import jax
    import jax.numpy as jnp

    rows = batch * patches_per_sample
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    out = {"input_ids": i32(batch, seq), "labels": i32(batch, seq),
           "prepared": {"attention_mask": i32(batch, seq), "position_ids": i32(3, batch, seq),
                        "splice_index": i32(batch, seq)}}
    if rows:
        out["prepared"] |= {"vision_pos_hw": i32(rows, 2), "vision_segment_ids": i32(rows)}
        out["vision_pixels"] = jax.ShapeDtypeStruct((rows, config.vision.patch_dim), jnp.dtype(config.dtype))
    return out


def analytic_bytes(config, mesh_shape: dict, batch: int, seq: int, patches_per_sample: int) -> dict:
    """Per-device estimate, ideal sharding: params + AdamW moments (param dtype) + gradients, and the activations
    a scanned, fully rematerialized step keeps (each layer's input) plus the float32 logits and their gradient."""
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
    logits = 2 * tokens_local * config.text.vocab_size / tensor * 4
    return {"params": pbytes, "opt_state": 2 * pbytes, "grads": pbytes, "saved_activations": saved,
            "logits_fp32_x2": logits, "total": 4 * pbytes + saved + logits}


def _itemsize(dtype: str) -> int:
    import numpy as np
    import jax.numpy as jnp

    return np.dtype(jnp.dtype(dtype)).itemsize


def plan(preset: str, mesh: str, batch: int, seq: int, *, remat: str = "full", patches_per_sample: int = 1024,
         dtype: str = "bfloat16", param_dtype: str = "float32", dcn: str | None = None, compile: bool = True,
         attention: str = "xla", config=None) -> dict:
    """The plan as a dict of byte counts and timings (see the module docstring)."""
    import jax
    import flax.linen as nn

    from qwen2vl_jax import Qwen2VLConfig
    from qwen2vl_jax.model import abstract_params
    from sharding.mesh import make_mesh
    from sharding.rules import batch_shardings
    from training.step import TrainState, init_state, jit_train_step, make_optimizer, state_shardings

    config = (config or Qwen2VLConfig.preset(preset)).replace(scan_layers=True, remat=remat, dtype=dtype,
                                                              param_dtype=param_dtype, attention=attention)
    device_mesh = make_mesh(mesh, dcn=dcn)
    optimizer = make_optimizer(1e-5, warmup_steps=10, total_steps=1000)
    shardings = state_shardings(config, optimizer, device_mesh)
    params = nn.unbox(abstract_params(config))
    state = jax.eval_shape(lambda p: init_state(p, optimizer), params)
    with_sharding = lambda tree, s: jax.tree_util.tree_map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, s)
    state = TrainState(step=with_sharding(state.step, shardings.step),
                       params=with_sharding(state.params, shardings.params),
                       opt_state=with_sharding(state.opt_state, shardings.opt_state),
                       rng=with_sharding(state.rng, shardings.rng))
    batch_abstract = abstract_batch(config, batch, seq, patches_per_sample)
    batch_sharding = batch_shardings(batch_abstract, device_mesh)
    batch_abstract = with_sharding(batch_abstract, batch_sharding)
    out = {"preset": preset, "mesh": dict(device_mesh.shape), "devices": device_mesh.size, "batch": batch,
           "seq": seq, "patches_per_sample": patches_per_sample, "remat": remat, "dtype": dtype, "attention": attention,
           "param_dtype": param_dtype, "layers": config.text.num_hidden_layers, "param_count": sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)),
           "analytic_param_count": analytic_param_count(config)}
    (out["params_bytes"], out["params_per_device"]) = _bytes(state.params)
    (_, out["opt_state_per_device"]) = _bytes(state.opt_state)
    (_, out["batch_per_device"]) = _bytes(batch_abstract)
    out["analytic_per_device"] = analytic_bytes(config, dict(device_mesh.shape), batch, seq, patches_per_sample)
    if not compile:
        return out
    step = jit_train_step(config, optimizer, device_mesh, shardings, batch_sharding)
    with jax.set_mesh(device_mesh):
        start = time.perf_counter()
        lowered = step.lower(state, batch_abstract)
        out["lower_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
        compiled = lowered.compile()
        out["compile_seconds"] = time.perf_counter() - start
    memory = compiled.memory_analysis()
    out["xla"] = {"arguments": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes,
                  "aliased": memory.alias_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
                  "code": memory.generated_code_size_in_bytes}
    out["peak_per_device"] = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                              - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
    return out


def _size(text: str) -> float:
    text = text.strip().upper().rstrip("B")
    for suffix, factor in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if text.endswith(suffix):
            return float(text[:-1]) * factor
    return float(text)


def _report(result: dict, hbm: float | None) -> str:
    gb = lambda x: f"{x / 1e9:8.2f} GB"
    a = result["analytic_per_device"]
    lines = [f"{result['preset']} ({result['layers']} layers): {result['param_count'] / 1e9:.3f} B params (analytic "
             f"{result['analytic_param_count'] / 1e9:.3f} B), mesh {result['mesh']} = {result['devices']} devices, "
             f"batch {result['batch']} × seq {result['seq']} + {result['patches_per_sample']} patches/sample, "
             f"remat {result['remat']}, {result['dtype']} compute / {result['param_dtype']} params, attention "
             f"{result['attention']}",
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
    return "\n".join(lines)


def _config(preset: str, text_layers: int | None):
    import dataclasses

    from qwen2vl_jax import Qwen2VLConfig

    config = Qwen2VLConfig.preset(preset)
    return config if not text_layers else config.replace(
        text=dataclasses.replace(config.text, num_hidden_layers=text_layers))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sharding.plan", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="2b", choices=["tiny", "2b", "7b", "72b"])
    parser.add_argument("--mesh", default="fsdp=8", help="axis=size,... over data, fsdp, tensor (sizes multiply "
                                                         "to the device count; no -1 here)")
    parser.add_argument("--dcn", help="slices per axis for multi-slice, e.g. data=2")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--patches-per-sample", type=int, default=1024, help="ViT rows per sample (448² image: 1024)")
    parser.add_argument("--remat", default="full", choices=["none", "full", "dots", "dots_no_batch"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--param-dtype", default="float32")
    parser.add_argument("--attention", default="xla", choices=["xla", "xla_dense"],
                        help="xla: blockwise (flash-like, as the TPU kernel) from 512 rows; xla_dense: full scores")
    parser.add_argument("--text-layers", type=int, help="override the preset's decoder depth (compile-time check)")
    parser.add_argument("--hbm", help=f"HBM per device, e.g. 16G or a chip name {sorted(HBM)}")
    parser.add_argument("--json", help="also write the plan to this file")
    args = parser.parse_args(argv)
    from sharding.mesh import parse_axes

    devices = math.prod(parse_axes(args.mesh).values()) * math.prod(parse_axes(args.dcn).values() or [1])
    if devices < 1:
        parser.error("--mesh sizes must be positive (the planner needs the device count)")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    start = time.perf_counter()
    result = plan(args.preset, args.mesh, args.batch, args.seq, remat=args.remat,
                  patches_per_sample=args.patches_per_sample, dtype=args.dtype, param_dtype=args.param_dtype,
                  dcn=args.dcn, attention=args.attention, config=_config(args.preset, args.text_layers))
    result["planner_seconds"] = time.perf_counter() - start
    hbm = None if not args.hbm else HBM.get(args.hbm, None) or _size(args.hbm)
    result["hbm"] = hbm
    print(_report(result, hbm))
    print(f"planner run time {result['planner_seconds']:.1f} s")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

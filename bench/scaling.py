"""Does a sharded program divide the work? 8 fake CPU devices vs 1 device on the SAME global batch.

On this machine `XLA_FLAGS=--xla_force_host_platform_device_count=8` makes 8 CPU devices that share the same cores,
so a program partitioned correctly (each device 1/8 of the work) costs about what the 1-device program costs on the
same global batch, while one that repeats work on every device (e.g. all-gathers activations to run a kernel whole)
costs up to ~8×. For each mesh (default "fsdp=8" and "data=2,fsdp=2,tensor=2") the bench measures three programs:

1. the full train step: `training.step.jit_train_step` on AdamW (`make_optimizer`), state in `state_shardings`,
   the batch placed by `sharding.rules.place_local_batch` (as training/train.py does);
2. the ViT alone: `Qwen2VL.encode_vision` on the batch's vision_pixels [S, V, 1176], vision_pos_hw,
   vision_segment_ids (jitted forward);
3. the decoder attention alone: `qwen2vl_jax.attention.dot_product_attention` (causal, segment ids = the batch's
   attention_mask, q [B, L, H, hd], k/v [B, L, Hkv, hd] in the decoder's shardings), forward + backward, traced under
   `jax.set_mesh(mesh)` and `sharding.rules.axis_rules(mesh)` (so it runs per device in shard_map).

The batch is built once per mesh with the data pipeline for S = `batch_shard_count(mesh)` shards
(`training_batches(..., shards=S)`); the 8-device run and the 1-device run (a 1-device mesh, in its own process)
build the same batch (the JSON checks its fingerprint) and run the same programs on it. Each device count runs in its
own subprocess (XLA reads the device-count flag once, at backend start). Model: configs/demo_cpu.py at width 64
(text hidden 64, mrope_section (2, 3, 3); vision embed_dim 64, hidden_size 64); batch: `--rows` rows (default 8) of
`--length` tokens (1280), packed, images of 448² (1024 patches, 256 tokens; ~4 per row), vision bucket 4096 patch
rows per row; records from data_pipeline.synthetic (make_example / to_messages).

Times: lower + compile wall seconds (reported apart), then `--warmup` calls and best (and median) of `--repeats`
timed calls; per token = seconds / (B · L) global (padded) tokens; ratio = 8-device best / 1-device best (≤ 1.3).
Also the process CPU seconds of the best call (`cpu_ratio`: work done, which other processes on the machine do not
inflate the way they inflate wall time) and, from XLA's HLO, 8 × the per-device matmul FLOPs over the 1-device
FLOPs (`sharding.hlo_stats.dot_flops`, loops of known trip count only; 1.0 = the matmuls are divided, the blockwise
attention's loops have traced bounds so attention has none). From each 8-device program's compiled HLO:
`sharding.hlo_stats.collective_totals` and `largest_all_gather`, beside the global size of the activations
(`activation_bytes_global`) that an activation-sized all-gather would return. The pipeline reads the records once
(num_epochs=1: the first batch is the same as with repeats, without prefetching hundreds of examples per stream).

    python bench/scaling.py [--meshes "fsdp=8;data=2,fsdp=2,tensor=2"] [--rows 8] [--length 1280] [--repeats 5]

Writes bench/results/scaling.json (`--out`). Every timing records cpu_use (process CPU s / wall s, ≈ 2 on an idle
2-core machine) and the 1-minute load average: other processes inflate the times of one run but not the other.
"""
from __future__ import annotations

import os
import sys

DEVICES = 8
THREADS = 2


def _flag(name: str):
    for i, arg in enumerate(sys.argv):
        if arg == name and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


if _flag("--child-devices"):  # a measuring child: its device count must be set before jax starts its backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_flag('--child-devices')}").strip()
os.environ["NPROC"] = str(THREADS)  # XLA:CPU intra-op pool size (see bench/forward.py)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
T0 = time.perf_counter()
MESHES = ("fsdp=8", "data=2,fsdp=2,tensor=2")
PROGRAMS = ("train_step", "vit", "attention")
PATCHES_PER_ROW = 4096  # ~4 images of 448² (1024 patches each) per row


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------------ the child
def build(rows: int, length: int, workdir: str):
    """(model config, processor, data config) of the bench: the demo config at width 64."""
    from ml_collections import ConfigDict

    from configs.demo_cpu import get_config
    from training.train import model_and_processor

    cfg = get_config()
    cfg.model.text.update(dict(hidden_size=64, mrope_section=(2, 3, 3)))
    cfg.model.vision.update(dict(embed_dim=64, hidden_size=64))
    model_config, processor = model_and_processor(cfg, workdir)
    data = ConfigDict(cfg.data.to_dict() | dict(
        batch_size=rows, shuffle=False, num_epochs=1, workers=0, pack=True, length_buckets=(length,),
        vision_buckets=(rows * PATCHES_PER_ROW,), min_pixels=448 * 448, max_pixels=448 * 448))
    return model_config, processor, data


def records(count: int) -> list[dict]:
    from data_pipeline.synthetic import make_example, to_messages

    out = []
    for i in range(count):
        example = make_example(i)
        out.append({"messages": to_messages(example), "images": [example["image"]], "id": str(i)})
    return out


def fingerprint(batch: dict) -> str:
    """sha256 of every array of the batch (and its example ids), keys sorted."""
    import numpy as np

    digest = hashlib.sha256()

    def add(prefix, tree):
        for key in sorted(tree):
            if isinstance(tree[key], dict):
                add(f"{prefix}{key}/", tree[key])
            elif key == "example_ids":
                digest.update(json.dumps(tree[key], default=str).encode())
            else:
                a = np.asarray(tree[key])
                digest.update(f"{prefix}{key}{a.shape}{a.dtype}".encode())
                digest.update(np.ascontiguousarray(a).tobytes())

    add("", batch)
    return digest.hexdigest()[:16]


def timed(fn, repeats: int, warmup: int) -> dict:
    """`warmup` calls, then `repeats` timed calls of fn (which blocks on its result) → best/median seconds."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(best_s=min(times), median_s=statistics.median(times), times_s=times, cpu_best_s=min(cpu),
                cpu_s=cpu, cpu_use=round(sum(cpu) / sum(times), 2), loadavg_1m=round(os.getloadavg()[0], 2))


def compile_timed(jitted, *args):
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def hlo_summary(compiled, devices: int) -> dict:
    """Matmul FLOPs per device (both device counts: × devices ≈ the 1-device figure when the work is divided); on
    several devices also the collectives by kind and the largest all-gather."""
    from sharding.hlo_stats import collective_totals, dot_flops, largest_all_gather

    flops = dot_flops(compiled)
    if devices == 1:
        return dict(dot_flops_per_device=flops)
    totals = {kind: t for kind, t in collective_totals(compiled).items() if t["count"] or t["trivial"]}
    gather = largest_all_gather(compiled)
    if gather is not None:
        gather = dict(name=gather.name, arrays=[str(a) for a in gather.arrays], bytes=gather.bytes,
                      operand_bytes=gather.operand_bytes, group=gather.group, executions=gather.executions,
                      computation=gather.computation, op_name=gather.op_name)
    return dict(dot_flops_per_device=flops, collectives=totals, largest_all_gather=gather)


def child(args) -> dict:
    import flax.linen as nn  # noqa: F401  (flax before the model, as the library imports it)
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding

    from data_pipeline.pipeline import training_batches
    from qwen2vl_jax.attention import dot_product_attention
    from qwen2vl_jax.model import Qwen2VL, init_params
    from sharding.mesh import make_mesh
    from sharding.rules import (axis_rules, batch_shard_count, local_batch_shards, param_shardings,
                                place_local_batch, spec_for)
    from training.step import init_state, jit_train_step, make_optimizer, state_shardings
    from training.train import HOST_KEYS

    devices = len(jax.devices())
    assert devices == args.child_devices, (devices, args.child_devices)
    mesh = make_mesh(args.mesh if devices > 1 else "fsdp=-1")  # one device: a 1-device mesh
    shards = batch_shard_count(mesh) if devices > 1 else args.shards
    out = dict(devices=devices, mesh=dict(mesh.shape), mesh_spec=args.mesh, shards=shards)
    log(f"child: {devices} device(s), mesh {dict(mesh.shape)}, batch built for {shards} shards")

    with tempfile.TemporaryDirectory() as workdir:
        model_config, processor, data = build(args.rows, args.length, workdir)
        t = time.perf_counter()
        batch = next(iter(training_batches(records(args.records), processor, model_config, data, seed=0,
                                           shards=shards)))
        out["data_s"] = round(time.perf_counter() - t, 1)
    out["batch_fingerprint"] = fingerprint({k: v for k, v in batch.items() if k != "stats"})
    out["batch_stats"] = {k: int(v) for k, v in batch["stats"].items()}
    out["batch_shapes"] = {key: list(batch[key].shape) for key in ("input_ids", "vision_pixels", "loss_index")}
    B, L = batch["input_ids"].shape
    S, V, C = batch["vision_pixels"].shape
    tokens = B * L
    text, vision = model_config.text, model_config.vision
    H, Hkv, hd = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    f32 = 4
    out["tokens"] = tokens
    out["activation_bytes_global"] = {  # what an all-gather of a whole activation would return per device
        "decoder_hidden [B, L, D]": B * L * text.hidden_size * f32, "q [B, L, H, hd]": B * L * H * hd * f32,
        "kv [B, L, Hkv, hd]": B * L * Hkv * hd * f32, "vision_pixels [S, V, 1176]": S * V * C * f32,
        "vision_hidden [S, V, E]": S * V * vision.embed_dim * f32}
    log(f"batch {dict(out['batch_shapes'])}, stats {out['batch_stats']}, fingerprint {out['batch_fingerprint']}")

    programs = {}
    model = Qwen2VL(model_config)
    optimizer = make_optimizer(1e-3)
    with jax.set_mesh(mesh):
        shard_ids = local_batch_shards(mesh) if devices > 1 else tuple(range(batch_shard_count(mesh)))
        placed, batch_sh = place_local_batch({k: v for k, v in batch.items() if k not in HOST_KEYS}, mesh, shard_ids)
        p_sh = param_shardings(model_config, mesh)
        params = init_params(model_config, 0, p_sh)
        st_sh = state_shardings(model_config, optimizer, mesh)
        state = jax.jit(functools.partial(init_state, optimizer=optimizer), out_shardings=st_sh)(params)

        # 1. the train step
        compiled, compile_s = compile_timed(jit_train_step(model_config, optimizer, mesh, st_sh, batch_sh),
                                            state, placed)
        metrics = {}

        def step():
            nonlocal state
            state, m = compiled(state, placed)
            metrics.setdefault("first", m)
            jax.block_until_ready(m)

        programs["train_step"] = dict(compile_s=compile_s, **timed(step, args.repeats, args.warmup),
                                      first_loss=float(metrics["first"]["loss"]))
        programs["train_step"]["hlo"] = hlo_summary(compiled, devices)
        del compiled, state
        log(f"train step {programs['train_step']['best_s']:.3f} s (compile {compile_s:.1f} s)")

        # 2. the ViT alone (forward)
        def vit(p, pixels, pos_hw, segment_ids):
            with axis_rules(mesh):
                return model.apply({"params": {"visual": p}}, pixels, pos_hw, segment_ids,
                                   method=Qwen2VL.encode_vision)

        prep, prep_sh = placed["prepared"], batch_sh["prepared"]
        vit_args = (params["visual"], placed["vision_pixels"], prep["vision_pos_hw"], prep["vision_segment_ids"])
        compiled, compile_s = compile_timed(jax.jit(vit, in_shardings=(
            p_sh["visual"], batch_sh["vision_pixels"], prep_sh["vision_pos_hw"], prep_sh["vision_segment_ids"])),
            *vit_args)
        features = compiled(*vit_args)
        programs["vit"] = dict(compile_s=compile_s, **timed(lambda: jax.block_until_ready(compiled(*vit_args)),
                                                              args.repeats, args.warmup),
                               features_shape=list(features.shape), features_sharding=str(features.sharding.spec),
                               features_sum=float(jnp.sum(features)))
        programs["vit"]["hlo"] = hlo_summary(compiled, devices)
        del compiled, features
        log(f"ViT {programs['vit']['best_s']:.3f} s (compile {compile_s:.1f} s)")

        # 3. the decoder attention alone (forward + backward)
        rng = np.random.default_rng(0)
        q_sh = NamedSharding(mesh, spec_for((B, L, H, hd), ("batch", "length", "heads", "head_dim"), mesh))
        kv_sh = NamedSharding(mesh, spec_for((B, L, Hkv, hd), ("batch", "length", "kv_heads", "head_dim"), mesh))
        q, ct = (jax.device_put(rng.standard_normal((B, L, H, hd), np.float32), q_sh) for _ in range(2))
        k, v = (jax.device_put(rng.standard_normal((B, L, Hkv, hd), np.float32), kv_sh) for _ in range(2))
        segment_ids, seg_sh = prep["attention_mask"], prep_sh["attention_mask"]

        def attention_loss(q, k, v, segment_ids, ct):
            with axis_rules(mesh):
                o = dot_product_attention(q, k, v, segment_ids=segment_ids, causal=True,
                                          implementation=model_config.attention)
            return jnp.sum(o * ct)

        grad = jax.jit(jax.value_and_grad(attention_loss, argnums=(0, 1, 2)),
                       in_shardings=(q_sh, kv_sh, kv_sh, seg_sh, q_sh))
        att_args = (q, k, v, segment_ids, ct)
        compiled, compile_s = compile_timed(grad, *att_args)
        value, _ = compiled(*att_args)
        programs["attention"] = dict(compile_s=compile_s, **timed(lambda: jax.block_until_ready(compiled(*att_args)),
                                                                    args.repeats, args.warmup),
                                     shapes=dict(q=[B, L, H, hd], kv=[B, L, Hkv, hd]),
                                     q_sharding=str(q_sh.spec), kv_sharding=str(kv_sh.spec),
                                     implementation=model_config.attention, value=float(value))
        programs["attention"]["hlo"] = hlo_summary(compiled, devices)
        log(f"attention fwd+bwd {programs['attention']['best_s']:.3f} s (compile {compile_s:.1f} s)")

    for p in programs.values():
        p["us_per_token"] = 1e6 * p["best_s"] / tokens
        p["tokens_per_s"] = tokens / p["best_s"]
    programs["vit"]["us_per_patch"] = 1e6 * programs["vit"]["best_s"] / (S * V)
    out["programs"] = programs
    out["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    out["jax"] = jax.__version__
    return out


# ----------------------------------------------------------------------------------------------------- the parent
def run_child(args, devices: int, mesh: str, shards: int | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, os.path.abspath(__file__), "--child-devices", str(devices), "--mesh", mesh,
           "--child-out", path, "--rows", str(args.rows), "--length", str(args.length), "--repeats",
           str(args.repeats), "--warmup", str(args.warmup), "--records", str(args.records)]
    if shards is not None:
        cmd += ["--shards", str(shards)]
    log(f"running {devices} device(s), mesh {mesh}" + (f", batch of {shards} shards" if shards else ""))
    t = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(path) as f:
        result = json.load(f)
    os.unlink(path)
    result["process_wall_s"] = round(time.perf_counter() - t, 1)
    return result


def summarize(runs: dict) -> list[dict]:
    rows = []
    for mesh, pair in runs.items():
        many, one = pair[str(DEVICES)], pair["1"]
        for name in PROGRAMS:
            a, b = many["programs"][name], one["programs"][name]
            hlo = a.get("hlo", {})
            gather = hlo.get("largest_all_gather")
            flops = lambda run: run["programs"][name]["hlo"]["dot_flops_per_device"]["flops"]
            rows.append(dict(
                mesh=mesh, program=name, tokens=many["tokens"], s_8=a["best_s"], s_1=b["best_s"],
                ratio=a["best_s"] / b["best_s"], cpu_s_8=a["cpu_best_s"], cpu_s_1=b["cpu_best_s"],
                cpu_ratio=a["cpu_best_s"] / b["cpu_best_s"], tokens_per_s_8=a["tokens_per_s"],
                tokens_per_s_1=b["tokens_per_s"],
                us_per_token_8=a["us_per_token"], us_per_token_1=b["us_per_token"], compile_s_8=a["compile_s"],
                compile_s_1=b["compile_s"], cpu_use_8=a["cpu_use"], cpu_use_1=b["cpu_use"],
                dot_flops_8x_over_1=DEVICES * flops(many) / flops(one) if flops(one) else None,
                collectives={k: v["count"] for k, v in hlo.get("collectives", {}).items() if v["count"]},
                largest_all_gather_bytes=gather["bytes"] if gather else 0,
                largest_all_gather=(gather["arrays"], gather["op_name"]) if gather else None))
    return rows


def print_table(results):
    print(f"\nscaling: {DEVICES} fake CPU devices vs 1, same global batch ({results['sizes']}); ratio goal <= 1.3")
    print(f"{'mesh':24s} {'program':11s} {'8-dev s':>8s} {'1-dev s':>8s} {'ratio':>6s} {'CPU-s 8/1':>12s} {'ratio':>6s} "
          f"{'8-dev tok/s':>11s} {'1-dev tok/s':>11s} {'compile 8/1 s':>14s} {'cpu 8/1':>8s} {'8·flops/1':>9s}  "
          "collectives (8-dev); largest all-gather")
    for r in results["table"]:
        coll = ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "none"
        flops_ratio = "-" if r["dot_flops_8x_over_1"] is None else f"{r['dot_flops_8x_over_1']:.2f}"
        print(f"{r['mesh']:24s} {r['program']:11s} {r['s_8']:8.3f} {r['s_1']:8.3f} {r['ratio']:6.2f} "
              f"{r['cpu_s_8']:5.2f}/{r['cpu_s_1']:<6.2f} {r['cpu_ratio']:6.2f} {r['tokens_per_s_8']:11.0f} "
              f"{r['tokens_per_s_1']:11.0f} {r['compile_s_8']:6.1f}/{r['compile_s_1']:<6.1f} "
              f"{r['cpu_use_8']:.2f}/{r['cpu_use_1']:.2f} {flops_ratio:>9s}  "
              f"{coll}; {r['largest_all_gather_bytes'] / 1e3:.1f} kB")


def write(results: dict, out: str):
    """bench/forward.py's results writer (peak RSS, run time, load average, the table, the JSON) when it imports;
    it pulls in torch and transformers, so a plain json.dump stands in where they are missing."""
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import forward as fw
    except ImportError:
        results["total_runtime_s"] = round(time.perf_counter() - T0, 1)
        results["machine"]["loadavg_at_end"] = os.getloadavg()
        print_table(results)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        log(f"wrote {out}")
        return
    fw.write_results(results, out, T0, print_table)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", default=";".join(MESHES), help="';'-separated mesh specs of 8 devices")
    parser.add_argument("--rows", type=int, default=8, help="global batch rows")
    parser.add_argument("--length", type=int, default=1280, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--records", type=int, default=64, help="synthetic records the pipeline reads from")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "scaling.json"))
    parser.add_argument("--child-devices", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--mesh", help=argparse.SUPPRESS)
    parser.add_argument("--shards", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_devices:
        result = child(args)
        with open(args.child_out, "w") as f:
            json.dump(result, f)
        return

    runs = {}
    for mesh in [m.strip() for m in args.meshes.split(";") if m.strip()]:
        many = run_child(args, DEVICES, mesh, None)
        one = run_child(args, 1, mesh, many["shards"])
        runs[mesh] = {str(DEVICES): many, "1": one}
        if many["batch_fingerprint"] != one["batch_fingerprint"]:
            raise SystemExit(f"mesh {mesh}: the 8-device and 1-device runs built different batches "
                             f"({many['batch_fingerprint']} vs {one['batch_fingerprint']})")
    results = dict(
        sizes=f"{args.rows} rows x {args.length} tokens, packed, 448² images, vision {args.rows * PATCHES_PER_ROW} "
              "patch rows, demo model at width 64",
        config=dict(rows=args.rows, length=args.length, vision_rows=args.rows * PATCHES_PER_ROW, image_px=448,
                    records=args.records, repeats=args.repeats, warmup=args.warmup, devices=DEVICES,
                    model="configs/demo_cpu.py, text hidden 64 (mrope (2,3,3)), vision embed_dim/hidden_size 64"),
        machine=dict(cpus=os.cpu_count(), machine=platform.machine(), nproc=os.environ.get("NPROC"),
                     loadavg_at_start=getattr(main, "load0", None)),
        runs=runs, table=summarize(runs))
    results["max_ratio"] = max(r["ratio"] for r in results["table"])
    results["children_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2)
    write(results, args.out)


if __name__ == "__main__":
    main.load0 = os.getloadavg()
    main()

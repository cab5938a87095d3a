"""One run on a lent accelerator (GPU or TPU): the 2B bf16 train step, decode against the HBM roofline, and the
accelerator's attention kernel against the XLA path on a packed ViT batch.

    python bench/device.py --out $OUT/device.json          # on the lent machine, inside one 10-minute device call
    nice -n 10 python bench/device.py --quick --out /tmp/device_smoke.json   # CPU smoke: tiny preset, < 2 min

Random weights of the preset (`qwen2vl_jax.model.init_params`, created on the device: nothing is downloaded). Every
figure comes from the library's own programs; nothing here re-implements a loop:

0. `hbm`: the backend, device kind and its spec sheet (peak dense bf16 FLOP/s, HBM bytes/s: TPUs' peaks from
   `sharding.flops.CHIPS`, the GPUs' and every HBM bandwidth from the table below), and a measured HBM read
   bandwidth (a jitted float32-accumulating sum over a large bf16 array, best of 5).
1. `attention`: the packed ViT layer's attention op alone, `qwen2vl_jax.attention.dot_product_attention` on one row
   of `--vit-images` images of `--vit-image-size`² (sixteen 448² images: 16 × 1024 = 16384 rows, segment id per
   image, not causal; 16 heads × 80, bf16 — the 2B ViT's shape), forward and forward + backward (grads of q, k, v),
   for implementation "auto" (what the model runs here: splash on TPU, cuDNN on GPU, named in the JSON) and "xla"
   (the blockwise loop), median of `--attn-repeats` calls after a warm-up; ratio = xla / auto, achieved TFLOP/s of
   the useful (same-segment) work 4·H·D·Σnᵢ² (×3.5 for fwd + bwd), and max |auto − xla| of the forward output.
2. `decode`: `qwen2vl_jax.generate` (greedy, no eos stop) at batch 1, 8, 64 (`--decode-batches`) on random
   `--prompt`-token text prompts, `--new-tokens` new tokens, bf16 weights and compute, Ladders fitting the input
   exactly; a `Timeline` gives the decode phase: tok/s = B · (steps − 1) / decode s (the prefill makes the first
   token), as bench/generate.py reads it. Roofline per step: bytes read = the LLM's weights (the tied embedding once,
   as the LM head; an untied input embedding is only gathered and not counted) + the KV cache the step attends
   over (layers · B · 2 · Hkv · cache slots · head_dim · 2 bytes); roofline tok/s = B · bandwidth / bytes, for the
   spec and the measured bandwidth.
3. `train`: `training.step.jit_train_step` (AdamW from `make_optimizer`, state in `state_shardings`, scanned layers,
   remat `--remat`, bf16 compute over `--param-dtype` master weights, attention "auto") on a one-chip mesh
   (`--chips` to use more), batch `--train-batch` × `--train-seq` tokens with one `--image-size`² image per
   sample (the layout `sharding.plan.abstract_batch` describes, built with `prepare_inputs(vision_shards=…)` and
   `data_pipeline.batching.loss_positions` as the pipeline does). Compile time, median step time of
   `--train-steps` after `--train-warmup`, tokens/s, and MFU = `sharding.flops.model_flops` (text + LM head at the
   selected positions + ViT + attention, no remat counted) / (step time · peak · chips); also the hardware-FLOP
   utilisation (`hardware_flops`: remat's recompute counted). Out of memory: the batch is halved and retried
   while time is left (each failure recorded).

Sections run in the order attention, decode, train, each until its soft deadline (a share of `--budget` seconds,
default 420 so the run fits a 10-minute device call with start-up): a measurement that does not fit is skipped and
the JSON says so; timing loops stop early when their deadline passes (at least one timed call). Every measurement
sits in its own try/except that records the error and goes on; progress lines are printed with flush, and the JSON
is rewritten after every measurement, so a killed run keeps what it finished. On CPU (`--quick`: the "tiny" preset
and tiny sizes) the numbers only prove the script runs end to end; the JSON says so.
"""
from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")  # GPU: the 2B train step needs most of the HBM

import argparse  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

T0 = time.perf_counter()

# device_kind substring (lower case, first match wins) → spec. peak: dense bf16 FLOP/s; hbm_bw: bytes/s.
# NVIDIA datasheets: H100 SXM 989 TFLOP/s, 3.35 TB/s; H100 PCIe 756 TFLOP/s, 2.0 TB/s; H100 NVL 835 TFLOP/s,
# 3.9 TB/s; H200 989 TFLOP/s, 4.8 TB/s; A100 SXM 80GB 312 TFLOP/s, 2.039 TB/s. Cloud TPU docs: HBM bandwidth v5e
# 819 GB/s, v5p 2765 GB/s, v6e 1640 GB/s, v4 1200 GB/s; TPU peaks from sharding.flops.CHIPS.
GPU_SPECS = [
    ("h100 pcie", dict(chip="H100 PCIe", peak_flops=756e12, hbm_bw=2.0e12)),
    ("h100 nvl", dict(chip="H100 NVL", peak_flops=835e12, hbm_bw=3.9e12)),
    ("h100", dict(chip="H100 SXM", peak_flops=989e12, hbm_bw=3.35e12)),
    ("h200", dict(chip="H200", peak_flops=989e12, hbm_bw=4.8e12)),
    ("a100", dict(chip="A100 SXM", peak_flops=312e12, hbm_bw=2.039e12)),
]
TPU_KINDS = [("v5 lite", "v5e"), ("v5e", "v5e"), ("v5p", "v5p"), ("v5", "v5p"), ("v6 lite", "v6e"), ("v6e", "v6e"),
             ("v4", "v4")]
TPU_HBM_BW = {"v5e": 819e9, "v5p": 2765e9, "v6e": 1640e9, "v4": 1200e9}

RESULTS: dict = {}
OUT = ""


def log(msg: str) -> None:
    print(f"[device {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def save() -> None:
    """Rewrite the JSON (after every measurement: a killed run keeps what it finished)."""
    RESULTS["elapsed_s"] = round(time.perf_counter() - T0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(OUT)), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    os.replace(tmp, OUT)


def attempt(section: dict, key: str, fn):
    """Run fn() → its dict into section[key]; an exception is recorded there (type, message, traceback tail) and the
    run goes on. → the result, or None on failure."""
    t = time.perf_counter()
    try:
        out = fn()
        section[key] = out
        return out
    except Exception as e:  # noqa: BLE001  (one failure must not lose the other measurements)
        msg = f"{type(e).__name__}: {e}"
        section[key] = dict(error=msg[:4000], traceback=traceback.format_exc()[-3000:],
                            after_s=round(time.perf_counter() - t, 1))
        log(f"{key}: FAILED {msg[:400]}")
        return None
    finally:
        save()


class Deadline:
    """A soft deadline (seconds since start) for one section."""

    def __init__(self, at: float):
        self.at = at

    def left(self) -> float:
        return self.at - (time.perf_counter() - T0)


def skip(section: dict, key: str, need: float, deadline: Deadline) -> bool:
    """True (and the skip recorded) when fewer than `need` seconds are left before the deadline."""
    if deadline.left() >= need:
        return False
    section[key] = dict(skipped=f"not enough time left: {deadline.left():.0f} s before this section's deadline, "
                                f"~{need:.0f} s needed (raise --budget)")
    log(f"{key}: skipped ({section[key]['skipped']})")
    save()
    return True


def timed(fn, repeats: int, warmup: int, deadline: Deadline) -> dict:
    """fn() blocks until done. `warmup` untimed calls, then up to `repeats` timed ones (stopping early, after at
    least one, when the deadline passes). → median/min seconds and the times."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if deadline.left() < 0:
            break
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=[round(x, 6) for x in times],
                repeats_done=len(times), repeats_asked=repeats)


# ---------------------------------------------------------------------------------------------------- machine / hbm
def chip_spec(device) -> dict:
    """Spec sheet for the device: chip name, peak dense bf16 FLOP/s, HBM bytes/s (None where unknown)."""
    kind = device.device_kind.lower()
    if device.platform == "gpu":
        for key, spec in GPU_SPECS:
            if key in kind:
                return dict(spec, source="NVIDIA datasheet (dense bf16, no sparsity)")
    if device.platform == "tpu":
        from sharding.flops import CHIPS

        for key, chip in TPU_KINDS:
            if key in kind:
                return dict(chip=chip, peak_flops=CHIPS[chip]["peak_flops"], hbm_bw=TPU_HBM_BW[chip],
                            source="sharding.flops.CHIPS (peak), Cloud TPU docs (HBM bandwidth)")
    return dict(chip=device.device_kind, peak_flops=None, hbm_bw=None,
                source="no spec for this device: MFU and the spec roofline are not computed")


def measure_hbm(gib: float) -> dict:
    """HBM read bandwidth: a jitted float32-accumulating sum over a bf16 array of `gib` GiB, best of 5."""
    n = int(gib * 2**30 / 2)
    x = jax.jit(lambda: jnp.ones((n // 4096, 4096), jnp.bfloat16))()
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    nbytes = x.size * 2
    del x
    return dict(bytes=nbytes, best_s=best, read_bytes_per_s=nbytes / best, method="jnp.sum(bf16 array, fp32)")


# ---------------------------------------------------------------------------------------------------- attention
def attention_section(args, deadline: Deadline) -> dict:
    from qwen2vl_jax.attention import dot_product_attention, resolve_implementation

    sec = RESULTS.setdefault("attention", {})
    side = args.vit_image_size // 14
    n = side * side  # patches per image
    rows, heads, dim = args.vit_images * n, args.vit_heads, args.vit_head_dim
    dtype = jnp.bfloat16
    auto = resolve_implementation("auto", dtype)
    sec.update(shape=dict(images=args.vit_images, image=f"{args.vit_image_size}x{args.vit_image_size}",
                          rows=rows, patches_per_image=n, heads=heads, head_dim=dim, dtype="bfloat16",
                          layout="[1, rows, heads, head_dim], one segment id per image, not causal"),
               auto_resolves_to=auto)
    if auto == "xla":
        sec["note"] = "auto resolves to xla on this backend: both columns run the same program"
    useful_fwd = 4.0 * heads * dim * args.vit_images * n * n  # QKᵀ + PV over same-segment pairs, 2 FLOPs per MAC
    sec["useful_flops"] = dict(forward=useful_fwd, forward_backward=3.5 * useful_fwd)
    rng = np.random.default_rng(0)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((1, rows, heads, dim), np.float32), dtype) for _ in range(4))
    seg = jnp.asarray(np.repeat(np.arange(args.vit_images, dtype=np.int32), n)[None])
    outputs = {}
    for impl in ("auto", "xla"):
        fwd = jax.jit(lambda q, k, v, s, impl=impl: dot_product_attention(q, k, v, segment_ids=s,
                                                                          implementation=impl))

        def loss(q, k, v, s, ct, impl=impl):
            o = dot_product_attention(q, k, v, segment_ids=s, implementation=impl)
            return jnp.sum(o.astype(jnp.float32) * ct.astype(jnp.float32))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        for mode, fn, fargs, flops in (("forward", fwd, (q, k, v, seg), useful_fwd),
                                       ("forward_backward", grad, (q, k, v, seg, ct), 3.5 * useful_fwd)):
            key = f"{impl}/{mode}"
            if skip(sec, key, args.attention_need_s, deadline):
                continue

            def run(fn=fn, fargs=fargs, flops=flops, key=key, mode=mode, impl=impl):
                t = time.perf_counter()
                compiled = fn.lower(*fargs).compile()
                compile_s = time.perf_counter() - t
                out = compiled(*fargs)
                jax.block_until_ready(out)
                if mode == "forward":
                    outputs[impl] = np.asarray(out.astype(jnp.float32))
                r = timed(lambda: jax.block_until_ready(compiled(*fargs)), args.attn_repeats, 1, deadline)
                r.update(compile_s=compile_s, implementation=auto if impl == "auto" else impl,
                         useful_tflop_s=flops / r["median_s"] / 1e12)
                log(f"attention {key} ({r['implementation']}): {1e3 * r['median_s']:.3f} ms, "
                    f"{r['useful_tflop_s']:.2f} useful TFLOP/s (compile {compile_s:.1f} s)")
                return r

            attempt(sec, key, run)
    ratios = {}
    for mode in ("forward", "forward_backward"):
        a, x = sec.get(f"auto/{mode}", {}), sec.get(f"xla/{mode}", {})
        if "median_s" in a and "median_s" in x:
            ratios[f"{mode}_xla_over_auto"] = x["median_s"] / a["median_s"]
    if len(outputs) == 2:
        ratios["forward_max_abs_diff_auto_vs_xla"] = float(np.max(np.abs(outputs["auto"] - outputs["xla"])))
    sec["ratios"] = ratios
    log(f"attention ratios: {json.dumps({k: round(v, 4) for k, v in ratios.items()})}")
    save()
    return sec


# ---------------------------------------------------------------------------------------------------- decode
def decode_section(args, cfg, spec: dict, measured_bw: float | None, deadline: Deadline) -> dict:
    import flax.linen as nn  # noqa: F401  (flax before the model, as the library imports it)

    import qwen2vl_jax
    from qwen2vl_jax.buckets import Ladders
    from qwen2vl_jax.generation import Timeline
    from qwen2vl_jax.model import init_params

    sec = RESULTS.setdefault("decode", {})
    cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    tc = cfg.text
    itemsize = 2
    sec.update(model=f"{args.preset} preset, random bf16 weights, bf16 compute, attention {cfg.attention}",
               prompt_tokens=args.prompt, new_tokens=args.new_tokens, prompt="random text tokens, no image",
               decoding="greedy, eos_token_ids=[] (never stops early)",
               tok_s="B · (steps − 1) / decode-phase seconds (Timeline; the prefill makes the first token)")
    t0 = time.perf_counter()
    params = init_params(cfg, 0)
    jax.block_until_ready(params)
    llm = params["language_model"]
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(llm))
    if "lm_head" in llm:  # untied: the input embedding is gathered (B rows), not read whole
        weight_bytes -= sum(x.nbytes for x in jax.tree_util.tree_leaves(llm["embed_tokens"]))
    sec.update(init_s=time.perf_counter() - t0, llm_weight_bytes_read_per_step=weight_bytes,
               hbm_bw_spec=spec.get("hbm_bw"), hbm_bw_measured=measured_bw)
    log(f"decode: {args.preset} bf16 params ready ({weight_bytes / 1e9:.2f} GB of LLM weights read per step)")
    rng = np.random.default_rng(0)
    cache = args.prompt + args.new_tokens
    for b in args.decode_batches:
        key = f"b{b}"
        if skip(sec, key, args.decode_need_s, deadline):
            continue

        def run(b=b):
            ids = rng.integers(0, 151000, (b, args.prompt)).astype(np.int64)
            batch = dict(input_ids=ids, attention_mask=np.ones_like(ids))
            ladders = Ladders(batch=(b,), length=(args.prompt,), cache=(cache,))
            call = functools.partial(qwen2vl_jax.generate, cfg, params, batch, max_new_tokens=args.new_tokens,
                                     eos_token_ids=[], ladders=ladders)
            t = time.perf_counter()
            call()
            first_s = time.perf_counter() - t
            reps = []
            for _ in range(args.decode_repeats):
                tl = Timeline()
                call(timeline=tl)
                loop = tl.steps[-1] - 1
                reps.append(dict(decode_s=tl.seconds("decode"), prefill_s=tl.seconds("prefill"),
                                 prepare_s=tl.seconds("prepare"), fetch_s=tl.seconds("fetch"), loop_steps=loop,
                                 tok_s=b * loop / tl.seconds("decode")))
                if deadline.left() < 0:
                    break
            med = {k: statistics.median(r[k] for r in reps) for k in reps[0]}
            kv_bytes = tc.num_hidden_layers * b * 2 * tc.num_key_value_heads * cache * tc.head_dim * itemsize
            step_bytes = weight_bytes + kv_bytes
            out = dict(batch=b, cache_slots=cache, first_call_s=first_s, **med, repeats=reps,
                       step_ms=1e3 * med["decode_s"] / med["loop_steps"], kv_cache_bytes_read_per_step=kv_bytes,
                       bytes_read_per_step=step_bytes)
            for name, bw in (("spec", spec.get("hbm_bw")), ("measured", measured_bw)):
                if bw:
                    out[f"roofline_tok_s_{name}_bw"] = b * bw / step_bytes
                    out[f"pct_of_roofline_{name}_bw"] = 100 * med["tok_s"] / out[f"roofline_tok_s_{name}_bw"]
            pct = out.get("pct_of_roofline_spec_bw", out.get("pct_of_roofline_measured_bw"))
            log(f"decode b{b}: {med['tok_s']:.1f} tok/s, {out['step_ms']:.2f} ms/step"
                + (f", {pct:.1f} % of the HBM roofline" if pct is not None else "")
                + f" (first call {first_s:.1f} s)")
            return out

        attempt(sec, key, run)
    del params, llm
    gc.collect()
    return sec


# ---------------------------------------------------------------------------------------------------- train
def train_batch(cfg, batch: int, seq: int, image_size: int, shards: int, seed: int = 0) -> tuple[dict, int]:
    """→ (a training batch in the step's layout (sharding.plan.abstract_batch), ViT patches per sample). Each row:
    one `image_size`² image (<vision_start> placeholders <vision_end>), then random text to `seq` tokens; labels on
    every text token; the ViT packed per batch shard; loss_index / loss_targets as data_pipeline.batching's
    loss_positions builds them."""
    from data_pipeline.batching import BatchLayout, loss_positions
    from qwen2vl_jax.inputs import gather_vision_pixels, prepare_inputs
    from training.step import IGNORE

    merge = cfg.vision.spatial_merge_size
    side = image_size // cfg.vision.patch_size
    side -= side % merge
    patches, tokens = side * side, side * side // merge**2
    if tokens + 2 >= seq:
        raise ValueError(f"a {image_size}² image ({tokens} tokens) does not fit a {seq}-token row")
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.full((batch, 1), cfg.vision_start_token_id), np.full((batch, tokens), cfg.image_token_id),
                          np.full((batch, 1), cfg.vision_end_token_id),
                          rng.integers(0, 151000, (batch, seq - tokens - 2))], axis=1).astype(np.int32)
    mask = np.ones_like(ids)
    grids = np.array([[1, side, side]] * batch, np.int64)
    pixels = rng.standard_normal((batch * patches, cfg.vision.patch_dim)).astype(np.float32)
    prepared = prepare_inputs(cfg, ids, mask, grids, image_rows=len(pixels), vision_shards=shards)
    rows = prepared.pop("vision_rows")
    labels = np.where(ids == cfg.image_token_id, IGNORE, ids).astype(np.int32)
    out = {"input_ids": ids, "labels": labels,
           "prepared": {k: prepared[k] for k in ("attention_mask", "position_ids", "splice_index", "vision_pos_hw",
                                                 "vision_segment_ids")},
           "vision_pixels": gather_vision_pixels(pixels, rows).astype(jnp.dtype(cfg.dtype))}
    out.update(loss_positions(labels, mask, BatchLayout.loss_fractions))
    return out, patches


def train_section(args, cfg, spec: dict, deadline: Deadline) -> dict:
    import flax.linen as nn  # noqa: F401

    from qwen2vl_jax.model import init_params
    from sharding.flops import hardware_flops, model_flops
    from sharding.mesh import make_mesh
    from sharding.plan import abstract_batch
    from sharding.rules import batch_shard_count, batch_shardings, param_shardings
    from training.step import init_state, jit_train_step, make_optimizer, state_shardings

    sec = RESULTS.setdefault("train", {})
    cfg = cfg.replace(scan_layers=True, remat=args.remat, dtype="bfloat16", param_dtype=args.param_dtype)
    chips = min(args.chips, len(jax.devices()))
    mesh = make_mesh("fsdp=-1", devices=jax.devices()[:chips])
    shards = batch_shard_count(mesh)
    sec.update(model=f"{args.preset} preset, random weights, bf16 compute, {args.param_dtype} master weights, "
                     f"scan_layers, remat {args.remat}, attention {cfg.attention}",
               optimizer="training.step.make_optimizer(1e-5, warmup_steps=10, total_steps=1000): clip + AdamW",
               chips=chips, mesh=dict(mesh.shape), peak_flops_per_chip=spec.get("peak_flops"))
    optimizer = make_optimizer(1e-5, warmup_steps=10, total_steps=1000)
    batch, tries = args.train_batch, 0
    while batch >= 1:
        key = f"b{batch}x{args.train_seq}"
        if batch % shards:
            sec[key] = dict(skipped=f"batch {batch} does not split over {shards} batch shards")
            break
        if skip(sec, key, args.train_need_s, deadline):
            break
        tries += 1

        def run(batch=batch):
            host, patches = train_batch(cfg, batch, args.train_seq, args.image_size, shards)
            layout = jax.tree_util.tree_structure(abstract_batch(cfg, batch, args.train_seq, patches, shards,
                                                                 args.train_seq // host["loss_index"].shape[1]))
            assert jax.tree_util.tree_structure(host) == layout, "batch layout differs from sharding.plan's"
            b_sh = batch_shardings(host, mesh)
            with jax.set_mesh(mesh):
                t = time.perf_counter()
                params = init_params(cfg, 0, param_shardings(cfg, mesh))
                st_sh = state_shardings(cfg, optimizer, mesh)
                state = jax.jit(functools.partial(init_state, optimizer=optimizer), out_shardings=st_sh)(params)
                del params
                placed = jax.tree_util.tree_map(jax.device_put, host, b_sh)
                jax.block_until_ready((state, placed))
                init_s = time.perf_counter() - t
                step = jit_train_step(cfg, optimizer, mesh, st_sh, b_sh)
                t = time.perf_counter()
                compiled = step.lower(state, placed).compile()
                compile_s = time.perf_counter() - t
                log(f"train {key}: state + batch on device in {init_s:.1f} s, compiled in {compile_s:.1f} s")
                losses = []

                def one():
                    nonlocal state
                    state, m = compiled(state, placed)
                    losses.append(float(m["loss"]))  # blocks until the step is done

                r = timed(one, args.train_steps, args.train_warmup, deadline)
                memory = compiled.memory_analysis()
                stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}
                del state, compiled, placed
            tokens = batch * args.train_seq
            head = int(host["loss_index"].size)
            flops = model_flops(cfg, batch, args.train_seq, patches, head_positions=head)
            hw = hardware_flops(flops, args.remat)
            out = dict(batch=batch, seq=args.train_seq, tokens=tokens, image=f"{args.image_size}²",
                       vit_patches_per_sample=patches, lm_head_positions=head, init_s=init_s, compile_s=compile_s,
                       step_s=r["median_s"], step_min_s=r["min_s"], step_times_s=r["times_s"],
                       steps_timed=r["repeats_done"], tokens_per_s=tokens / r["median_s"],
                       tokens_per_s_per_chip=tokens / r["median_s"] / chips, losses=losses,
                       model_flops=flops, hardware_flops=hw,
                       xla_memory=dict(arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                                       aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes),
                       device_peak_bytes_in_use=stats.get("peak_bytes_in_use"),
                       device_bytes_limit=stats.get("bytes_limit"))
            if spec.get("peak_flops"):
                out["mfu"] = flops["total"] / (r["median_s"] * spec["peak_flops"] * chips)
                out["hfu"] = hw / (r["median_s"] * spec["peak_flops"] * chips)
            log(f"train {key}: {r['median_s']:.3f} s/step, {out['tokens_per_s']:.0f} tok/s"
                + (f", MFU {100 * out['mfu']:.1f} % (HFU {100 * out['hfu']:.1f} %)" if "mfu" in out else "")
                + f", loss {losses[0]:.3f} → {losses[-1]:.3f}")
            return out

        out = attempt(sec, key, run)
        gc.collect()
        if out is not None:
            sec["headline"] = key
            break
        error = sec[key].get("error", "")
        if not any(s in error for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")):
            break
        batch //= 2
        log(f"train: out of memory, retrying with batch {batch}")
    save()
    return sec


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    global OUT
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="2b")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "device.json"))
    p.add_argument("--quick", action="store_true", help="CPU smoke: tiny preset and sizes, < 2 minutes")
    p.add_argument("--budget", type=float, default=None, help="total seconds (default 420; --quick 100)")
    p.add_argument("--sections", default="attention,decode,train")
    p.add_argument("--hbm-gib", type=float, default=None, help="array size of the bandwidth probe (default 4)")
    # attention
    p.add_argument("--vit-images", type=int, default=None, help="images packed in one row (default 16)")
    p.add_argument("--vit-image-size", type=int, default=None, help="pixels per side (default 448)")
    p.add_argument("--vit-heads", type=int, default=16)
    p.add_argument("--vit-head-dim", type=int, default=80)
    p.add_argument("--attn-repeats", type=int, default=20)
    # decode
    p.add_argument("--decode-batches", default=None, help="default 1,8,64")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 128")
    p.add_argument("--decode-repeats", type=int, default=3)
    # train
    p.add_argument("--train-batch", type=int, default=None, help="default 8 (halved on out-of-memory)")
    p.add_argument("--train-seq", type=int, default=None, help="default 2048")
    p.add_argument("--image-size", type=int, default=None, help="one image per sample, pixels per side (448)")
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--train-warmup", type=int, default=2)
    p.add_argument("--param-dtype", default="float32", help="master weights (compute is bf16)")
    p.add_argument("--remat", default="full")
    p.add_argument("--chips", type=int, default=1, help="devices in the train mesh (fsdp over them)")
    args = p.parse_args(argv)
    big = dict(budget=420.0, hbm_gib=4.0, vit_images=16, vit_image_size=448, decode_batches="1,8,64", prompt=512,
               new_tokens=128, train_batch=8, train_seq=2048, image_size=448)
    tiny = dict(budget=90.0, hbm_gib=0.0625, vit_images=4, vit_image_size=112, decode_batches="1,8", prompt=32,
                new_tokens=8, train_batch=2, train_seq=128, image_size=56)
    for k, v in (tiny if args.quick else big).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.preset = "tiny"
        args.attn_repeats, args.decode_repeats = min(args.attn_repeats, 3), min(args.decode_repeats, 2)
        args.train_steps, args.train_warmup = min(args.train_steps, 3), min(args.train_warmup, 1)
    args.decode_batches = [int(b) for b in str(args.decode_batches).split(",")]
    # rough seconds a measurement needs to start (compile + a few calls): below this it is skipped
    args.attention_need_s = 2 if args.quick else 10
    args.decode_need_s = 8 if args.quick else 30
    args.train_need_s = 15 if args.quick else 90
    OUT = args.out

    from qwen2vl_jax import Qwen2VLConfig

    cfg = Qwen2VLConfig.preset(args.preset)
    device = jax.devices()[0]
    spec = chip_spec(device)
    backend = jax.default_backend()
    RESULTS.update(
        bench="device", preset=args.preset, quick=args.quick, argv=sys.argv[1:],
        backend=backend, device_kind=device.device_kind, device_count=len(jax.devices()), spec=spec,
        versions=dict(jax=jax.__version__, jaxlib=__import__("jaxlib").__version__,
                      flax=__import__("flax").__version__, python=platform.python_version()),
        settings={k: v for k, v in vars(args).items() if k != "out"},
        started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if backend == "cpu":
        RESULTS["note"] = ("CPU run: a smoke test that every section runs end to end; the numbers mean nothing "
                           "about an accelerator (no spec peak, auto attention = xla)")
    log(f"backend {backend}, {len(jax.devices())} × {device.device_kind}; spec {spec}; preset {args.preset}; "
        f"budget {args.budget:.0f} s")
    save()

    hbm = RESULTS.setdefault("hbm", {})
    attempt(hbm, "measured", lambda: measure_hbm(args.hbm_gib))
    measured_bw = hbm["measured"].get("read_bytes_per_s")
    if measured_bw:
        log(f"HBM read bandwidth measured {measured_bw / 1e9:.0f} GB/s"
            + (f" (spec {spec['hbm_bw'] / 1e9:.0f} GB/s)" if spec.get("hbm_bw") else ""))

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    # soft deadlines: cumulative shares of the budget, in the order given (train, run last by default, gets the rest)
    shares = {"attention": 0.15, "decode": 0.35, "train": 0.5}
    used = time.perf_counter() - T0
    total_share = sum(shares.get(s, 0.2) for s in sections)
    at = used
    for name in sections:
        at += (args.budget - used) * shares.get(name, 0.2) / total_share
        deadline = Deadline(at if name != sections[-1] else args.budget)
        log(f"section {name}: until {deadline.at:.0f} s")
        fn = dict(attention=lambda: attention_section(args, deadline),
                  decode=lambda: decode_section(args, cfg, spec, measured_bw, deadline),
                  train=lambda: train_section(args, cfg, spec, deadline)).get(name)
        if fn is None:
            RESULTS.setdefault("errors", []).append(f"unknown section {name!r}")
            continue
        try:
            fn()
        except Exception as e:  # noqa: BLE001  (set-up failure of a whole section: record, go on)
            RESULTS.setdefault(name, {})["section_error"] = f"{type(e).__name__}: {e}"[:4000]
            RESULTS[name]["section_traceback"] = traceback.format_exc()[-3000:]
            log(f"section {name}: FAILED {type(e).__name__}: {str(e)[:400]}")
        gc.collect()
        save()

    RESULTS["summary"] = summary()
    save()
    log("summary: " + json.dumps(RESULTS["summary"]))
    log(f"done in {time.perf_counter() - T0:.1f} s → {OUT}")
    return RESULTS


def summary() -> dict:
    """The headline figures in one flat dict."""
    out = {}
    train = RESULTS.get("train", {})
    head = train.get(train.get("headline", ""), {})
    for k in ("batch", "step_s", "tokens_per_s", "mfu", "hfu", "compile_s"):
        if k in head:
            out[f"train_{k}"] = head[k]
    for key, r in RESULTS.get("decode", {}).items():
        if isinstance(r, dict) and "tok_s" in r:
            out[f"decode_{key}_tok_s"] = r["tok_s"]
            for name in ("spec", "measured"):
                if f"pct_of_roofline_{name}_bw" in r:
                    out[f"decode_{key}_pct_roofline_{name}"] = r[f"pct_of_roofline_{name}_bw"]
    att = RESULTS.get("attention", {})
    out.update({f"attention_{k}": v for k, v in att.get("ratios", {}).items()})
    if "auto_resolves_to" in att:
        out["attention_auto"] = att["auto_resolves_to"]
    failed = [f"{s}/{k}" for s in ("hbm", "attention", "decode", "train")
              for k, v in RESULTS.get(s, {}).items() if isinstance(v, dict) and "error" in v]
    skipped = [f"{s}/{k}" for s in ("attention", "decode", "train")
               for k, v in RESULTS.get(s, {}).items() if isinstance(v, dict) and "skipped" in v]
    out.update(failed=failed, skipped=skipped)
    return out


if __name__ == "__main__":
    main()

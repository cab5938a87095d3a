"""Forward-pass speed of the 2B model on the CPU: qwen2vl-jax vs transformers, same random weights, 2 threads each.

One run measures, for one 448×448 image (grid (1, 32, 32): 1024 patches → 256 LLM tokens) in a ChatML-like prompt
with 64 text tokens (322 tokens in all), batch 1:

1. ViT alone (transformers `model.model.visual(pixel_values, grid_thw)`, ours jitted `Qwen2VL.encode_vision`) and
   the full forward to logits (transformers `model(...)`, ours jitted `Qwen2VL.forward`; `prepare_inputs` runs outside
   the timed call), median of `--repeats` calls after one warm-up call, for
   - float32 (both; transformers and ours calls alternate, so load from other processes hits both alike),
   - bfloat16 (both; ours: dtype = param_dtype = bfloat16),
   - ours with bfloat16 params and float32 compute (param_dtype bfloat16, dtype float32; no transformers
     counterpart, so compared with both of its timings),
   - ours with scan_layers=True (bfloat16 params; runtime cost of the scanned layout).
   Ratio = transformers time / ours time (> 1: ours is faster). LLM = full − ViT.
2. Compile time (lower + compile wall time) of our full forward, float32, scan_layers False and True; and XLA's
   temp-buffer size of every executable (`compiled.memory_analysis()`).
3. Packing at the ViT level (float32): sixteen 224×224 images (16 × (1, 16, 16), 4096 patch rows, 16 segments) vs one
   896×896 image ((1, 64, 64), 4096 rows), ours and transformers alternating; `--packing-repeats` calls each, no
   warm-up (our executable is compiled beforehand — both layouts share it —; a call takes 30–60 s).
4. Max |logits difference| ours float32 vs transformers float32 on the bench input.

Threads: torch.set_num_threads(2) (+ OMP/MKL_NUM_THREADS=2). XLA:CPU runs a jitted computation on its Eigen intra-op
thread pool, whose size is xla::DefaultThreadPoolSize(): the NPROC environment variable when set, otherwise the
number of CPUs the process may be scheduled on (sched_getaffinity). So NPROC=2 is set before importing jax (the bench
counts the pool's `tf_XLAEigen` threads to prove it). XLA_FLAGS has no thread-count flag (`intra_op_parallelism_threads`
is not an XLA flag; `--xla_cpu_multi_thread_eigen` only switches Eigen's own multi-threading in a few ops).

transformers bfloat16 on a CPU without AVX512-BF16/AMX runs ~5× slower than its float32, so its bfloat16 timings use
`--torch-bf16-repeats` calls (default 1) and no warm-up call.

Every timing records `cpu_use` = process CPU seconds / wall seconds over its timed calls: ≈ 2 when both cores worked
for this process, lower when another process competed for them (then the time is inflated by about 2 / cpu_use).

Memory: at most two copies of the 2B weights (float32 torch + float32 ours ≈ 17.6 GB during the float32 phase; then
the torch model is cast to bfloat16 in place, measured, and freed; then ours is cast one tensor at a time). Our
bfloat16 executables need ~8 GB of XLA temp buffers (see the JSON), so that phase peaks at ~13 GB.

    python bench/forward.py [--dtypes float32,bfloat16] [--repeats 3] [--packing-repeats 1] [--skip-torch]
                            [--skip-packing] [--skip-scan] [--xla-flags "--xla_cpu_..."]

Writes bench/results/forward.json (`--out`).
"""
import os
import sys

THREADS = 2


def _early_args():
    """--xla-flags must reach XLA_FLAGS before jax is imported."""
    for i, arg in enumerate(sys.argv):
        if arg == "--xla-flags" and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if arg.startswith("--xla-flags="):
            return arg.split("=", 1)[1]
    return None


os.environ["NPROC"] = str(THREADS)  # XLA:CPU intra-op pool size (xla::DefaultThreadPoolSize)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)
if _early_args():
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _early_args()).strip()

import argparse  # noqa: E402
import collections  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(THREADS)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import transformers  # noqa: E402

from qwen2vl_jax import Qwen2VL, Qwen2VLConfig, prepare_inputs  # noqa: E402
from qwen2vl_jax.checkpoint.mapping import params_from_torch  # noqa: E402
from qwen2vl_jax.inputs import vision_layout  # noqa: E402

GRID = (1, 32, 32)  # 448×448
TEXT_BEFORE, TEXT_AFTER = 24, 40  # 64 text tokens
PACKED_GRIDS = [(1, 16, 16)] * 16  # sixteen 224×224
SINGLE_GRID = [(1, 64, 64)]  # one 896×896
IM_START, IM_END, NEWLINE = 151644, 151645, 198
T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def release_memory():
    """gc, then hand freed heap pages back to the OS (glibc keeps freed mid-size blocks otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def xla_pool_threads():
    names = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names[f.read().strip()] += 1
        except OSError:
            pass
    return sum(n for name, n in names.items() if "XLAEigen" in name)


def _entry(times, cpu, warmup):
    return dict(median_s=statistics.median(times), min_s=min(times), times_s=times, warmup_calls=warmup,
                cpu_use=round(sum(cpu) / sum(times), 2), loadavg_1m=os.getloadavg()[0])


def timed(fns, repeats, warmup=1):
    """fns: {name: fn}. Runs each fn `warmup` times, then `repeats` rounds calling each fn once per round
    (alternating, so a load change hits all of them alike). → ({name: timing dict}, {name: last result}).
    cpu_use = process CPU seconds / wall seconds over that fn's timed calls."""
    out = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            out[name] = fn()
    times = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {name: _entry(times[name], cpu[name], warmup) for name in fns}, out


# ----------------------------------------------------------------------------------------------------------- inputs
def bench_inputs(cfg, rng):
    text = lambda n: rng.integers(0, 151000, n).tolist()
    before = [IM_START] + text(TEXT_BEFORE - 4) + [IM_END, NEWLINE, IM_START]
    after = text(TEXT_AFTER - 5) + [IM_END, NEWLINE, IM_START] + text(2)
    tokens = int(np.prod(GRID)) // cfg.vision.spatial_merge_size**2
    ids = before + [cfg.vision_start_token_id] + [cfg.image_token_id] * tokens + [cfg.vision_end_token_id] + after
    assert len(before) + len(after) == TEXT_BEFORE + TEXT_AFTER
    input_ids = np.array([ids], np.int64)
    pixels = rng.standard_normal((int(np.prod(GRID)), cfg.vision.patch_dim)).astype(np.float32)
    return input_ids, np.ones_like(input_ids), pixels, np.array([GRID], np.int64)


# ------------------------------------------------------------------------------------------------------ torch side
def build_torch(cfg, seed):
    """transformers model, float32, eval, sdpa, every tensor redrawn at unit activation scale (as tests/reference.py:
    a zero bias or unit norm would hide nothing here, and logits of tens make the parity figure meaningful)."""
    torch.manual_seed(seed)
    hf_cfg = transformers.Qwen2VLConfig(**cfg.to_hf_dict(), attn_implementation="sdpa")
    model = transformers.Qwen2VLForConditionalGeneration(hf_cfg).eval()
    impls = {model.config._attn_implementation, model.model.visual.config._attn_implementation}
    assert impls == {"sdpa"}, impls
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "norm1.weight" in name or \
                    "norm2.weight" in name or "ln_q.weight" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim >= 2 and "embed_tokens" not in name:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def torch_calls(model, cfg, input_ids, mask, pixels, grid):
    dtype = next(model.parameters()).dtype
    px = torch.from_numpy(pixels).to(dtype)
    grid_t = torch.from_numpy(grid)
    kwargs = dict(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask), pixel_values=px,
                  image_grid_thw=grid_t, use_cache=False,
                  mm_token_type_ids=torch.from_numpy((input_ids == cfg.image_token_id).astype(np.int64)))

    def vit():
        with torch.no_grad():
            return model.model.visual(px, grid_thw=grid_t).pooler_output

    def full():
        with torch.no_grad():
            return model(**kwargs).logits
    return vit, full


def torch_vit_call(model, pixels, grids):
    dtype = next(model.parameters()).dtype
    px, grid_t = torch.from_numpy(pixels).to(dtype), torch.tensor(grids, dtype=torch.int64)

    def vit():
        with torch.no_grad():
            return model.model.visual(px, grid_thw=grid_t).pooler_output
    return vit


# -------------------------------------------------------------------------------------------------------- our side
def compile_timed(fn, *args):
    """jit(fn).lower(*args).compile() → (executable, wall seconds, XLA temp bytes)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    try:
        temp = compiled.memory_analysis().temp_size_in_bytes
    except Exception:  # noqa: BLE001 - not every backend reports it
        temp = None
    return compiled, seconds, temp


def our_fns(cfg):
    model = Qwen2VL(cfg)
    vit = lambda p, px, pos, seg: model.apply({"params": {"visual": p}}, px, pos, seg, method=Qwen2VL.encode_vision)
    fwd = lambda p, ids, prep, px: model.apply({"params": p}, ids, prep, px, method=Qwen2VL.forward)
    return vit, fwd


def abstract(tree):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def abstract_stacked(params, cfg):
    """ShapeDtypeStructs of `stack_layers(params, cfg)` without building it."""
    out = {k: dict(v) for k, v in abstract(params).items()}
    for top, prefix, count in (("language_model", "layers", cfg.text.num_hidden_layers),
                               ("visual", "blocks", cfg.vision.depth)):
        first = out[top][f"{prefix}_0"]
        for i in range(count):
            out[top].pop(f"{prefix}_{i}")
        out[top][prefix] = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((count, *a.shape), a.dtype), first)
    return out


def stack_inplace(params, cfg):
    """`stack_layers` for jax arrays, deleting each layer's buffers once stacked (peak: + one stacked leaf group)."""
    out = {k: dict(v) for k, v in params.items()}
    for top, prefix, count in (("language_model", "layers", cfg.text.num_hidden_layers),
                               ("visual", "blocks", cfg.vision.depth)):
        layers = [out[top].pop(f"{prefix}_{i}") for i in range(count)]
        treedef = jax.tree_util.tree_structure(layers[0])
        columns = zip(*[jax.tree_util.tree_leaves(layer) for layer in layers])
        stacked = []
        for column in columns:
            stacked.append(jnp.stack(column).block_until_ready())
            for a in column:
                a.delete()
        out[top][prefix] = jax.tree_util.tree_unflatten(treedef, stacked)
    return out


def to_jax_params(state, cfg):
    """torch float32 state dict (numpy views) → our params as jax arrays, one tensor at a time."""
    params = params_from_torch(state, cfg)  # mostly views of the torch storage
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), params)


def cast_params_inplace(params, dtype):
    """float32 jax params → `dtype`, freeing each float32 buffer as soon as its copy exists."""
    def cast(a):
        b = a.astype(dtype)
        b.block_until_ready()
        a.delete()
        return b
    return jax.tree_util.tree_map(cast, params)


def tree_bytes(tree):
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma list of float32, bfloat16 (bfloat16 also runs ours with bf16 params + fp32 "
                             "compute)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median reported)")
    parser.add_argument("--packing-repeats", type=int, default=1, help="timed calls per packing case (no warm-up)")
    parser.add_argument("--torch-bf16-repeats", type=int, default=1, help="timed transformers bf16 calls (no warm-up)")
    parser.add_argument("--skip-torch", action="store_true", help="ours only (no ratios, no logits check)")
    parser.add_argument("--skip-packing", action="store_true")
    parser.add_argument("--skip-scan", action="store_true", help="no scan_layers=True compile or runtime")
    parser.add_argument("--xla-flags", default=None, help="appended to XLA_FLAGS before jax is imported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="2b", help=argparse.SUPPRESS)  # "tiny" for a smoke test
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "forward.json"))
    args = parser.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            parser.error(f"unknown dtype {d!r}")
    use_torch = not args.skip_torch

    cfg32 = Qwen2VLConfig.preset(args.preset)
    rng = np.random.default_rng(args.seed)
    input_ids, mask, pixels, grid = bench_inputs(cfg32, rng)
    packed_px = rng.standard_normal((4096, cfg32.vision.patch_dim)).astype(np.float32)

    t = time.perf_counter()
    prepared_np = prepare_inputs(cfg32, input_ids, mask, grid, image_rows=len(pixels))
    prepare_s = time.perf_counter() - t
    prepared = {k: jnp.asarray(v) for k, v in prepared_np.items()}
    ids_j, px_j = jnp.asarray(input_ids), jnp.asarray(pixels)
    pos_j, seg_j = prepared["vision_pos_hw"], prepared["vision_segment_ids"]
    packing_layouts = {}
    for name, grids in (("16x224", PACKED_GRIDS), ("1x896", SINGLE_GRID)):
        pos, seg = vision_layout(np.array(grids), cfg32.vision.spatial_merge_size)[:2]
        packing_layouts[name] = (grids, jnp.asarray(pos), jnp.asarray(seg))
    packed_px_j = jnp.asarray(packed_px)

    results = dict(
        bench="forward", preset=args.preset,
        model=f"Qwen2-VL {args.preset} preset, random weights (unit-scale redraw as tests/reference.py)",
        input=dict(image="448x448", grid_thw=list(GRID), vision_patches=int(np.prod(GRID)),
                   llm_image_tokens=int(np.prod(GRID)) // 4, text_tokens=TEXT_BEFORE + TEXT_AFTER,
                   sequence_length=int(input_ids.shape[1]), batch=1, pixel_values="random normal float32 [1024, 1176]"),
        settings=dict(threads=THREADS, torch_num_threads=torch.get_num_threads(), NPROC=os.environ["NPROC"],
                      OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"], XLA_FLAGS=os.environ.get("XLA_FLAGS", ""),
                      torch_attn_implementation="sdpa", repeats=args.repeats, packing_repeats=args.packing_repeats,
                      torch_bf16_repeats=args.torch_bf16_repeats,
                      thread_note="XLA:CPU intra-op pool = xla::DefaultThreadPoolSize() = $NPROC if set, else the "
                                  "CPUs in the process affinity mask; XLA_FLAGS has no thread-count flag. "
                                  "xla_pool_threads counts the tf_XLAEigen threads seen after the first run."),
        versions=dict(jax=jax.__version__, jaxlib=__import__("jaxlib").__version__,
                      flax=__import__("flax").__version__, torch=torch.__version__,
                      transformers=transformers.__version__, numpy=np.__version__, python=platform.python_version()),
        machine=dict(cpu=_cpu_name(), cpus=os.cpu_count(), isa=_isa(), ram_gb=round(_ram_gb(), 1),
                     platform=platform.platform(), jax_device=str(jax.devices()[0].device_kind),
                     loadavg_at_start=os.getloadavg(),
                     note=f"{os.cpu_count()}-core VM, possibly shared with other processes: compare timings only "
                          "where cpu_use is near the thread count (2.0)"),
        prepare_inputs_s=prepare_s, timings={}, compile_s={}, xla_temp_gb={}, peak_rss_gb_after={}, packing={})
    timings, compile_s, temp_gb = results["timings"], results["compile_s"], results["xla_temp_gb"]

    def record(entries):
        for key, entry in entries.items():
            timings[key] = entry
            log(f"{key:40s} median {entry['median_s']:8.3f} s  (calls "
                f"{', '.join(f'{x:.2f}' for x in entry['times_s'])}; cpu use {entry['cpu_use']}, "
                f"load {entry['loadavg_1m']:.1f})")

    def compiled(key, fn, *a):
        exe, compile_s[key], temp = compile_timed(fn, *a)
        temp_gb[key] = None if temp is None else round(temp / 1e9, 3)
        log(f"compiled {key} in {compile_s[key]:.1f} s (XLA temp {temp_gb[key]} GB)")
        return exe

    def checkpoint(stage):
        release_memory()
        results["peak_rss_gb_after"][stage] = round(peak_rss_gb(), 2)
        log(f"{stage}: rss {rss_gb():.1f} GB, peak so far {peak_rss_gb():.1f} GB")

    # ------------------------------------------------ weights: the transformers model, converted to ours (float32)
    log(f"building the transformers {args.preset} model (float32)")
    model = build_torch(cfg32, args.seed)
    checkpoint("torch_model_built")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = to_jax_params(state, cfg32)
    del state
    log(f"our params: {tree_bytes(params) / 1e9:.2f} GB")
    if not use_torch:
        del model
        model = None
    checkpoint("converted")

    # ------------------------------------------------ float32: transformers and ours alternating
    if "float32" in dtypes:
        vit_fn, fwd_fn = our_fns(cfg32)
        vit_c = compiled("float32/vit", vit_fn, params["visual"], px_j, pos_j, seg_j)
        fwd_c = compiled("float32/full_scan_false", fwd_fn, abstract(params), ids_j, prepared, px_j)
        ours_vit = lambda: jax.block_until_ready(vit_c(params["visual"], px_j, pos_j, seg_j))
        ours_full = lambda: jax.block_until_ready(fwd_c(params, ids_j, prepared, px_j))
        fns = {"ours/float32/vit": ours_vit}
        if model is not None:
            torch_vit, torch_full = torch_calls(model, cfg32, input_ids, mask, pixels, grid)
            fns["torch/float32/vit"] = torch_vit
        entries, _ = timed(fns, args.repeats)
        results["settings"]["xla_pool_threads"] = xla_pool_threads()
        record(entries)
        fns = {"ours/float32/full": ours_full}
        if model is not None:
            fns["torch/float32/full"] = torch_full
        entries, out = timed(fns, args.repeats)
        record(entries)
        if "torch/float32/full" in out:
            ours_logits, torch_logits = np.asarray(out["ours/float32/full"]), out["torch/float32/full"].float().numpy()
            diff = np.abs(ours_logits - torch_logits)
            results["logits_check"] = dict(
                max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
                max_abs_logit=float(np.abs(torch_logits).max()),
                argmax_agreement=float(np.mean(ours_logits.argmax(-1) == torch_logits.argmax(-1))))
            log(f"logits check: {results['logits_check']}")
            del ours_logits, torch_logits, diff
        del out, fwd_c, vit_c, ours_full, ours_vit, fns
        if not args.skip_scan:
            _, scan_fwd = our_fns(cfg32.replace(scan_layers=True))
            compiled("float32/full_scan_true", scan_fwd, abstract_stacked(params, cfg32), ids_j, prepared, px_j)
        checkpoint("float32")
        if not args.skip_packing:
            # One executable serves both layouts (same shapes); the second lower+compile is a cache hit.
            pack_c = compiled("float32/vit_4096_rows", vit_fn, params["visual"], packed_px_j,
                              *packing_layouts["16x224"][1:])
            fns = {}
            for name, (grids, pos, seg) in packing_layouts.items():
                fns[f"ours/float32/vit_packing_{name}"] = (
                    lambda pos=pos, seg=seg: jax.block_until_ready(pack_c(params["visual"], packed_px_j, pos, seg)))
                if model is not None:
                    fns[f"torch/float32/vit_packing_{name}"] = torch_vit_call(model, packed_px, grids)
            record(timed(fns, args.packing_repeats, warmup=0)[0])
            del pack_c, fns
            checkpoint("packing")

    # ------------------------------------------------ transformers bfloat16 (cast in place), then freed
    if model is not None and "bfloat16" in dtypes:
        model.to(torch.bfloat16)  # parameter by parameter: each float32 storage is freed as it goes
        checkpoint("torch_cast_bf16")
        torch_vit, torch_full = torch_calls(model, cfg32, input_ids, mask, pixels, grid)
        record(timed({"torch/bfloat16/vit": torch_vit}, args.torch_bf16_repeats, warmup=0)[0])
        record(timed({"torch/bfloat16/full": torch_full}, args.torch_bf16_repeats, warmup=0)[0])
        del torch_vit, torch_full
    if model is not None:
        del model
        torch_vit = torch_full = None
    checkpoint("torch_freed")

    # ------------------------------------------------ ours bfloat16 and bf16 params + fp32 compute
    if "bfloat16" in dtypes:
        params = cast_params_inplace(params, jnp.bfloat16)
        checkpoint("ours_cast_bf16")
        variants = (("bfloat16", dict(dtype="bfloat16", param_dtype="bfloat16")),
                    ("bf16_params_f32_compute", dict(dtype="float32", param_dtype="bfloat16")))
        for label, change in variants:
            vit_fn, fwd_fn = our_fns(cfg32.replace(**change))
            vit_c = compiled(f"{label}/vit", vit_fn, params["visual"], px_j, pos_j, seg_j)
            fwd_c = compiled(f"{label}/full_scan_false", fwd_fn, params, ids_j, prepared, px_j)
            record(timed({f"ours/{label}/vit": lambda: jax.block_until_ready(vit_c(params["visual"], px_j, pos_j,
                                                                                   seg_j))}, args.repeats)[0])
            record(timed({f"ours/{label}/full": lambda: jax.block_until_ready(fwd_c(params, ids_j, prepared, px_j))},
                         args.repeats)[0])
            del vit_c, fwd_c
            checkpoint(label)
        if not args.skip_scan:
            params = stack_inplace(params, cfg32)
            for label, change in variants:
                _, fwd_fn = our_fns(cfg32.replace(scan_layers=True, **change))
                fwd_c = compiled(f"{label}/full_scan_true", fwd_fn, params, ids_j, prepared, px_j)
                record(timed({f"ours/{label}/full_scan": lambda: jax.block_until_ready(
                    fwd_c(params, ids_j, prepared, px_j))}, args.repeats)[0])
                del fwd_c
            checkpoint("scan")

    # ------------------------------------------------ summary
    summarize(results)
    write_results(results, args.out, T0, print_table)


def write_results(results: dict, out: str, t0: float, print_table, indent: int = 2) -> None:
    """Peak RSS, run time and load average into `results`, print its table, write it as JSON to `out`."""
    results["peak_rss_gb"] = round(peak_rss_gb(), 2)
    results["total_runtime_s"] = round(time.perf_counter() - t0, 1)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    print_table(results)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=indent)
    log(f"wrote {out}")


def summarize(results):
    tm = {k: v["median_s"] for k, v in results["timings"].items()}
    rows = []
    pairs = [("float32", "float32", "float32"), ("bfloat16", "bfloat16", "bfloat16"),
             ("bf16 params, fp32 compute (vs torch fp32)", "float32", "bf16_params_f32_compute"),
             ("bf16 params, fp32 compute (vs torch bf16)", "bfloat16", "bf16_params_f32_compute")]
    for label, torch_dt, ours_dt in pairs:
        row = dict(config=label, torch_dtype=torch_dt, ours=ours_dt)
        for part in ("vit", "full"):
            t_ref, t_ours = tm.get(f"torch/{torch_dt}/{part}"), tm.get(f"ours/{ours_dt}/{part}")
            row[f"torch_{part}_s"], row[f"ours_{part}_s"] = t_ref, t_ours
            row[f"{part}_ratio"] = t_ref / t_ours if t_ref and t_ours else None
        for who in ("torch", "ours"):  # the LLM part, by subtraction
            full, vit = row[f"{who}_full_s"], row[f"{who}_vit_s"]
            row[f"{who}_llm_s"] = full - vit if full and vit else None
        row["llm_ratio"] = row["torch_llm_s"] / row["ours_llm_s"] if row["torch_llm_s"] and row["ours_llm_s"] else None
        if row["ours_full_s"] is not None:
            rows.append(row)
    results["table"] = rows
    ours_full = {d: tm[f"ours/{d}/full"] for d in ("float32", "bfloat16", "bf16_params_f32_compute")
                 if f"ours/{d}/full" in tm}
    if ours_full:
        results["fastest_ours_dtype_on_cpu"] = min(ours_full, key=ours_full.get)
    results["scan_runtime"] = {d: dict(scan_s=tm[f"ours/{d}/full_scan"], unrolled_s=tm[f"ours/{d}/full"],
                                       scan_over_unrolled=tm[f"ours/{d}/full_scan"] / tm[f"ours/{d}/full"])
                               for d in ("bfloat16", "bf16_params_f32_compute") if f"ours/{d}/full_scan" in tm}
    pk = {}
    for who in ("ours", "torch"):
        small, large = tm.get(f"{who}/float32/vit_packing_16x224"), tm.get(f"{who}/float32/vit_packing_1x896")
        if small and large:
            pk[who] = dict(sixteen_224_s=small, one_896_s=large, small_over_large=small / large)
    if "ours" in pk and "torch" in pk:
        pk["ratio_torch_over_ours"] = {"16x224": pk["torch"]["sixteen_224_s"] / pk["ours"]["sixteen_224_s"],
                                       "1x896": pk["torch"]["one_896_s"] / pk["ours"]["one_896_s"]}
    results["packing"] = pk


def print_table(results):
    fmt = lambda x, w=8, p=2: f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}s}"
    print(f"\nQwen2-VL {results['preset']} forward, 448x448 image + 64 text tokens (L=322), batch 1, CPU, "
          f"{results['settings']['threads']} threads; median seconds")
    print(f"{'config':44s} {'torch ViT':>9s} {'ours ViT':>9s} {'ratio':>6s} {'torch full':>10s} {'ours full':>9s} "
          f"{'ratio':>6s} {'torch LLM':>9s} {'ours LLM':>9s} {'ratio':>6s}")
    for r in results["table"]:
        print(f"{r['config']:44s} {fmt(r['torch_vit_s'], 9)} {fmt(r['ours_vit_s'], 9)} {fmt(r['vit_ratio'], 6)} "
              f"{fmt(r['torch_full_s'], 10)} {fmt(r['ours_full_s'], 9)} {fmt(r['full_ratio'], 6)} "
              f"{fmt(r['torch_llm_s'], 9)} {fmt(r['ours_llm_s'], 9)} {fmt(r['llm_ratio'], 6)}")
    print("ratio = transformers / ours (> 1: ours faster); LLM = full - ViT")
    print("cpu use (2.0 = both cores ours): " + ", ".join(f"{k} {v['cpu_use']}" for k, v in results["timings"].items()))
    if results["compile_s"]:
        print("compile (lower+compile) s: " + ", ".join(f"{k} {v:.1f}" for k, v in results["compile_s"].items()))
        print("XLA temp GB: " + ", ".join(f"{k} {v}" for k, v in results["xla_temp_gb"].items()))
    for d, s in results.get("scan_runtime", {}).items():
        print(f"scan_layers=True runtime ({d}): {s['scan_s']:.2f} s vs unrolled {s['unrolled_s']:.2f} s")
    for who, p in results["packing"].items():
        if who in ("ours", "torch"):
            print(f"packing {who}: 16 x 224x224 {p['sixteen_224_s']:.2f} s, 1 x 896x896 {p['one_896_s']:.2f} s, "
                  f"ratio {p['small_over_large']:.3f}")
    if "ratio_torch_over_ours" in results["packing"]:
        print("packing torch/ours: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                results["packing"]["ratio_torch_over_ours"].items()))
    if "logits_check" in results:
        print(f"logits float32 ours vs transformers: {results['logits_check']}")
    if "fastest_ours_dtype_on_cpu" in results:
        print(f"fastest ours on this CPU: {results['fastest_ours_dtype_on_cpu']}")
    print(f"xla pool threads {results['settings'].get('xla_pool_threads')}, torch threads "
          f"{results['settings']['torch_num_threads']}; peak RSS {results['peak_rss_gb']} GB; "
          f"total {results['total_runtime_s']} s")


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def _isa():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
        return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except (OSError, StopIteration):
        return []


def _ram_gb():
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


if __name__ == "__main__":
    main()

"""Generation speed of the 2B model on the CPU: qwen2vl-jax vs transformers, same random weights, 2 threads each.

Input: one 448×448 image per row (grid (1, 32, 32): 1024 patches → 256 placeholder tokens) in a ChatML-like prompt
with 32 random text tokens (L = 290), batch 1 and batch 8 (8 different random images, row 0 = the batch-1 input),
64 new tokens, greedy, no eos stop. Measured per dtype and batch:

- ours: a copy of `qwen2vl_jax.generate`'s loop (same host code, same jitted `programs(config)`: vision `encode`,
  `prefill`, `decode`) with timestamps. prefill latency = host prep + vision encode + prefill to the first token on
  the host; decode tok/s = B · steps / Σ step times (a step: host bookkeeping + one `decode` call + the token back
  on the host). The programs are compiled first (lower + compile, timed = "compile"); the timed calls hit the same
  jit cache (`compiles_during_timing` counts any miss). Shapes: "exact" buckets (Ladders batch (1, 8), length
  (290,), cache (354,), vision_rows (1024, 8192)), i.e. no padding; the default Ladders (batch 8 → 16 rows, length
  290 → 1024, cache 2048, 8192 vision rows → 16384) are measured separately for float32 (`default_ladders`).
  Variants: float32; bfloat16 (dtype = param_dtype = bfloat16); bf16 params + float32 compute
  (param_dtype bfloat16, dtype float32: each matmul casts its kernel).
- ours, end to end: `qwen2vl_jax.generate(..., max_new_tokens=1)` and `(..., 64)` once each (float32 batch 1):
  decode tok/s = 63 / (t64 − t1), a cross-check of the breakdown above, and the greedy tokens of the public API.
- ours, bench-local greedy decode: the same `Qwen2VL.decode_step` followed by a plain argmax instead of
  `generation.sample`, to measure what the sampler costs inside decode (a full-vocabulary sort per row per step
  cost 40 ms per row before `sample` skipped it for greedy decoding).
- transformers: `Qwen2VLForConditionalGeneration.generate` (sdpa, eval, no_grad, do_sample=False,
  eos_token_id=None, min_new_tokens = max_new_tokens) with a StoppingCriteria that timestamps every new token:
  prefill latency = call start → first token; decode tok/s = B · 63 / (last − first token). Float32 batch 1 also
  runs generate(max_new_tokens=1) alone (t1) and reports 63 / (t64 − t1) beside it. transformers bfloat16 on a CPU
  without AVX512-BF16/AMX runs its prefill at ~110 s per image, so batch 8 bfloat16 uses by default a proxy: the
  same 8 rows without the image (text only, 32 tokens) for the decode rate (`--torch-bf16-b8 proxy|full|skip`).
- Roofline: this machine's read bandwidth, measured in the same run (numpy sum over a 1.6 GB float32 array, 1
  thread; jitted float32 matrix-vector product over a 1.6 GB matrix and torch.mv on it, 2 threads; best of 3), and
  decode roofline tok/s = B · bandwidth / (LLM weight bytes read per step: decoder layers + final norm + the tied
  embedding matrix the head reads, in the dtype stored). The best float32 bandwidth is the roofline's. Also the
  XLA bfloat16 matrix-vector rate (bf16 kernel, and bf16 kernel cast to float32 in the jit) and the float32 matmul
  peak (compute roofline for batch 8: 2 · B · params FLOP per step). `decode_parts`: pieces of one float32 decode
  step alone (no weights needed): the MLP matmul [B, 1, 1536] @ [1536, 8960] at B = 1, 8, 16, and dense attention
  over all layers' KV caches for several batch × cache sizes (alone, and with the cache update).
- Correctness: our greedy tokens vs transformers' (float32; batch 1, and every row of batch 8); our batch-8 row 0
  vs our batch-1 tokens.

Every timing records `cpu_use` = process CPU s / wall s (≈ 2 when uncontended; another process competing for the
2 cores lowers it and inflates the time by about 2 / cpu_use) and the 1-minute load average. `code` in the JSON
holds the sha256 of every qwen2vl_jax source file as imported.

Memory: at most two float32 copies of the weights (torch + ours ≈ 17.6 GB) during the float32 phase; then the torch
model is cast to bfloat16 in place, measured and freed; then ours is cast one tensor at a time.

    python bench/generate.py [--dtypes float32,bfloat16] [--batches 1,8] [--new-tokens 64] [--skip-torch]
                             [--repeats 2] [--decode-budget-s 20] [--torch-bf16-b8 proxy|full|skip]
                             [--skip-default-ladders] [--skip-e2e]

Writes bench/results/generate.json (`--out`).
"""
import os
import sys

THREADS = 2
os.environ["NPROC"] = str(THREADS)  # XLA:CPU intra-op pool size (read when jax initialises its backend)
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import forward as fw  # noqa: E402  (shared helpers: random 2B weights, conversion, memory, machine info)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import qwen2vl_jax  # noqa: E402
from qwen2vl_jax import Qwen2VL, Qwen2VLConfig, prepare_inputs  # noqa: E402
from qwen2vl_jax.buckets import Ladders, shapes_for  # noqa: E402
from qwen2vl_jax.compiles import CompileCounter  # noqa: E402
from qwen2vl_jax.generation import _padded_batch, programs, sample  # noqa: E402
from qwen2vl_jax.inputs import grid_array  # noqa: E402

torch.set_num_threads(THREADS)

GRID = (1, 32, 32)  # 448×448
TEXT_BEFORE, TEXT_AFTER = 12, 20  # 32 text tokens
IM_START, IM_END, NEWLINE = 151644, 151645, 198
log = fw.log
T0 = time.perf_counter()


# ----------------------------------------------------------------------------------------------------------- inputs
def make_inputs(cfg, seed, batch):
    """HF-named numpy batch: `batch` rows of the same length, each with its own random image and text."""
    rng = np.random.default_rng(seed)
    tokens = int(np.prod(GRID)) // cfg.vision.spatial_merge_size**2
    rows, pixels = [], []
    for _ in range(batch):
        text = lambda n: rng.integers(0, 151000, n).tolist()
        before = [IM_START] + text(TEXT_BEFORE - 4) + [IM_END, NEWLINE, IM_START]
        after = text(TEXT_AFTER - 7) + [IM_END, NEWLINE, IM_START] + text(4)
        rows.append(before + [cfg.vision_start_token_id] + [cfg.image_token_id] * tokens
                    + [cfg.vision_end_token_id] + after)
        pixels.append(rng.standard_normal((int(np.prod(GRID)), cfg.vision.patch_dim)).astype(np.float32))
    ids = np.array(rows, np.int64)
    return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=np.concatenate(pixels),
                image_grid_thw=np.array([GRID] * batch, np.int64))


def take_rows(inputs, n):
    patches = int(np.prod(GRID))
    return dict(input_ids=inputs["input_ids"][:n], attention_mask=inputs["attention_mask"][:n],
                pixel_values=inputs["pixel_values"][:n * patches], image_grid_thw=inputs["image_grid_thw"][:n])


def exact_ladders(length, new_tokens, batches):
    return Ladders(batch=tuple(sorted(batches)), length=(length,), cache=(length + new_tokens,),
                   vision_rows=tuple(sorted(b * int(np.prod(GRID)) for b in batches)))


def cpu_wall():
    return time.process_time(), time.perf_counter()


def use(c0, t0):
    c1, t1 = cpu_wall()
    return round((c1 - c0) / max(t1 - t0, 1e-9), 2)


# ------------------------------------------------------------------------------------------------------- bandwidth
def best_of(fn, n=3):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure_machine(gb=1.6):
    """Read bandwidth (GB/s, 1e9 bytes) and float32 matmul peak, best of 3 after one warm-up."""
    out = {}
    cols = 1536
    rows = int(gb * 1e9 / 4 / cols)
    c0, t0 = cpu_wall()
    a = np.full(rows * cols, 0.5, np.float32)
    t = best_of(lambda: a.sum())
    out["numpy_sum_fp32_1thread"] = dict(gb_s=a.nbytes / t / 1e9, bytes=a.nbytes, best_s=t)
    w = torch.from_numpy(a.reshape(rows, cols))
    xv = torch.ones(cols)
    t = best_of(lambda: torch.mv(w, xv))
    out["torch_mv_fp32_2threads"] = dict(gb_s=a.nbytes / t / 1e9, bytes=a.nbytes, best_s=t)
    del w
    wj = jnp.asarray(a.reshape(rows, cols))
    del a
    fw.release_memory()
    x = jnp.ones((cols,), jnp.float32)
    mv = jax.jit(lambda w, x: w @ x)
    t = best_of(lambda: mv(wj, x).block_until_ready())
    out["xla_matvec_fp32_2threads"] = dict(gb_s=wj.nbytes / t / 1e9, bytes=wj.nbytes, best_s=t)
    wb = wj.astype(jnp.bfloat16)
    wj.delete()
    xb = x.astype(jnp.bfloat16)
    t = best_of(lambda: mv(wb, xb).block_until_ready())
    out["xla_matvec_bf16_2threads"] = dict(gb_s=wb.nbytes / t / 1e9, bytes=wb.nbytes, best_s=t,
                                           note="bf16 kernel and vector, bf16 bytes read")
    mv_cast = jax.jit(lambda w, x: w.astype(jnp.float32) @ x)
    t = best_of(lambda: mv_cast(wb, x).block_until_ready())
    out["xla_matvec_bf16_kernel_cast_fp32_2threads"] = dict(
        gb_s=wb.nbytes / t / 1e9, bytes=wb.nbytes, best_s=t,
        note="bf16 kernel cast to float32 inside the jit (as param_dtype bf16 + dtype float32); bf16 bytes counted")
    wt = torch.from_numpy(np.asarray(wb.astype(jnp.float32))).to(torch.bfloat16)
    wb.delete()
    t = best_of(lambda: torch.mv(wt, xv.to(torch.bfloat16)))
    out["torch_mv_bf16_2threads"] = dict(gb_s=wt.numel() * 2 / t / 1e9, bytes=wt.numel() * 2, best_s=t)
    del wt
    n = 2048
    m = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    t = best_of(lambda: mm(m, m).block_until_ready())
    out["xla_matmul_fp32_gflop_s"] = 2 * n**3 / t / 1e9
    tm = torch.ones(n, n)
    t = best_of(lambda: tm @ tm)
    out["torch_matmul_fp32_gflop_s"] = 2 * n**3 / t / 1e9
    del m, tm
    fw.release_memory()
    out["cpu_use"] = use(c0, t0)
    out["roofline_gb_s"] = max(out[k]["gb_s"] for k in ("numpy_sum_fp32_1thread", "torch_mv_fp32_2threads",
                                                         "xla_matvec_fp32_2threads"))
    out["peak_gflop_s"] = max(out["xla_matmul_fp32_gflop_s"], out["torch_matmul_fp32_gflop_s"])
    return out


def sampler_cost(vocab, batches):
    """ms per call of generation.sample at temperature 0 vs a plain argmax, [B, vocab] float32 logits."""
    out = {}
    s = (jnp.float32(0), jnp.int32(0), jnp.float32(1))
    key = jax.random.key(0)
    f, g = jax.jit(sample), jax.jit(lambda l: jnp.argmax(l, -1).astype(jnp.int32))
    for b in batches:
        logits = jnp.asarray(np.random.default_rng(b).standard_normal((b, vocab), np.float32))
        ts = best_of(lambda: f(logits, key, *s).block_until_ready(), 5)
        ta = best_of(lambda: g(logits).block_until_ready(), 5)
        out[f"b{b}"] = dict(sample_ms=ts * 1e3, argmax_ms=ta * 1e3)
    return out


def decode_parts(cfg, cases=((1, 354), (8, 354), (1, 2048), (16, 2048))):
    """Pieces of one fp32 decode step, alone, on the 2B shapes (no model weights needed): the MLP-sized matmul
    [B, 1, D] @ [D, F] at batch 1/8/16 (XLA:CPU small-M rate), and, over all layers, the KV-cache part of
    `SelfAttention` in decode: dense attention over each layer's cache alone, and with the new key/value written
    first (dynamic_update_slice into one [B, C, Hkv, hd] pair per layer, donated: the unrolled layout)."""
    from qwen2vl_jax.attention import dot_product_attention
    t = cfg.text
    d, f, layers, hkv, hd, h = (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_key_value_heads,
                                t.head_dim, t.num_attention_heads)
    out = {"matmul": {}, "cache_attention": {}}
    w = jnp.full((d, f), 0.01, jnp.float32)
    mm = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((2,), (0,)), ((), ()))))
    for b in (1, 8, 16):
        x = jnp.ones((b, 1, d), jnp.float32)
        sec = best_of(lambda: mm(x, w).block_until_ready(), 7)
        out["matmul"][f"b{b}"] = dict(ms=sec * 1e3, gflop_s=2 * b * d * f / sec / 1e9, weight_gb_s=w.nbytes / sec / 1e9)
    del w
    for b, c in cases:
        cache = [(jnp.zeros((b, c, hkv, hd), jnp.float32), jnp.zeros((b, c, hkv, hd), jnp.float32))
                 for _ in range(layers)]
        q, new = jnp.ones((b, 1, h, hd), jnp.float32), jnp.ones((b, 1, hkv, hd), jnp.float32)
        valid, seg = jnp.ones((b, c), jnp.int32), jnp.ones((b, 1), jnp.int32)
        attention = lambda k, v: dot_product_attention(q, k, v, segment_ids=seg, kv_segment_ids=valid,
                                                       implementation="xla_dense")

        @functools.partial(jax.jit, donate_argnums=0)
        def step(cache, index):
            cache = [tuple(jax.lax.dynamic_update_slice(a, new, (0, index, 0, 0)) for a in kv) for kv in cache]
            return jnp.stack([attention(k, v) for k, v in cache]), cache

        attend = jax.jit(lambda cache: jnp.stack([attention(k, v) for k, v in cache]))
        attend_s = best_of(lambda: attend(cache).block_until_ready(), 3)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            o, cache = step(cache, jnp.int32(3))
            o.block_until_ready()
            times.append(time.perf_counter() - start)
        nbytes = sum(a.nbytes for kv in cache for a in kv)
        del cache
        sec = min(times[1:])
        out["cache_attention"][f"b{b}xC{c}"] = dict(cache_mb=nbytes / 1e6, attention_only_ms=attend_s * 1e3,
                                                    with_update_ms=sec * 1e3, cache_gb_s=nbytes / sec / 1e9)
    fw.release_memory()
    return out


# ------------------------------------------------------------------------------------------------------ ours side
@functools.lru_cache(maxsize=8)
def argmax_decode(cfg):
    """Bench-local decode program: `Qwen2VL.decode_step` + plain argmax (what greedy needs), no `sample`."""
    model = Qwen2VL(cfg, decoding=True)

    @functools.partial(jax.jit, donate_argnames="cache")
    def decode_argmax(params, tokens, position_ids, cache, index, kv_valid):
        logits, cache = model.apply({"params": params}, tokens[:, None], position_ids, cache, index, kv_valid,
                                    method=Qwen2VL.decode_step)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache
    return decode_argmax


def host_prep(cfg, inputs, new_tokens, ladders):
    """Exactly what `qwen2vl_jax.generate` does on the host before the vision encoder."""
    input_ids, attention_mask = np.asarray(inputs["input_ids"]), np.asarray(inputs["attention_mask"])
    merge = cfg.vision.spatial_merge_size
    images = grid_array(inputs["image_grid_thw"], "image_grid_thw", merge)
    pixels = np.asarray(inputs["pixel_values"], np.float32)
    rows = len(pixels)
    shapes = shapes_for(ladders, len(input_ids), input_ids.shape[1], rows, new_tokens)
    ids, mask = _padded_batch(cfg, input_ids, attention_mask, shapes)
    prepared = prepare_inputs(cfg, ids, mask, images, None, image_rows=rows, video_rows=None,
                              vision_pad_to=shapes.vision_rows or None)
    dtype = jnp.dtype(cfg.dtype)
    features = np.zeros((shapes.batch * shapes.length, cfg.text.hidden_size), dtype)
    padded_pixels = np.zeros((shapes.vision_rows, cfg.vision.patch_dim), np.float32)
    padded_pixels[:rows] = pixels
    sampling = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    return dict(shapes=shapes, ids=ids, mask=mask, prepared=prepared, features=features, rows=rows,
                pixels=padded_pixels.astype(dtype), sampling=sampling, batch=len(input_ids),
                attention_mask=attention_mask)


def cache_struct(cfg, params, h, key):
    """The KV cache as `prefill` returns it for host_prep's shapes (ShapeDtypeStructs; layout-agnostic: a stacked
    pair or one pair per layer), by abstract evaluation."""
    _, prefill, _ = programs(cfg)
    p = h["prepared"]
    _, cache = jax.eval_shape(functools.partial(prefill, cache_length=h["shapes"].cache), params, h["ids"],
                              h["mask"], p["position_ids"], h["features"], p["splice_index"], h["sampling"], key)
    return cache


def compile_ours(cfg, params, inputs, new_tokens, ladders, label, compile_s, temp_gb, with_argmax=False):
    """lower + compile encode, prefill and decode for these inputs' shapes (the jit cache then holds them)."""
    encode, prefill, decode = programs(cfg)
    h = host_prep(cfg, inputs, new_tokens, ladders)
    s, p = h["shapes"], h["prepared"]
    key = jax.random.fold_in(jax.random.key(0), 0)
    cache = cache_struct(cfg, params, h, key)
    token = np.zeros((s.batch,), np.int32)
    position = np.zeros((3, s.batch, 1), np.int32)
    kv_valid = np.zeros((s.batch, s.cache), np.int32)
    todo = [("encode", lambda: encode.lower(params, h["pixels"], p["vision_pos_hw"], p["vision_segment_ids"])),
            ("prefill", lambda: prefill.lower(params, h["ids"], h["mask"], p["position_ids"], h["features"],
                                              p["splice_index"], h["sampling"], key, cache_length=s.cache)),
            ("decode", lambda: decode.lower(params, token, position, cache, jnp.int32(s.length), kv_valid,
                                            h["sampling"], key))]
    if with_argmax:
        todo.append(("decode_argmax", lambda: argmax_decode(cfg).lower(params, token, position, cache,
                                                                         jnp.int32(s.length), kv_valid)))
    shape_tag = {"encode": f"rows{s.vision_rows}", "prefill": f"b{s.batch}xL{s.length}xC{s.cache}",
                 "decode": f"b{s.batch}xC{s.cache}", "decode_argmax": f"b{s.batch}xC{s.cache}"}
    for name, lower in todo:
        key_name = f"{label}/{name}/{shape_tag[name]}"
        if key_name in compile_s:
            continue
        start = time.perf_counter()
        exe = lower().compile()
        compile_s[key_name] = round(time.perf_counter() - start, 2)
        try:
            temp_gb[key_name] = round(exe.memory_analysis().temp_size_in_bytes / 1e9, 3)
        except Exception:  # noqa: BLE001
            temp_gb[key_name] = None
        log(f"compiled {key_name} in {compile_s[key_name]:.1f} s (XLA temp {temp_gb[key_name]} GB)")


def ours_generate_timed(cfg, params, inputs, new_tokens, ladders, decode_budget_s=None):
    """`qwen2vl_jax.generate` (greedy, no eos) with timestamps. Returns (timing dict, tokens int32[B, n], state)
    where n = 1 + decode steps run (all new_tokens - 1 unless decode_budget_s cut them short, ≥ 8 steps)."""
    encode, prefill, decode = programs(cfg)
    merge = cfg.vision.spatial_merge_size
    with CompileCounter() as compiles:
        c0, t0 = cpu_wall()
        h = host_prep(cfg, inputs, new_tokens, ladders)
        s, p, rows, batch = h["shapes"], h["prepared"], h["rows"], h["batch"]
        t_prep = time.perf_counter()
        merged = encode(params, h["pixels"], p["vision_pos_hw"], p["vision_segment_ids"])
        features = h["features"]
        features[:rows // merge**2] = np.asarray(merged[:rows // merge**2])
        del merged
        t_enc = time.perf_counter()
        key = jax.random.key(0)
        token, cache = prefill(params, h["ids"], h["mask"], p["position_ids"], features, p["splice_index"],
                               h["sampling"], jax.random.fold_in(key, 0), cache_length=s.cache)
        token = np.asarray(token)
        t_first = time.perf_counter()
        prefill_cpu = use(c0, t0)
        out = [token[:batch]]
        kv_valid = np.zeros((s.batch, s.cache), np.int32)
        kv_valid[:, :s.length] = h["mask"]
        next_position = p["position_ids"].max(axis=(0, 2)) + 1
        steps = []
        c1, t1 = cpu_wall()
        for step in range(new_tokens - 1):
            start = time.perf_counter()
            index = s.length + step
            kv_valid[:, index] = 1
            position = np.broadcast_to((next_position + step)[None, :, None], (3, s.batch, 1)).astype(np.int32)
            token, cache = decode(params, token, position, cache, jnp.int32(index), kv_valid, h["sampling"],
                                  jax.random.fold_in(key, step + 1))
            token = np.asarray(token)
            steps.append(time.perf_counter() - start)
            out.append(token[:batch])
            if decode_budget_s and sum(steps) > decode_budget_s and len(steps) >= 8:
                break
        decode_cpu = use(c1, t1)
    timing = dict(prefill_latency_s=t_first - t0, host_prep_s=t_prep - t0, encode_s=t_enc - t_prep,
                  prefill_s=t_first - t_enc, prefill_cpu_use=prefill_cpu,
                  decode_steps=len(steps), decode_s=sum(steps), decode_tok_s=batch * len(steps) / sum(steps)
                  if steps else None, step_ms_median=statistics.median(steps) * 1e3 if steps else None,
                  step_ms_first=steps[0] * 1e3 if steps else None, decode_cpu_use=decode_cpu,
                  loadavg_1m=os.getloadavg()[0], compiles_during_timing=compiles.count(),
                  compiled_names=dict(compiles.names),
                  shapes=dict(batch=s.batch, length=s.length, cache=s.cache, vision_rows=s.vision_rows),
                  real_batch=batch)
    state = dict(cache=cache, token=token, kv_valid=kv_valid, next_position=next_position, shapes=s)
    return timing, np.stack(out, axis=1), state


def argmax_decode_timed(cfg, params, state, steps_n, batch):
    """The bench-local argmax decode on the cache left by ours_generate_timed (slots rewritten; cost is the same).
    Returns (timing dict, tokens)."""
    fn = argmax_decode(cfg)
    s = state["shapes"]
    cache, token, kv_valid = state["cache"], state["token"], state["kv_valid"]
    steps, out = [], []
    with CompileCounter() as compiles:
        c0, t0 = cpu_wall()
        for step in range(steps_n):
            start = time.perf_counter()
            index = s.length + step
            position = np.broadcast_to((state["next_position"] + step)[None, :, None],
                                       (3, s.batch, 1)).astype(np.int32)
            token, cache = fn(params, token, position, cache, jnp.int32(index), kv_valid)
            token = np.asarray(token)
            steps.append(time.perf_counter() - start)
            out.append(token[:batch])
        cpu = use(c0, t0)
    state["cache"] = cache
    return dict(decode_steps=len(steps), decode_s=sum(steps), decode_tok_s=batch * len(steps) / sum(steps),
                step_ms_median=statistics.median(steps) * 1e3, decode_cpu_use=cpu, loadavg_1m=os.getloadavg()[0],
                compiles_during_timing=compiles.count()), np.stack(out, axis=1)


def zero_cache_decode_timed(cfg, params, structure, batch, length, cache_len, steps_n):
    """Decode steps alone on a zero cache of [batch, cache_len] with `length` valid keys (cost does not depend on
    the values): for shapes whose prefill is too slow to run here. structure: the cache's ShapeDtypeStructs."""
    _, _, decode = programs(cfg)
    cache = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), structure)
    kv_valid = np.zeros((batch, cache_len), np.int32)
    kv_valid[:, :length] = 1
    token = np.zeros((batch,), np.int32)
    sampling = (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0))
    key = jax.random.key(0)
    steps = []
    with CompileCounter() as compiles:
        c0, t0 = cpu_wall()
        for step in range(steps_n):
            start = time.perf_counter()
            kv_valid[:, length + step] = 1
            position = np.full((3, batch, 1), length + step, np.int32)
            token, cache = decode(params, token, position, cache, jnp.int32(length + step), kv_valid, sampling,
                                  jax.random.fold_in(key, step + 1))
            token = np.asarray(token)
            steps.append(time.perf_counter() - start)
        cpu = use(c0, t0)
    del cache
    return dict(decode_steps=steps_n, decode_s=sum(steps), step_ms_median=statistics.median(steps) * 1e3,
                decode_cpu_use=cpu, loadavg_1m=os.getloadavg()[0], compiles_during_timing=compiles.count(),
                compiled_names=dict(compiles.names), shapes=dict(batch=batch, cache=cache_len))


def ours_e2e(cfg, params, inputs, new_tokens, ladders):
    """The public API, timed: generate(max_new_tokens=1) then generate(max_new_tokens=new_tokens)."""
    out = {}
    with CompileCounter() as compiles:
        for n in (1, new_tokens):
            c0, t0 = cpu_wall()
            tokens = qwen2vl_jax.generate(cfg, params, inputs, max_new_tokens=n, eos_token_ids=[], ladders=ladders)
            out[f"t{n}_s"] = time.perf_counter() - t0
            out[f"t{n}_cpu_use"] = use(c0, t0)
    b = len(inputs["input_ids"])
    out["decode_tok_s_from_t64_minus_t1"] = b * (new_tokens - 1) / (out[f"t{new_tokens}_s"] - out["t1_s"])
    out["compiles_during_timing"] = compiles.count()
    out["compiled_names"] = dict(compiles.names)
    out["loadavg_1m"] = os.getloadavg()[0]
    return out, tokens


# ----------------------------------------------------------------------------------------------------- torch side
class Stamps(transformers.StoppingCriteria):
    """Timestamps every generated token; stops all rows once decode has run `budget_s` (≥ 8 steps), else never."""

    def __init__(self, budget_s=None):
        self.times, self.budget_s = [], budget_s

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        stop = bool(self.budget_s) and len(self.times) >= 9 and self.times[-1] - self.times[0] > self.budget_s
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool)


def torch_generate(model, cfg, inputs, new_tokens, budget_s=None):
    """transformers greedy generate with per-token timestamps → (timing dict, new tokens int[B, n])."""
    dtype = next(model.parameters()).dtype
    ids = np.asarray(inputs["input_ids"])
    kwargs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(inputs["attention_mask"]))
    if inputs.get("pixel_values") is not None:
        kwargs.update(pixel_values=torch.from_numpy(inputs["pixel_values"]).to(dtype),
                      image_grid_thw=torch.from_numpy(inputs["image_grid_thw"]))
    kwargs["mm_token_type_ids"] = torch.from_numpy(
        ((ids == cfg.image_token_id) * 1 + (ids == cfg.video_token_id) * 2).astype(np.int64))
    stamps = Stamps(budget_s)
    c0, t0 = cpu_wall()
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=cfg.pad_token_id,
                             stopping_criteria=transformers.StoppingCriteriaList([stamps]))
    total = time.perf_counter() - t0
    cpu_total = use(c0, t0)
    b, ts = len(ids), stamps.times
    steps = len(ts) - 1
    timing = dict(total_s=total, cpu_use=cpu_total, prefill_latency_s=ts[0] - t0, decode_steps=steps,
                  decode_s=ts[-1] - ts[0], decode_tok_s=b * steps / (ts[-1] - ts[0]) if steps else None,
                  step_ms_median=statistics.median(np.diff(ts)) * 1e3 if steps else None,
                  loadavg_1m=os.getloadavg()[0], real_batch=b)
    return timing, out[:, ids.shape[1]:].numpy().astype(np.int32)


def torch_t1(model, cfg, inputs):
    c0, t0 = cpu_wall()
    timing, _ = torch_generate(model, cfg, inputs, 1)
    return dict(t1_s=time.perf_counter() - t0, cpu_use=use(c0, t0))


# -------------------------------------------------------------------------------------------------------- summary
def match(a, b):
    a, b = np.asarray(a), np.asarray(b)
    n = min(a.shape[-1], b.shape[-1])
    a, b = a[..., :n], b[..., :n]
    same = a == b
    rows = []
    for r in range(same.shape[0]):
        bad = np.flatnonzero(~same[r])
        rows.append(dict(matching=int(same[r].sum()), of=n, first_mismatch=int(bad[0]) if len(bad) else None,
                         prefix_equal=int(bad[0]) if len(bad) else n, distinct_tokens=int(len(set(a[r].tolist())))))
    return rows


def llm_weight_bytes(params, itemsize):
    """Parameters of the language model read by one decode step (decoder layers, final norm, tied embedding
    matrix = the head), counted at `itemsize` bytes each; also the matmul parameter count."""
    leaves = jax.tree_util.tree_leaves(params["language_model"])
    count = sum(a.size for a in leaves)
    matmul = sum(a.size for a in leaves if a.ndim >= 2)
    return count * itemsize, count, matmul


def code_fingerprint():
    """sha256 (first 12 hex) and mtime of every qwen2vl_jax source file as imported: the figures belong to this code."""
    import hashlib
    root = os.path.dirname(qwen2vl_jax.__file__)
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()[:12]
                out[os.path.relpath(path, root)] = dict(sha256=digest, mtime=time.strftime(
                    "%Y-%m-%dT%H:%M:%S", time.gmtime(os.path.getmtime(path))))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma list of float32, bfloat16 (bfloat16 also runs ours with bf16 params + fp32 "
                             "compute)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of ours float32 batch 1 after one warm-up run (others: one run)")
    parser.add_argument("--decode-budget-s", type=float, default=20.0,
                        help="stop a non-float32 decode measurement once its steps took this long (≥ 8 steps)")
    parser.add_argument("--torch-bf16-b8", choices=("proxy", "full", "skip"), default="proxy",
                        help="transformers bfloat16 batch 8: text-only proxy for the decode rate (default), the "
                             "full image prompt (~15 min of prefill), or skip")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--skip-default-ladders", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true", help="no qwen2vl_jax.generate end-to-end calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="2b", help=argparse.SUPPRESS)  # "tiny" for a smoke test
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "generate.json"))
    args = parser.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    batches = sorted(int(b) for b in args.batches.split(",") if b.strip())
    for d in dtypes:
        if d not in ("float32", "bfloat16"):
            parser.error(f"unknown dtype {d!r}")
    new = args.new_tokens
    use_torch = not args.skip_torch

    cfg32 = Qwen2VLConfig.preset(args.preset)
    inputs_all = make_inputs(cfg32, args.seed, max(batches))
    inputs = {b: take_rows(inputs_all, b) for b in batches}
    length = inputs_all["input_ids"].shape[1]
    ladders = exact_ladders(length, new, batches)

    results = dict(
        bench="generate", preset=args.preset,
        model=f"Qwen2-VL {args.preset} preset, random weights (unit-scale redraw as tests/reference.py)",
        input=dict(image="448x448 per row (random pixels, a different image per row)", grid_thw=list(GRID),
                   vision_patches_per_row=int(np.prod(GRID)), llm_image_tokens_per_row=int(np.prod(GRID)) // 4,
                   text_tokens=TEXT_BEFORE + TEXT_AFTER, prompt_length=length, new_tokens=new, batches=batches,
                   decoding="greedy, no eos stop", batch1_is_row0_of_batch8=True),
        settings=dict(threads=THREADS, torch_num_threads=torch.get_num_threads(), NPROC=os.environ["NPROC"],
                      OMP_NUM_THREADS=os.environ["OMP_NUM_THREADS"], XLA_FLAGS=os.environ.get("XLA_FLAGS", ""),
                      torch_attn_implementation="sdpa", repeats=args.repeats, decode_budget_s=args.decode_budget_s,
                      torch_bf16_b8=args.torch_bf16_b8, dtypes=dtypes,
                      ours_ladders=dict(batch=ladders.batch, length=ladders.length, cache=ladders.cache,
                                        vision_rows=ladders.vision_rows, note="exact fit: no padding")),
        versions=dict(jax=jax.__version__, jaxlib=__import__("jaxlib").__version__,
                      flax=__import__("flax").__version__, torch=torch.__version__,
                      transformers=transformers.__version__, numpy=np.__version__, python=platform.python_version()),
        machine=dict(cpu=fw._cpu_name(), cpus=os.cpu_count(), isa=fw._isa(), ram_gb=round(fw._ram_gb(), 1),
                     platform=platform.platform(), loadavg_at_start=os.getloadavg()),
        code=code_fingerprint(),
        runs={}, compile_s={}, xla_temp_gb={}, token_match={}, peak_rss_gb_after={})
    runs, compile_s, temp_gb = results["runs"], results["compile_s"], results["xla_temp_gb"]

    def checkpoint(stage):
        fw.release_memory()
        results["peak_rss_gb_after"][stage] = round(fw.peak_rss_gb(), 2)
        log(f"{stage}: rss {fw.rss_gb():.1f} GB, peak so far {fw.peak_rss_gb():.1f} GB")

    def record(key, entry):
        runs[key] = entry
        brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in entry.items()
                 if k in ("prefill_latency_s", "encode_s", "prefill_s", "decode_steps", "decode_tok_s",
                          "step_ms_median", "prefill_cpu_use", "decode_cpu_use", "cpu_use", "t1_s", "t64_s",
                          "decode_tok_s_from_t64_minus_t1", "compiles_during_timing", "loadavg_1m", "total_s")}
        log(f"{key}: {brief}")

    # ------------------------------------------------ machine: bandwidth, matmul peak, sampler cost
    log("measuring memory bandwidth and matmul peak")
    results["machine_rates"] = measure_machine()
    log("machine: " + json.dumps({k: (round(v["gb_s"], 2) if isinstance(v, dict) else round(v, 2))
                                  for k, v in results["machine_rates"].items()}))
    results["sampler_ms"] = sampler_cost(cfg32.text.vocab_size, sorted(set(batches) | {16}))
    log(f"generation.sample vs argmax (ms per call): {results['sampler_ms']}")
    results["decode_parts"] = decode_parts(cfg32)
    log(f"decode parts: {json.dumps(results['decode_parts'])}")
    checkpoint("machine")

    # ------------------------------------------------ weights: the transformers model, converted to ours (float32)
    log(f"building the transformers {args.preset} model (float32)")
    model = fw.build_torch(cfg32, args.seed)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    params = fw.to_jax_params(state, cfg32)
    del state
    if not use_torch:
        del model
        model = None
    checkpoint("converted")
    bytes32, n_params, n_matmul = llm_weight_bytes(params, 4)
    results["llm_weights"] = dict(params=n_params, matmul_params=n_matmul, bytes_fp32=bytes32,
                                  bytes_bf16=n_params * 2,
                                  note="decoder layers + final norm + embedding matrix (tied head)")
    tokens = {}

    # ------------------------------------------------ float32
    if "float32" in dtypes:
        for b in batches:
            compile_ours(cfg32, params, inputs[b], new, ladders, "float32", compile_s, temp_gb, with_argmax=True)
        checkpoint("float32_compiled")
        if 1 in batches:
            reps = []
            for r in range(1 + args.repeats):
                timing, toks, st = ours_generate_timed(cfg32, params, inputs[1], new, ladders)
                log(f"ours float32 b1 run {r}{' (warm-up)' if r == 0 else ''}: prefill "
                    f"{timing['prefill_latency_s']:.2f} s, decode {timing['decode_tok_s']:.2f} tok/s")
                if r:
                    reps.append(timing)
            entry = dict(min(reps, key=lambda t: t["prefill_latency_s"] + t["decode_s"]))
            entry["repeats"] = [{k: t[k] for k in ("prefill_latency_s", "decode_tok_s", "prefill_cpu_use",
                                                    "decode_cpu_use")} for t in reps]
            entry["prefill_latency_s_median"] = statistics.median(t["prefill_latency_s"] for t in reps)
            entry["decode_tok_s_median"] = statistics.median(t["decode_tok_s"] for t in reps)
            record("ours/float32/b1", entry)
            tokens["ours/float32/b1"] = toks
            am, am_toks = argmax_decode_timed(cfg32, params, st, min(32, new - 1), 1)
            record("ours/float32/b1/decode_argmax", am)
            del st
            if not args.skip_e2e:
                e2e, e2e_toks = ours_e2e(cfg32, params, inputs[1], new, ladders)
                record("ours/float32/b1/e2e_generate", e2e)
                results["token_match"]["ours_generate_api_vs_timed_loop_b1"] = match(e2e_toks, toks)
            if use_torch:
                torch_generate(model, cfg32, inputs[1], 2)  # warm-up
                t1 = torch_t1(model, cfg32, inputs[1])
                timing, ttoks = torch_generate(model, cfg32, inputs[1], new)
                timing.update(t1_s=t1["t1_s"], t1_cpu_use=t1["cpu_use"],
                              decode_tok_s_from_t64_minus_t1=(new - 1) / (timing["total_s"] - t1["t1_s"]))
                record("torch/float32/b1", timing)
                tokens["torch/float32/b1"] = ttoks
                results["token_match"]["float32_b1_ours_vs_transformers"] = match(toks, ttoks)
                log(f"token match float32 b1: {results['token_match']['float32_b1_ours_vs_transformers']}")
        for b in [b for b in batches if b != 1]:
            timing, toks, st = ours_generate_timed(cfg32, params, inputs[b], new, ladders)
            record(f"ours/float32/b{b}", timing)
            tokens[f"ours/float32/b{b}"] = toks
            am, _ = argmax_decode_timed(cfg32, params, st, min(32, new - 1), b)
            record(f"ours/float32/b{b}/decode_argmax", am)
            del st
            if "ours/float32/b1" in tokens:
                results["token_match"][f"ours_b{b}_row0_vs_ours_b1"] = match(toks[:1], tokens["ours/float32/b1"])
            if use_torch:
                timing, ttoks = torch_generate(model, cfg32, inputs[b], new)
                record(f"torch/float32/b{b}", timing)
                tokens[f"torch/float32/b{b}"] = ttoks
                results["token_match"][f"float32_b{b}_ours_vs_transformers"] = match(toks, ttoks)
                log(f"token match float32 b{b}: {results['token_match'][f'float32_b{b}_ours_vs_transformers']}")
        checkpoint("float32")
    # ------------------------------------------------ transformers bfloat16 (cast in place), then freed
    if model is not None and "bfloat16" in dtypes:
        model.to(torch.bfloat16)
        checkpoint("torch_cast_bf16")
        if 1 in batches:
            timing, ttoks = torch_generate(model, cfg32, inputs[1], new)
            record("torch/bfloat16/b1", timing)
            tokens["torch/bfloat16/b1"] = ttoks
        for b in [b for b in batches if b != 1]:
            if args.torch_bf16_b8 == "skip":
                continue
            if args.torch_bf16_b8 == "full":
                timing, _ = torch_generate(model, cfg32, inputs[b], new, budget_s=args.decode_budget_s)
                record(f"torch/bfloat16/b{b}", timing)
            else:
                ids = inputs[b]["input_ids"]
                text = np.array([row[row != cfg32.image_token_id] for row in ids])
                text = text[:, ~np.isin(text[0], [cfg32.vision_start_token_id, cfg32.vision_end_token_id])]
                proxy = dict(input_ids=text, attention_mask=np.ones_like(text))
                timing, _ = torch_generate(model, cfg32, proxy, new, budget_s=args.decode_budget_s)
                timing["note"] = (f"proxy: the same rows without the image ({text.shape[1]}-token text prompt); "
                                  "prefill latency not comparable, decode rate is (cache shorter by 258 keys)")
                record(f"torch/bfloat16/b{b}/text_proxy", timing)
    if model is not None:
        del model
        model = None
    checkpoint("torch_freed")

    # ------------------------------------------------ float32, default Ladders (after torch is freed: memory)
    if not args.skip_default_ladders and "float32" in dtypes:
        default = Ladders()
        if 1 in batches:
            compile_ours(cfg32, params, inputs[1], new, default, "float32_default_ladders", compile_s, temp_gb)
            timing, toks, st = ours_generate_timed(cfg32, params, inputs[1], new, default, decode_budget_s=10)
            del st
            record("ours/float32/b1/default_ladders", timing)
        for b in [b for b in batches if b != 1]:
            s = shapes_for(default, b, length, b * int(np.prod(GRID)), new)
            start = time.perf_counter()
            _, _, decode = programs(cfg32)
            cache = cache_struct(cfg32, params, host_prep(cfg32, inputs[b], new, default),
                                 jax.random.fold_in(jax.random.key(0), 0))
            decode.lower(params, np.zeros((s.batch,), np.int32), np.zeros((3, s.batch, 1), np.int32), cache,
                         jnp.int32(s.length), np.zeros((s.batch, s.cache), np.int32),
                         (jnp.float32(0.0), jnp.int32(0), jnp.float32(1.0)),
                         jax.random.fold_in(jax.random.key(0), 0)).compile()
            compile_s[f"float32_default_ladders/decode/b{s.batch}xC{s.cache}"] = round(
                time.perf_counter() - start, 2)
            timing = zero_cache_decode_timed(cfg32, params, cache, s.batch, s.length, s.cache, 8)
            timing["decode_tok_s"] = b * timing["decode_steps"] / timing["decode_s"]
            timing["note"] = (f"decode only, zero cache; the default ladders run batch {b} as {s.batch} rows, "
                              f"prompt {length} as {s.length}, cache {s.cache}, vision rows "
                              f"{b * int(np.prod(GRID))} as {s.vision_rows}; tok/s counts the {b} real rows")
            record(f"ours/float32/b{b}/default_ladders_decode", timing)
        checkpoint("default_ladders")

    # ------------------------------------------------ ours bfloat16 and bf16 params + fp32 compute
    if "bfloat16" in dtypes:
        params = fw.cast_params_inplace(params, jnp.bfloat16)
        checkpoint("ours_cast_bf16")
        variants = (("bfloat16", dict(dtype="bfloat16", param_dtype="bfloat16")),
                    ("bf16_params_f32_compute", dict(dtype="float32", param_dtype="bfloat16")))
        for label, change in variants:
            cfg = cfg32.replace(**change)
            for b in batches:
                compile_ours(cfg, params, inputs[b], new, ladders, label, compile_s, temp_gb)
            for b in batches:
                timing, toks, st = ours_generate_timed(cfg, params, inputs[b], new, ladders,
                                                       decode_budget_s=args.decode_budget_s)
                del st
                record(f"ours/{label}/b{b}", timing)
                tokens[f"ours/{label}/b{b}"] = toks
            checkpoint(label)
        if "ours/bfloat16/b1" in tokens and "torch/bfloat16/b1" in tokens:
            results["token_match"]["bfloat16_b1_ours_vs_transformers"] = match(tokens["ours/bfloat16/b1"],
                                                                               tokens["torch/bfloat16/b1"])
        if "ours/bf16_params_f32_compute/b1" in tokens and "ours/float32/b1" in tokens:
            results["token_match"]["bf16_params_f32_compute_b1_vs_ours_float32"] = match(
                tokens["ours/bf16_params_f32_compute/b1"], tokens["ours/float32/b1"])

    results["tokens"] = {k: v.tolist() for k, v in tokens.items()}
    summarize(results, batches)
    fw.write_results(results, args.out, T0, print_table, indent=1)


def summarize(results, batches):
    runs, rates, w = results["runs"], results["machine_rates"], results["llm_weights"]
    bw, peak = rates["roofline_gb_s"], rates["peak_gflop_s"]
    rows = []
    variants = (("float32", "float32", w["bytes_fp32"]), ("bfloat16", "bfloat16", w["bytes_bf16"]),
                ("bf16_params_f32_compute", "bfloat16", w["bytes_bf16"]))
    for ours_dt, torch_dt, nbytes in variants:
        for b in batches:
            o = runs.get(f"ours/{ours_dt}/b{b}")
            if o is None:
                continue
            t = runs.get(f"torch/{torch_dt}/b{b}")
            proxy = False
            if t is None and f"torch/{torch_dt}/b{b}/text_proxy" in runs:
                t, proxy = runs[f"torch/{torch_dt}/b{b}/text_proxy"], True
            mem_roof = b * bw * 1e9 / nbytes
            compute_roof = peak * 1e9 / (2 * w["matmul_params"])  # per row: independent of batch
            row = dict(ours=ours_dt, torch=torch_dt, batch=b, weight_bytes=nbytes,
                       roofline_tok_s=mem_roof, compute_roofline_tok_s=compute_roof,
                       ours_prefill_s=o["prefill_latency_s"], ours_decode_tok_s=o["decode_tok_s"],
                       ours_decode_steps=o["decode_steps"], ours_pct_roofline=100 * o["decode_tok_s"] / mem_roof,
                       ours_cpu_use=[o["prefill_cpu_use"], o["decode_cpu_use"]],
                       torch_prefill_s=None if (t is None or proxy) else t["prefill_latency_s"],
                       torch_decode_tok_s=None if t is None else t["decode_tok_s"],
                       torch_decode_is_text_proxy=proxy,
                       torch_pct_roofline=None if t is None else 100 * t["decode_tok_s"] / mem_roof,
                       torch_cpu_use=None if t is None else t["cpu_use"])
            row["prefill_speedup"] = (row["torch_prefill_s"] / row["ours_prefill_s"]
                                      if row["torch_prefill_s"] else None)
            row["decode_ratio_ours_over_torch"] = (row["ours_decode_tok_s"] / row["torch_decode_tok_s"]
                                                   if row["torch_decode_tok_s"] else None)
            am = runs.get(f"ours/{ours_dt}/b{b}/decode_argmax")
            if am:
                row["ours_argmax_decode_tok_s"] = am["decode_tok_s"]
                row["ours_argmax_pct_roofline"] = 100 * am["decode_tok_s"] / mem_roof
            rows.append(row)
    results["table"] = rows
    goals = {}
    for row in rows:
        if row["ours"] == "float32" and row["batch"] == 1:
            goals["float32_b1_decode_ge_80pct_roofline"] = dict(pct=row["ours_pct_roofline"],
                                                                met=row["ours_pct_roofline"] >= 80)
        if row["ours"] == "float32" and row["batch"] == 8 and row["decode_ratio_ours_over_torch"]:
            goals["float32_b8_decode_ge_1.5x_transformers"] = dict(ratio=row["decode_ratio_ours_over_torch"],
                                                                   met=row["decode_ratio_ours_over_torch"] >= 1.5)
    results["goals"] = goals
    best = {}
    for b in batches:
        cands = {r["ours"]: r["ours_decode_tok_s"] for r in rows if r["batch"] == b}
        if cands:
            best[f"b{b}"] = max(cands, key=cands.get)
    results["fastest_ours_decode_dtype_on_cpu"] = best


def print_table(results):
    f = lambda x, w=8, p=2: f"{x:{w}.{p}f}" if isinstance(x, (int, float)) else f"{'-':>{w}s}"
    r = results["machine_rates"]
    print(f"\nQwen2-VL {results['preset']} generate: 448x448 image + 32 text tokens "
          f"(L={results['input']['prompt_length']}), {results['input']['new_tokens']} new tokens greedy, CPU "
          f"{results['settings']['threads']} threads")
    print("bandwidth GB/s: " + ", ".join(f"{k} {v['gb_s']:.2f}" for k, v in r.items() if isinstance(v, dict))
          + f"; roofline uses {r['roofline_gb_s']:.2f}; fp32 matmul peak {r['peak_gflop_s']:.0f} GFLOP/s")
    print(f"{'ours':24s} {'B':>2s} {'torch pre s':>11s} {'ours pre s':>10s} {'x':>5s} {'torch tok/s':>11s} "
          f"{'ours tok/s':>10s} {'roof':>6s} {'torch %':>7s} {'ours %':>6s} {'ours/torch':>10s} {'argmax tok/s':>12s}")
    for row in results["table"]:
        print(f"{row['ours']:24s} {row['batch']:2d} {f(row['torch_prefill_s'], 11)} {f(row['ours_prefill_s'], 10)} "
              f"{f(row['prefill_speedup'], 5)} {f(row['torch_decode_tok_s'], 11)}"
              f"{'*' if row['torch_decode_is_text_proxy'] else ' '}{f(row['ours_decode_tok_s'], 9)} "
              f"{f(row['roofline_tok_s'], 6, 1)} {f(row['torch_pct_roofline'], 7, 0)} "
              f"{f(row['ours_pct_roofline'], 6, 0)} {f(row['decode_ratio_ours_over_torch'], 10)} "
              f"{f(row.get('ours_argmax_decode_tok_s'), 12)}")
    print("x = torch prefill / ours prefill; % = of the bandwidth roofline B*BW/weight bytes; * = text-only proxy; "
          "bf16_params_f32_compute compared with torch bf16")
    print("cpu use (prefill, decode): " + ", ".join(
        f"{k} {v.get('prefill_cpu_use', v.get('cpu_use', v.get('t1_cpu_use')))}/"
        f"{v.get('decode_cpu_use', v.get('t64_cpu_use', ''))}"
        for k, v in results["runs"].items()))
    print("compile s: " + ", ".join(f"{k} {v}" for k, v in results["compile_s"].items()))
    for k, v in results["token_match"].items():
        print(f"tokens {k}: " + "; ".join(f"{m['matching']}/{m['of']} (first mismatch {m['first_mismatch']})"
                                          for m in v))
    print(f"goals: {results['goals']}")
    print(f"sampler ms (sample vs argmax): {results['sampler_ms']}")
    dp = results.get("decode_parts", {})
    if dp:
        print("XLA matmul [B,1,1536]@[1536,8960]: " + ", ".join(
            f"{k} {v['ms']:.2f} ms ({v['gflop_s']:.0f} GFLOP/s)" for k, v in dp["matmul"].items()))
        print("decode KV-cache part, all layers (attention only / + cache update): " + ", ".join(
            f"{k} {v['attention_only_ms']:.0f}/{v['with_update_ms']:.0f} ms" for k, v in
            dp["cache_attention"].items()))
    print(f"peak RSS {results['peak_rss_gb']} GB; total {results['total_runtime_s']} s")


if __name__ == "__main__":
    main()

"""Packed-ViT attention cost: sixteen 224×224 images vs one 896×896 image (both 4096 patch rows).

Qwen2-VL-2B ViT attention shape: 16 heads × head_dim 80, float32, all images packed into one sequence (B = 1) and
separated by segment ids. Sixteen 224×224 images are 16 segments of 256 patches; one 896×896 image is one segment of
4096. With the "xla" backend (blockwise above BLOCKWISE_MIN_LENGTH) the packed case should cost ~1/16 of the single
image; the dense path ("xla_dense") costs the same (4096²) for both.

    python bench/vit_packing.py [--repeats 5] [--no-grad]

Times are the minimum (and median) wall time over `repeats` calls of a jitted function after one warm-up call, on
the CPU with 2 XLA threads. Writes bench/results/vit_packing.json.
"""
import os

os.environ.setdefault("NPROC", "2")  # XLA:CPU sizes its intra-op thread pool from NPROC (no XLA_FLAGS flag does)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from qwen2vl_jax.attention import (BLOCKWISE_MIN_LENGTH, DEFAULT_BLOCK_SIZE, dot_product_attention,  # noqa: E402
                                   visited_block_pairs)

HEADS, HEAD_DIM = 16, 80
CASES = {"16 x 224x224 (16 x 256)": [256] * 16, "1 x 896x896 (1 x 4096)": [4096]}
IMPLEMENTATIONS = ("xla", "xla_dense")


def _time(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * min(times), 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-grad", action="store_true", help="skip the forward+backward timings")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "vit_packing.json"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    rows = sum(CASES["1 x 896x896 (1 x 4096)"])
    q, k, v, ct = (jnp.asarray(rng.standard_normal((1, rows, HEADS, HEAD_DIM)), jnp.float32) for _ in range(4))
    results = []
    for case, lengths in CASES.items():
        seg = jnp.asarray(np.repeat(np.arange(len(lengths)), lengths)[None], jnp.int32)
        pairs, dense_pairs = int(visited_block_pairs(seg)), (rows // DEFAULT_BLOCK_SIZE) ** 2
        for impl in IMPLEMENTATIONS:
            fwd = jax.jit(lambda q, k, v, s, impl=impl: dot_product_attention(q, k, v, segment_ids=s,
                                                                             implementation=impl))
            entry = {"case": case, "segments": lengths, "implementation": impl,
                     "block_pairs": pairs if impl == "xla" else dense_pairs}
            entry["fwd_ms_min"], entry["fwd_ms_median"] = _time(fwd, (q, k, v, seg), args.repeats)
            if not args.no_grad:
                loss = lambda q, k, v, s, impl=impl: jnp.sum(
                    dot_product_attention(q, k, v, segment_ids=s, implementation=impl) * ct)
                grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
                entry["fwd_bwd_ms_min"], entry["fwd_bwd_ms_median"] = _time(grad, (q, k, v, seg),
                                                                            max(1, args.repeats // 2))
            results.append(entry)
            print(f"  {case:26s} {impl:10s} fwd {entry['fwd_ms_min']:9.1f} ms", flush=True)

    def ratio(key, impl):
        packed, single = (next(r[key] for r in results if r["case"] == c and r["implementation"] == impl)
                          for c in CASES)
        return packed / single

    print(f"\nViT-2B attention (H={HEADS}, D={HEAD_DIM}, float32, {rows} rows), {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs; block {DEFAULT_BLOCK_SIZE}, blockwise from L >= {BLOCKWISE_MIN_LENGTH}")
    head = f"{'case':26s} {'impl':10s} {'pairs':>6s} {'fwd min ms':>11s} {'fwd med ms':>11s}"
    head += "" if args.no_grad else f" {'fwd+bwd min ms':>15s}"
    print(head)
    for r in results:
        line = (f"{r['case']:26s} {r['implementation']:10s} {r['block_pairs']:6d} {r['fwd_ms_min']:11.1f} "
                f"{r['fwd_ms_median']:11.1f}")
        print(line + ("" if args.no_grad else f" {r['fwd_bwd_ms_min']:15.1f}"))
    summary = {impl: {"fwd_packed_over_single": ratio("fwd_ms_min", impl)} for impl in IMPLEMENTATIONS}
    if not args.no_grad:
        for impl in IMPLEMENTATIONS:
            summary[impl]["fwd_bwd_packed_over_single"] = ratio("fwd_bwd_ms_min", impl)
    for impl, s in summary.items():
        print(f"packed / single ({impl}): " + ", ".join(f"{k} {v:.3f}" for k, v in s.items()))

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"shape": {"heads": HEADS, "head_dim": HEAD_DIM, "rows": rows, "dtype": "float32"},
                   "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(), "machine": platform.machine(),
                   "jax": jax.__version__, "nproc": os.environ.get("NPROC", ""), "repeats": args.repeats,
                   "block_size": DEFAULT_BLOCK_SIZE, "blockwise_min_length": BLOCKWISE_MIN_LENGTH,
                   "results": results, "packed_over_single": summary}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

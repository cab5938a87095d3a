"""Splash attention block sparsity from segment ids: (q block, kv block) pairs the kernel runs, and its Pallas TPU
interpret-mode forward time on this CPU, segment-aware (today's kernel) vs every pair (the FullMask + segment ids
kernel it replaced, which visited all (Σ nᵢ)² / b² pairs), for the packed ViT layouts users send:

- sixteen 224² images (16 × 256 rows, one 4096-row shard);
- one 1344² image (9216 rows, one segment: nothing to skip);
- a 61-s 720p video at 2 fps and the default budget (qwen-vl-utils' frame rule: 122 frames → 61 frame-pairs);
- the Qwen2.5-VL window layers of the 1344² image (64-patch windows), at 512- and 128-row blocks.

Pairs come from `attention_pallas.visited_block_pairs` (the mask info the kernel gets), grid steps from
`attention_pallas.grid_steps` (the grid narrows to the busiest block row). Interpret-mode time is a CPU simulation of
the kernel's grid (forward, one head, head_dim 128, float32); the every-pair run is skipped when its estimate passes
--time-limit. A TPU model beside them (not a measurement): per head, forward, v5e — steps × 0.35 µs (Pallas' per grid
step overhead) + pairs × 4·b²·128 FLOPs at 197 TFLOP/s.

    python bench/splash_sparsity.py [--time-limit 120]

Writes bench/results/splash_sparsity.json.
"""
import argparse
import json
import platform
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax import Qwen2VLConfig, attention_pallas
from qwen2vl_jax.inputs import vision_layout
from qwen2vl_jax.processing.video import num_sampled_frames, video_frame_size


def _video_grids():
    frames = num_sampled_frames(61 * 30, 30.0)
    h, w = video_frame_size(frames, 720, 1280)
    return [(frames // 2, h // 14, w // 14)], (frames, h, w)


def _cases():
    (video, (frames, h, w)) = _video_grids()
    window_units = Qwen2VLConfig.preset("2.5-7b").vision.window_size // 28  # merged units per window side
    window = vision_layout(np.array([(1, 96, 96)]), 2, window_units=window_units).segment_ids
    return {
        "16 x 224x224": (np.repeat(np.arange(1, 17), 256), 512),
        "1 x 1344x1344": (vision_layout(np.array([(1, 96, 96)]), 2).segment_ids, 512),
        f"61-s 720p video ({frames} frames at {h}x{w})": (vision_layout(np.array(video), 2).segment_ids, 512),
        "2.5-VL windows, 1344x1344, 512-row blocks": (window, 512),
        "2.5-VL windows, 1344x1344, 128-row blocks": (window, 128),
    }


def _every_pair(seg_q, seg_kv, bq, bk, causal_offset=None):
    return jnp.ones((seg_q.shape[0] // bq, seg_kv.shape[0] // bk), bool)


def _tpu_model_us(steps, pairs, block):
    return steps * 0.35 + pairs * 4 * block * block * 128 / 197e12 * 1e6


def _interpret_seconds(seg, block, dense: bool) -> float:
    rows = len(seg)
    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, rows, 1, 128)), jnp.float32)
    ids = jnp.asarray(seg[None], jnp.int32)
    fn = jax.jit(lambda q, s: attention_pallas._splash(q, q, q, s, None, False, mode="tpu_interpret",
                                                       max_block=block))
    with attention_pallas.pallas_interpret(), mock.patch.object(
            attention_pallas, "block_runs", _every_pair if dense else attention_pallas.block_runs):
        fn.lower(q, ids).compile()
        start = time.perf_counter()
        fn(q, ids).block_until_ready()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--time-limit", type=float, default=120.0,
                        help="skip the every-pair interpret run when its estimate exceeds this (s)")
    parser.add_argument("--out", default="bench/results/splash_sparsity.json")
    args = parser.parse_args()
    results = []
    for name, (seg, block) in _cases().items():
        seg = np.asarray(seg, np.int32)
        rows = len(seg)
        pairs = int(attention_pallas.visited_block_pairs(jnp.asarray(seg[None]), max_block=block)[0])
        steps = attention_pallas.grid_steps(jnp.asarray(seg[None]), max_block=block)
        n = -(-rows // block)
        aware = _interpret_seconds(seg, block, dense=False)
        estimate = aware * n * n / max(steps, 1)
        dense = _interpret_seconds(seg, block, dense=True) if estimate <= args.time_limit else None
        row = {"case": name, "rows": rows, "block": block, "segments": int(len(np.unique(seg[seg >= 0]))),
               "pairs_segment_aware": pairs, "grid_steps_segment_aware": steps, "pairs_every": n * n,
               "pair_ratio": n * n / pairs, "interpret_s_segment_aware": aware, "interpret_s_every_pair": dense,
               "interpret_every_pair_estimate_s": estimate,
               "tpu_model_us_segment_aware": _tpu_model_us(steps, pairs, block),
               "tpu_model_us_every_pair": _tpu_model_us(n * n, n * n, block),
               "smem_bytes_per_mask_info": steps // n * n * (1 + (1 if n <= 127 else 2))}
        print(json.dumps(row))
        results.append(row)
    with open(args.out, "w") as f:
        json.dump({"jax": jax.__version__, "machine": platform.processor() or platform.machine(),
                   "cores": __import__("os").cpu_count(), "cases": results}, f, indent=2)


if __name__ == "__main__":
    main()

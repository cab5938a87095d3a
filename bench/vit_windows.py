"""Qwen2.5-VL window attention: ViT forward time of the 7B layout, windowed (as released) vs every block full.

The 2.5-7b vision tower (32 blocks, width 1280, 16 heads, SwiGLU 3420; blocks 7/15/23/31 attend within the image,
the rest within 112-px windows of 8×8 patches) on one 1344×1344 image (9216 patch rows, one segment) and on sixteen
336×336 images (16 × 576 rows). The packed ViT runs through the library's own path: `prepare_inputs` lays out the
window order and window segment ids, `Qwen2VL.encode_vision` is jitted, attention is the default "xla" backend
(blockwise above its minimum length, so a window block visits only the diagonal kv blocks).

A 32-block fp32 forward at 9216 rows takes minutes on 2 cores, so each kind of block is timed in a 2-block tower of
the real width (window-only and full-only) and the 32-block figures are composed from those per-block times
(28 window + 4 full, vs 32 full); the patch embedding and merger are timed once and added to both.

    python bench/vit_windows.py [--repeats 2]

Writes bench/results/vit_windows.json.
"""
import os

os.environ.setdefault("NPROC", "2")  # XLA:CPU sizes its intra-op thread pool from NPROC

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from qwen2vl_jax import Qwen2VL, Qwen2VLConfig  # noqa: E402
from qwen2vl_jax.inputs import gather_vision_pixels, prepare_inputs  # noqa: E402
from qwen2vl_jax.model import init_params  # noqa: E402
from vit_packing import _time  # noqa: E402  (bench/ is sys.path[0] when run as a script)

CASES = {"1 x 1344x1344": [(1, 96, 96)], "16 x 336x336": [(1, 24, 24)] * 16}


def _config(depth: int, full: tuple[int, ...]) -> Qwen2VLConfig:
    """The 2.5-7b ViT with `depth` blocks (full attention at `full`) over a one-layer stub decoder (only the ViT
    runs; the stub keeps init from allocating 7B text weights)."""
    base = Qwen2VLConfig.preset("2.5-7b")
    stub = dataclasses.replace(base.text, vocab_size=16, intermediate_size=64, num_hidden_layers=1)
    return base.replace(vision=dataclasses.replace(base.vision, depth=depth, fullatt_block_indexes=full), text=stub,
                        image_token_id=5, video_token_id=6, vision_start_token_id=7, vision_end_token_id=8,
                        bos_token_id=9, eos_token_id=10, pad_token_id=9)


def _tower_time(config: Qwen2VLConfig, grids, repeats: int) -> float:
    """Seconds of one jitted encode_vision over the packed grids (random weights, random pixels)."""
    merge2 = config.vision.spatial_merge_size ** 2
    ids = np.full((1, sum(int(np.prod(g)) // merge2 for g in grids)), config.image_token_id)
    prepared = prepare_inputs(config, ids, image_grid_thw=np.array(grids), image_rows=int(sum(np.prod(g) for g in grids)))
    rows = prepared["vision_rows"]
    pixels = gather_vision_pixels(np.random.default_rng(0).standard_normal((len(rows), config.vision.patch_dim),
                                                                           np.float32), rows)
    params = init_params(config)
    model = Qwen2VL(config)
    fn = jax.jit(lambda p, x, pos, seg: model.apply({"params": p}, x, pos, seg, method=Qwen2VL.encode_vision))
    best_ms, _ = _time(fn, (params, pixels, prepared["vision_pos_hw"], prepared["vision_segment_ids"]), repeats)
    return best_ms / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    released = Qwen2VLConfig.preset("2.5-7b").vision
    n_full = len(released.fullatt_block_indexes)
    n_window = released.depth - n_full
    results = {}
    for name, grids in CASES.items():
        window2 = _tower_time(_config(2, ()), grids, args.repeats)
        full2 = _tower_time(_config(2, (0, 1)), grids, args.repeats)
        window4 = _tower_time(_config(4, ()), grids, args.repeats)
        per_window = (window4 - window2) / 2  # two more window blocks; the rest (embed, merger) cancels
        per_full = per_window + (full2 - window2) / 2
        rest = window2 - 2 * per_window
        windowed = rest + n_window * per_window + n_full * per_full
        all_full = rest + released.depth * per_full
        results[name] = dict(rows=int(sum(np.prod(g) for g in grids)), window_block_s=round(per_window, 3),
                             full_block_s=round(per_full, 3), embed_and_merger_s=round(rest, 3),
                             windowed_32_blocks_s=round(windowed, 2), all_full_32_blocks_s=round(all_full, 2),
                             speedup=round(all_full / windowed, 2))
        print(name, json.dumps(results[name]))
    out = dict(machine=f"{platform.machine()}, {os.cpu_count()} cores, NPROC={os.environ['NPROC']}",
               jax=jax.__version__, dtype="float32", attention="xla (blockwise)", cases=results)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "vit_windows.json"), "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

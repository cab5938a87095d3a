"""The CPU demo: the tiny preset (random weights) on a generated image, end to end.

    python -m qwen2vl_jax.demo [--width 640 --height 480] [--seed 0]

Draws an image, runs the Processor (chat template, smart_resize, patchify, placeholder expansion) with a small
stand-in tokenizer, lays out the packed ViT and M-RoPE on the host, and runs the jitted network twice (compile,
then steady state), printing token counts, shapes and timings."""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
from PIL import Image, ImageDraw


def draw_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width - 40), rng.integers(0, height - 40)
        x1, y1 = x0 + rng.integers(20, width // 3), y0 + rng.integers(20, height // 3)
        color = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
    return image


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import jax
    import flax.linen as nn

    from qwen2vl_jax import Qwen2VL, Qwen2VLConfig, prepare_inputs
    from qwen2vl_jax.processing import Processor
    from qwen2vl_jax.processing.fixtures import write_tiny_processor, write_tiny_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_tokenizer(folder)
        write_tiny_processor(folder, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        processor = Processor.from_pretrained(folder)
    image = draw_image(args.width, args.height, args.seed)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    t0 = time.perf_counter()
    batch = processor([messages], images=[image])
    t_pre = time.perf_counter() - t0
    grid = batch["image_grid_thw"][0]
    n_image_tokens = int(grid.prod()) // 4
    print(f"image {args.width}x{args.height} → resized {grid[2] * 14}x{grid[1] * 14}, grid_thw {grid.tolist()}, "
          f"{int(grid.prod())} patches, {n_image_tokens} LLM tokens")
    print(f"prompt: {batch['input_ids'].shape[1]} tokens ({batch['input_ids'].shape[1] - n_image_tokens} text), "
          f"pixel_values {batch['pixel_values'].shape}, preprocessing {t_pre * 1e3:.1f} ms")

    config = Qwen2VLConfig.preset("tiny")
    model = Qwen2VL(config)
    prepared = prepare_inputs(config, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                              image_rows=len(batch["pixel_values"]))
    forward = jax.jit(lambda p, ids, prep, px: model.apply({"params": p}, ids, prep, px, method=Qwen2VL.forward))
    t0 = time.perf_counter()
    params = nn.unbox(jax.jit(lambda key: model.init(key, batch["input_ids"], prepared, batch["pixel_values"],
                                                     method=Qwen2VL.forward))(jax.random.key(args.seed))["params"])
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"tiny preset: {n_params / 1e6:.2f} M random params, init {time.perf_counter() - t0:.2f} s")
    for label in ("compile + run", "steady state"):
        t0 = time.perf_counter()
        logits = jax.block_until_ready(forward(params, batch["input_ids"], prepared, batch["pixel_values"]))
        print(f"forward ({label}): {time.perf_counter() - t0:.3f} s, logits {logits.shape} {logits.dtype}")
    next_token = int(np.asarray(logits[0, -1]).argmax())
    print(f"greedy next token id (random weights): {next_token}")


if __name__ == "__main__":
    main()

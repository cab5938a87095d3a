"""`qwen2vl-generate`: answer one prompt about an image and/or a video with a checkpoint folder.

    qwen2vl-generate --checkpoint qwen2vl-2b/ --image cat.jpg --prompt "What is in the picture?"

The folder is one written by qwen2vl-convert (or a Hugging Face folder): weights, config.json, tokenizer.json and
preprocessor_config.json. --video takes a video file (mp4, webm, mkv, mov, avi, gif, ...: decoded with PyAV and
sampled at 2 fps as qwen-vl-utils does), a folder of frame images (already sampled, in name order) or a .npy array
uint8[T, H, W, 3]."""
from __future__ import annotations

import argparse
import sys
import time

from evaluation.serving import DEFAULT_MESH, add_model_flags, open_model


def answer(checkpoint: str, prompt: str, image: str | None = None, video: str | None = None, *,
           max_new_tokens: int = 128, temperature: float | None = None, top_k: int | None = None,
           top_p: float | None = None, seed: int = 0, dtype: str | None = None, mesh: str = DEFAULT_MESH) -> str:
    """The model's answer (special tokens removed). Sampling options left None take the checkpoint's
    generation_config.json (greedy when it has none)."""
    import qwen2vl_jax
    from qwen2vl_jax.processing import Processor

    processor = Processor.from_pretrained(checkpoint)
    model = open_model(checkpoint, mesh, dtype)
    content = ([{"type": "image"}] if image else []) + ([{"type": "video"}] if video else [])
    messages = [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]
    batch = processor(messages, images=[image] if image else None,
                      videos=[video] if video else None)
    with model.context():
        tokens = qwen2vl_jax.generate(model.config, model.params, batch, max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                      eos_token_ids=processor.tokenizer.eos_token_ids)
    return processor.decode(tokens[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwen2vl-generate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="folder from qwen2vl-convert, or a Hugging Face folder")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--image", help="image file")
    parser.add_argument("--video", help="video file, folder of frames or .npy uint8[T, H, W, 3]")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, help="0: greedy (default: the checkpoint's "
                                                           "generation_config.json, else greedy)")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    add_model_flags(parser)
    from qwen2vl_jax.compiles import add_cache_flag, cache_from_flag

    add_cache_flag(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cache = cache_from_flag(args.compile_cache)
    try:
        with cache:
            text = answer(args.checkpoint, args.prompt, args.image, args.video, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          dtype=args.dtype, mesh=args.mesh)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"qwen2vl-generate: {error}")
    print(text)
    programs = cache.programs
    print(f"[{time.perf_counter() - start:.1f} s; {programs.loaded()} programs loaded from the cache, "
          f"{programs.compiled()} compiled]", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Test helpers: random-weight transformers reference models and the same weights as our params."""
from __future__ import annotations

import functools

import numpy as np
import torch
import transformers

from qwen2vl_jax import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_jax.checkpoint.mapping import params_from_torch

# Small vocabularies keep logits cheap; special token ids are remapped into them.
_TOKENS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=498, vision_end_token_id=499,
               bos_token_id=497, eos_token_id=496, pad_token_id=497)

CONFIGS = {
    # tied embeddings, 4 query heads over 2 kv heads
    "tied": Qwen2VLConfig(
        vision=VisionConfig(depth=2, embed_dim=64, num_heads=4, mlp_ratio=2.0, hidden_size=64),
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        tie_word_embeddings=True), **_TOKENS),
    # untied head, 6 query heads over 2 kv heads (3 per group), 3 vision heads
    "untied": Qwen2VLConfig(
        vision=VisionConfig(depth=3, embed_dim=48, num_heads=3, mlp_ratio=4.0, hidden_size=96),
        text=TextConfig(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        tie_word_embeddings=False, rope_theta=10000.0), **_TOKENS),
}


def hf_config(cfg: Qwen2VLConfig) -> transformers.Qwen2VLConfig:
    return transformers.Qwen2VLConfig(**cfg.to_hf_dict())


@functools.lru_cache(maxsize=None)
def reference(name: str, seed: int = 0):
    """(our config, transformers model in float32 eval mode, our float32 params) sharing random weights.

    Every tensor, norms and biases included, is redrawn so that a wrong layout cannot hide behind zeros/ones."""
    cfg = CONFIGS[name]
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(hf_config(cfg)).eval()
    redraw(model)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, model, params_from_torch(state, cfg)


def redraw(model) -> None:
    """Redraws every tensor of a transformers model in place (from torch's current seed): norm weights 1 + 0.1·randn,
    matrices randn / sqrt(fan_in) (unit-scale activations), embeddings and biases 0.3·randn."""
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or "layernorm" in pname or "norm1.weight" in pname or \
                    "norm2.weight" in pname or "ln_q.weight" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim >= 2 and "embed_tokens" not in pname:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.3 * torch.randn_like(p))


def mm_token_type_ids(cfg: Qwen2VLConfig, input_ids: np.ndarray) -> np.ndarray:
    return (input_ids == cfg.image_token_id) * 1 + (input_ids == cfg.video_token_id) * 2


def torch_logits(model, cfg: Qwen2VLConfig, batch: dict) -> np.ndarray:
    """Runs the transformers model on a dict of numpy arrays with HF names → float32 logits [B, L, V]."""
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if v is not None}
    kwargs["mm_token_type_ids"] = torch.from_numpy(mm_token_type_ids(cfg, np.asarray(batch["input_ids"])))
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def prompt(cfg: Qwen2VLConfig, rng: np.random.Generator, pieces) -> list[int]:
    """Token ids from pieces: an int n → n random text tokens; ("image", grid) / ("video", grid) → the vision
    block <vision_start> placeholders×(grid.prod()/4) <vision_end>."""
    ids = []
    for piece in pieces:
        if isinstance(piece, int):
            ids += rng.integers(0, 490, piece).tolist()
        else:
            kind, grid = piece
            token = cfg.image_token_id if kind == "image" else cfg.video_token_id
            ids += [cfg.vision_start_token_id] + [token] * (int(np.prod(grid)) // 4) + [cfg.vision_end_token_id]
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    length = max(map(len, rows))
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def pixels(rng: np.random.Generator, grids, patch_dim: int = 1176) -> np.ndarray:
    rows = int(sum(np.prod(g) for g in grids))
    return rng.standard_normal((rows, patch_dim)).astype(np.float32)


def make_request(cfg: Qwen2VLConfig, pieces, seed: int) -> dict:
    """One request as the processor would give it (HF-named arrays, batch 1) from `prompt` pieces."""
    rng = np.random.default_rng(seed)
    ids = np.array([prompt(cfg, rng, pieces)])
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for kind, px, key in (("image", "pixel_values", "image_grid_thw"),
                          ("video", "pixel_values_videos", "video_grid_thw")):
        grids = np.array([g for k, g in (p for p in pieces if isinstance(p, tuple)) if k == kind])
        if len(grids):
            out[px], out[key] = pixels(rng, grids), grids
    return out


def make_batch(cfg: Qwen2VLConfig, requests) -> dict:
    """Requests → one left-padded batch (pad_token_id on the left, vision arrays concatenated in row order), written
    out here so that tests can compare `generation.collate` with it."""
    ids, mask = left_pad([r["input_ids"][0].tolist() for r in requests], cfg.pad_token_id)
    out = {"input_ids": ids, "attention_mask": mask}
    for px, key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        parts = [r for r in requests if px in r]
        if parts:
            out[px], out[key] = np.concatenate([r[px] for r in parts]), np.concatenate([r[key] for r in parts])
    return out


def transformers_generate(model, cfg: Qwen2VLConfig, request: dict, new_tokens: int, **options) -> np.ndarray:
    """transformers' new tokens int[new_tokens] for one unpadded request (greedy, no eos unless `options` say)."""
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in request.items()}
    kwargs["mm_token_type_ids"] = torch.from_numpy(mm_token_type_ids(cfg, request["input_ids"]))
    options = dict(do_sample=False, eos_token_id=None, pad_token_id=cfg.pad_token_id) | options
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=new_tokens, **options)
    return out[0, request["input_ids"].shape[1]:].numpy()


def tiny_checkpoint(folder):
    """A tiny random Qwen2-VL checkpoint (+ processor) whose greedy answers are readable tokens."""
    import dataclasses

    from qwen2vl_jax.processing.fixtures import write_tiny_processor

    torch.manual_seed(0)
    tiny = Qwen2VLConfig.preset("tiny")
    config = hf_config(tiny.replace(text=dataclasses.replace(tiny.text, tie_word_embeddings=False)))
    config.initializer_range = 0.2
    model = transformers.Qwen2VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.lm_head.weight[400:] = 0
    model.save_pretrained(folder)
    write_tiny_processor(folder, max_pixels=28 * 28 * 16)
    return folder

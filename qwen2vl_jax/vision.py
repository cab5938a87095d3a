"""The Qwen2-VL vision tower, run PACKED: all images and frame-pairs of a batch in one sequence.

Attention is block-diagonal by segment id (one segment per frame-pair), so nothing traced depends on an image's
size, and the 2×2 PatchMerger turns every 4 consecutive rows into one LLM token."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax.attention import dot_product_attention
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.layers import LayerNorm, Linear, layer_stack, quick_gelu, run_stack
from qwen2vl_jax.rope import apply_rotary, vision_rope


class VisionAttention(nn.Module):
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        """x: [N, E]; cos, sin: float32[N, hd]; segment_ids: int32[N] → [N, E]."""
        v, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        qkv = Linear((3, v.num_heads, v.head_dim), ("embed", None, "heads", "head_dim"), dtype=dt, param_dtype=pdt,
                     name="qkv")(x)
        q, k, val = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [N, H, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = dot_product_attention(q[None], k[None], val[None], segment_ids=segment_ids[None],
                                    implementation=self.config.attention)[0]
        return Linear((v.embed_dim,), ("heads", "head_dim", "embed"), in_ndim=2, dtype=dt, param_dtype=pdt,
                      name="proj")(out)


class VisionMLP(nn.Module):
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x):
        v, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        h = quick_gelu(Linear((v.mlp_dim,), ("embed", "mlp"), dtype=dt, param_dtype=pdt, name="fc1")(x))
        return Linear((v.embed_dim,), ("mlp", "embed"), dtype=dt, param_dtype=pdt, name="fc2")(h)


class VisionBlock(nn.Module):
    """x += attn(LN1 x); x += mlp(LN2 x). Signature fits nn.scan: (carry, *broadcast) → (carry, None)."""
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        v, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        x = x + VisionAttention(self.config, name="attn")(
            LayerNorm(v.layer_norm_eps, dt, pdt, name="norm1")(x), cos, sin, segment_ids)
        x = x + VisionMLP(self.config, name="mlp")(LayerNorm(v.layer_norm_eps, dt, pdt, name="norm2")(x))
        return nn.with_logical_constraint(x, ("patches", "embed")), None


class PatchMerger(nn.Module):
    """LayerNorm per patch, then every `merge²` consecutive rows as one vector → MLP → text hidden size."""
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x):
        """x: [N, E] → [N / merge², D]."""
        v, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        group = v.spatial_merge_size**2
        x = LayerNorm(v.layer_norm_eps, dt, pdt, name="ln_q")(x).reshape(-1, group * v.embed_dim)
        x = Linear((group * v.embed_dim,), ("embed", "mlp"), dtype=dt, param_dtype=pdt, name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return Linear((v.hidden_size,), ("mlp", "embed"), dtype=dt, param_dtype=pdt, name="mlp_2")(x)


class VisionTransformer(nn.Module):
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, pixel_values, pos_hw, segment_ids, *, return_hidden: bool = False):
        """pixel_values: float[N, C·T·P·P] rows as the processor lays them out; pos_hw: int32[N, 2];
        segment_ids: int32[N] (one per frame-pair; padding rows their own segment). N must be a multiple of
        merge². Returns merged features [N / merge², D] (and the last hidden states [N, E] if asked)."""
        v, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        x = Linear((v.embed_dim,), (None, "embed"), use_bias=False, dtype=dt, param_dtype=pdt,
                   name="patch_embed")(pixel_values)
        cos, sin = vision_rope(pos_hw, v.head_dim)
        x = nn.with_logical_constraint(x, ("patches", "embed"))
        x, _ = run_stack(layer_stack(VisionBlock, self.config, v.depth, name="blocks"), self.config, x, cos, sin,
                         segment_ids)
        merged = PatchMerger(self.config, name="merger")(x)
        return (merged, x) if return_hidden else merged

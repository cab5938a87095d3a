"""The Qwen2-VL vision tower, run PACKED: the images and frame-pairs of a batch in one sequence per batch shard.

Attention is block-diagonal by segment id (one segment per frame-pair), so nothing traced depends on an image's
size, and the 2×2 PatchMerger turns every 4 consecutive rows into one LLM token. Qwen2.5-VL (`vision.windowed`): the
rows arrive window by window (`inputs.vision_layout`), window blocks attend within a window and the others within the
frame-pair, norms are RMSNorm and the MLP SwiGLU; the merger's output stays in window order (the splice index reads it
where each placeholder's feature lies), so no permutation runs on device. Inputs may carry a leading shard
axis S ([S, N, ...], logical name "batch"): each shard's patches are their own packed sequence, so on a mesh the
ViT's matmuls and attention are data-parallel over S. Without it ([N, ...]) the batch is one sequence (S = 1)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax.attention import dot_product_attention
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.inputs import WINDOW_SLOTS
from qwen2vl_jax.layers import LayerNorm, Linear, RMSNorm, layer_stack, quick_gelu, run_stack
from qwen2vl_jax.rope import apply_rotary, vision_rope


class VisionAttention(nn.Module):
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids):
        """x: [S, N, E]; cos, sin: float32[S, N, hd]; segment_ids: int32[S, N] → [S, N, E]."""
        v, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        qkv = Linear((3, v.num_heads, v.head_dim), ("embed", None, "heads", "head_dim"), dtype=dt, param_dtype=pdt,
                     lora=self.config.lora, name="qkv")(x)
        q, k, val = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]  # [S, N, H, hd]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = dot_product_attention(q, k, val, segment_ids=segment_ids, implementation=self.config.attention)
        return Linear((v.embed_dim,), ("heads", "head_dim", "embed"), in_ndim=2, dtype=dt, param_dtype=pdt,
                      lora=self.config.lora, name="proj")(out)


class VisionMLP(nn.Module):
    """Qwen2-VL: fc2(quick_gelu(fc1 x)); Qwen2.5-VL: down(silu(gate x) · up x), all with biases."""
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x):
        v, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        linear = lambda width, axes, name: Linear((width,), axes, dtype=dt, param_dtype=pdt, lora=self.config.lora,
                                                  name=name)
        if v.windowed:
            h = jax.nn.silu(linear(v.mlp_dim, ("embed", "mlp"), "gate_proj")(x)) * \
                linear(v.mlp_dim, ("embed", "mlp"), "up_proj")(x)
            return linear(v.embed_dim, ("mlp", "embed"), "down_proj")(h)
        h = quick_gelu(linear(v.mlp_dim, ("embed", "mlp"), "fc1")(x))
        return linear(v.embed_dim, ("mlp", "embed"), "fc2")(h)


def vision_norm(config: Qwen2VLConfig, name: str) -> nn.Module:
    """LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL), in float32."""
    v, dt, pdt = config.vision, config.dtype, config.param_dtype
    return (RMSNorm if v.windowed else LayerNorm)(v.layer_norm_eps, dt, pdt, name=name)


class VisionBlock(nn.Module):
    """x += attn(norm1 x); x += mlp(norm2 x). Signature fits nn.scan: (carry, *broadcast, full) → (carry, None).

    full: bool[] — this block attends within frame-pairs (segment_ids // WINDOW_SLOTS) rather than windows; None
    (Qwen2-VL) uses segment_ids as they are."""
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x, cos, sin, segment_ids, full=None):
        if full is not None:
            frames = jnp.where(segment_ids >= 0, segment_ids // WINDOW_SLOTS, segment_ids)
            segment_ids = jnp.where(full, frames, segment_ids)
        x = x + VisionAttention(self.config, name="attn")(vision_norm(self.config, "norm1")(x), cos, sin, segment_ids)
        x = x + VisionMLP(self.config, name="mlp")(vision_norm(self.config, "norm2")(x))
        return nn.with_logical_constraint(x, ("batch", "patches", "embed")), None


class PatchMerger(nn.Module):
    """LayerNorm per patch, then every `merge²` consecutive rows as one vector → MLP → text hidden size."""
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x):
        """x: [S, N, E] → [S, N / merge², D]."""
        v, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        group = v.spatial_merge_size**2
        x = vision_norm(self.config, "ln_q")(x).reshape(*x.shape[:-2], -1, group * v.embed_dim)
        x = Linear((group * v.embed_dim,), ("embed", "mlp"), dtype=dt, param_dtype=pdt,
                   lora=self.config.lora, name="mlp_0")(x)
        x = jax.nn.gelu(x, approximate=False)
        return Linear((v.hidden_size,), ("mlp", "embed"), dtype=dt, param_dtype=pdt,
                      lora=self.config.lora, name="mlp_2")(x)


class VisionTransformer(nn.Module):
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, pixel_values, pos_hw, segment_ids, *, return_hidden: bool = False):
        """pixel_values: float[S, N, C·T·P·P] rows as the processor lays them out (or [N, ...]: S = 1);
        pos_hw: int32[S, N, 2]; segment_ids: int32[S, N] (one per frame-pair; padding rows in runs of negative ids). N must
        be a multiple of merge². Returns merged features [S, N / merge², D] (and the last hidden states [S, N, E] if
        asked), without the S axis when the inputs had none."""
        v, dt, pdt = self.config.vision, self.config.dtype, self.config.param_dtype
        unsharded = pixel_values.ndim == 2
        if unsharded:
            pixel_values, pos_hw, segment_ids = pixel_values[None], pos_hw[None], segment_ids[None]
        x = Linear((v.embed_dim,), (None, "embed"), use_bias=False, dtype=dt, param_dtype=pdt,
                   name="patch_embed")(pixel_values)
        cos, sin = vision_rope(pos_hw, v.head_dim)
        x = nn.with_logical_constraint(x, ("batch", "patches", "embed"))
        full = None
        if v.windowed:  # per block, as a scanned argument (an array) or per unrolled layer (a Python bool)
            full = jnp.array(v.full_attention_blocks) if self.config.scan_layers else list(v.full_attention_blocks)
        x, _ = run_stack(layer_stack(VisionBlock, self.config, v.depth, name="blocks", scanned_args=int(v.windowed)),
                         self.config, x, cos, sin, segment_ids, scanned=() if full is None else (full,))
        merged = PatchMerger(self.config, name="merger")(x)
        if unsharded:
            merged, x = merged[0], x[0]
        return (merged, x) if return_hidden else merged

"""The Qwen2 decoder: GQA self-attention with qkv bias and M-RoPE, SwiGLU MLP, RMSNorm, tied or untied head."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2vl_jax.attention import cached_attention, dot_product_attention
from qwen2vl_jax.config import Qwen2VLConfig
from qwen2vl_jax.layers import Linear, RMSNorm, layer_stack, param_with_axes, run_stack
from qwen2vl_jax.rope import apply_rotary, mrope


class SelfAttention(nn.Module):
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None):
        """x: [B, L, D]; cos, sin: float32[B, L, hd].

        Full pass (cache None): mask = segment_ids int32[B, L] (0 = padding), causal attention over the L tokens;
        returns (out [B, L, D], (k, v) [B, L, Hkv, hd]) — the keys/values a generation cache starts from.
        Cached step: cache = (k, v) [B, Hkv, C, hd] (read only), mask = {"index": int32[] where the L new tokens go,
        "kv_valid": int32[B, C] (1 = a cached key the new tokens may see; their own slots 0)}; returns (out, the new
        tokens' (k, v) [B, L, Hkv, hd]), which the caller writes into the cache at `index` (once for all layers, in
        place, instead of each layer copying its slice of the cache)."""
        t, dt, pdt = self.config.text, self.config.dtype, self.config.param_dtype
        proj = lambda heads, axis, name: Linear((heads, t.head_dim), ("embed", axis, "head_dim"), dtype=dt,
                                                param_dtype=pdt, lora=self.config.lora, name=name)(x)
        q = apply_rotary(proj(t.num_attention_heads, "heads", "q_proj"), cos, sin)
        k = apply_rotary(proj(t.num_key_value_heads, "kv_heads", "k_proj"), cos, sin)
        v = proj(t.num_key_value_heads, "kv_heads", "v_proj")
        if cache is None:
            out = dot_product_attention(q, k, v, segment_ids=mask, causal=True, implementation=self.config.attention)
            kv = (k, v)
        else:
            k, v = k.astype(cache[0].dtype), v.astype(cache[1].dtype)
            out = cached_attention(q, cache, mask["kv_valid"], k, v)
            # make the new keys/values depend on the read of the cache (+ 0 · one output element): the caller's write
            # then cannot run before the read, and XLA updates the cache in place instead of copying it every step
            # (an optimization_barrier would say the same, but XLA:CPU drops barriers before it inserts copies)
            after_read = 0 * out[:1, :1, :1, :1].astype(k.dtype)
            kv = (k + after_read, v + after_read)
        out = Linear((t.hidden_size,), ("heads", "head_dim", "embed"), in_ndim=2, use_bias=False, dtype=dt,
                     param_dtype=pdt, lora=self.config.lora, name="o_proj")(out)
        return out, kv


class MLP(nn.Module):
    config: Qwen2VLConfig

    @nn.compact
    def __call__(self, x):
        t, dt, pdt = self.config.text, self.config.dtype, self.config.param_dtype
        dense = lambda size, axes, name: Linear((size,), axes, use_bias=False, dtype=dt, param_dtype=pdt,
                                                lora=self.config.lora, name=name)
        h = jax.nn.silu(dense(t.intermediate_size, ("embed", "mlp"), "gate_proj")(x))
        h = h * dense(t.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return dense(t.hidden_size, ("mlp", "embed"), "down_proj")(h)


class DecoderLayer(nn.Module):
    """Pre-norm residual block. Signature fits nn.scan: (carry, *broadcast, cache) → (carry, kv or None).
    keep_kv: return the attention's keys/values (generation); otherwise None, so training stacks nothing."""
    config: Qwen2VLConfig
    keep_kv: bool = False

    @nn.compact
    def __call__(self, x, cos, sin, mask, cache=None):
        t, dt, pdt = self.config.text, self.config.dtype, self.config.param_dtype
        h = RMSNorm(t.rms_norm_eps, dt, pdt, name="input_layernorm")(x)
        attended, kv = SelfAttention(self.config, name="self_attn")(h, cos, sin, mask, cache)
        x = x + attended
        h = RMSNorm(t.rms_norm_eps, dt, pdt, name="post_attention_layernorm")(x)
        x = x + MLP(self.config, name="mlp")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed")), kv if self.keep_kv else None


class TextModel(nn.Module):
    """Token embedding, decoder layers, final norm and LM head. keep_kv: layers also return keys/values and
    accept a cache (generation)."""
    config: Qwen2VLConfig
    keep_kv: bool = False

    def setup(self):
        t, pdt = self.config.text, self.config.param_dtype
        self.embed_tokens = param_with_axes(self, "embed_tokens", nn.initializers.normal(0.02),
                                            (t.vocab_size, t.hidden_size), pdt, ("vocab", "embed"))
        self.layers = layer_stack(DecoderLayer, self.config, t.num_hidden_layers, scanned_args=int(self.keep_kv),
                                  keep_kv=self.keep_kv)
        self.norm = RMSNorm(t.rms_norm_eps, self.config.dtype, pdt)
        if not t.tie_word_embeddings:
            self.lm_head = Linear((t.vocab_size,), ("embed", "vocab"), use_bias=False, dtype=self.config.dtype,
                                  param_dtype=pdt, lora=self.config.lora)

    def embed(self, input_ids):
        """input_ids: int[B, L] → [B, L, D] in the compute dtype."""
        # the table whole along embed (a parameter gather, as FSDP does for every weight), so the lookup's output
        # is born in the activations' sharding instead of being all-gathered across the tensor axis
        table = nn.with_logical_constraint(self.embed_tokens.astype(self.config.dtype), ("vocab", None))
        # clip: an id outside the table (e.g. a pad id at a masked position) reads a real row, never NaN (jit's
        # default fill); callers refuse out-of-range ids at positions that count (generation checks them)
        return jnp.take(table, input_ids, axis=0, mode="clip")

    def __call__(self, inputs_embeds, position_ids, segment_ids):
        """inputs_embeds: [B, L, D]; position_ids: int[3, B, L]; segment_ids: int32[B, L] → logits float32[B, L, V]."""
        return self.head(self.hidden(inputs_embeds, position_ids, segment_ids)[0])

    def hidden(self, inputs_embeds, position_ids, mask, cache=None):
        """The final-normed hidden states [B, L, D] and, with keep_kv, the layers' keys/values (stacked
        [layers, B, L or C, Hkv, hd] with scan_layers, else a list of per-layer pairs; see SelfAttention for `mask`
        and `cache`)."""
        t = self.config.text
        cos, sin = mrope(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
        x = nn.with_logical_constraint(inputs_embeds, ("batch", "length", "embed"))
        scanned = (cache,) if self.keep_kv else ()
        x, kv = run_stack(self.layers, self.config, x, cos, sin, mask, scanned=scanned)
        return self.norm(x), kv

    def head(self, x):
        """[B, L, D] → logits float32[B, L, V]."""
        if self.config.text.tie_word_embeddings:
            logits = jnp.einsum("bld,vd->blv", x, self.embed_tokens.astype(self.config.dtype))
        else:
            logits = self.lm_head(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

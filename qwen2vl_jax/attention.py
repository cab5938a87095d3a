"""Attention: one function, several backends.

`dot_product_attention(q, k, v, *, segment_ids, kv_segment_ids, causal, implementation)` is the only entry point the
model uses. Backends (the `implementation` argument):

- "auto" (default): the fastest exact backend for the devices the program is compiled for (`target_platform`: the
  active mesh's devices, so an ahead-of-time compile for a TPU topology picks the TPU kernel, else JAX's default
  backend): "pallas_tpu" on TPU, "cudnn" on GPU for bfloat16/float16 inputs, "xla" otherwise (CPU, float32 on GPU).
- "xla" (any device): picks "xla_blockwise" for long self-attention with shared segment ids or causal
  masking (Lq = Lk ≥ BLOCKWISE_MIN_LENGTH), else "xla_dense". Both are exact (float32 softmax).
- "xla_dense": one masked [B, H, Lq, Lk] softmax. Cost and memory ∝ Lq·Lk.
- "xla_blockwise": flash-style online softmax over kv blocks that skips blocks no query of a block can see
  (attention_blockwise.py). For the packed ViT (contiguous segments of lengths nᵢ) its cost grows with Σ nᵢ², not
  (Σ nᵢ)²; causal masks skip the upper triangle. Differentiable (custom VJP), jit/grad/scan safe.
- "cudnn": cuDNN flash attention (attention_cudnn.py) with segment ids as cuDNN's packed-sequence offsets, never a
  dense mask; cases cuDNN cannot express run blockwise. GPU only, float16/bfloat16 only.
- "pallas_tpu": Pallas TPU splash attention with segment ids, GQA without repeated k/v, block-sparse from the segment
  ids at run time (attention_pallas.py); TPU only, or anywhere inside `pallas_interpret()` (Pallas TPU interpret
  mode, for tests on CPU).

Negative segment ids mark padding on every backend: such a row sees no key and returns 0 (and no other row sees it).

Under a mesh (`jax.set_mesh` + `sharding.rules.axis_rules`), every backend runs per device inside `jax.shard_map`:
the batch dim over the mesh axes the active rules give the logical name "batch", heads over those of "heads"
(attention_sharding.py). The kernels then see only their local rows and heads, so nothing is all-gathered to run
them and the blockwise loops visit local blocks only.
"""
import jax
import jax.numpy as jnp

from qwen2vl_jax.attention_blockwise import DEFAULT_BLOCK_SIZE, blockwise_attention, visited_block_pairs
from qwen2vl_jax.attention_cudnn import cudnn_attention
from qwen2vl_jax.attention_pallas import pallas_interpret, pallas_tpu_attention
from qwen2vl_jax.attention_pallas import visited_block_pairs as splash_visited_block_pairs
from qwen2vl_jax.attention_sharding import per_device

IMPLEMENTATIONS = ("auto", "xla", "xla_dense", "xla_blockwise", "cudnn", "pallas_tpu")
# "xla" switches from the dense to the blockwise path at this (query = key) length. Measured on a shared 2-core CPU,
# fwd / fwd+bwd ms, dense vs blockwise: ViT-2B heads (16 × 80, 4 images) L=256 7.0/22.7 vs 7.6/23.0, L=512 45/145 vs
# 13/49; 2B decoder (12/2 heads × 128, causal, B=2) L=256 13/43 vs 15/50, L=512 82/253 vs 38/139.
BLOCKWISE_MIN_LENGTH = 512

__all__ = ["BLOCKWISE_MIN_LENGTH", "DEFAULT_BLOCK_SIZE", "IMPLEMENTATIONS", "cached_attention", "dot_product_attention",
           "pallas_interpret", "resolve_implementation", "splash_visited_block_pairs", "target_platform",
           "visited_block_pairs"]


def dot_product_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, causal=False, implementation="auto"):
    """Multi-head / grouped-query attention with segment and causal masks.

    q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D] with H % Hkv == 0 (GQA: query head h uses kv head h // (H // Hkv)).
    segment_ids: int32[B, Lq] (kv_segment_ids: int32[B, Lk], defaults to segment_ids, which then needs Lq == Lk):
    a query attends only to keys of the same segment id. causal: additionally only keys at position <= the query's,
    aligned at the end when Lq < Lk (query i sits at position Lk - Lq + i). Scale D**-0.5. Logits and softmax in
    float32 whatever the input dtype; returns [B, Lq, H, D] in q.dtype. A query row that can see no key returns 0;
    so does a row whose segment id is negative (padding).
    implementation: one of IMPLEMENTATIONS (see the module docstring).
    """
    _check_inputs(q, k, v, segment_ids, kv_segment_ids)
    implementation = resolve_implementation(implementation, q.dtype)
    kernel = lambda q, k, v, seg, kv_seg: _local_attention(q, k, v, seg, kv_seg, causal, implementation)
    return per_device(kernel, q, k, v, segment_ids, kv_segment_ids)


def cached_attention(q, cache, kv_valid, k_new, v_new):
    """A decode step's attention over a KV cache plus the step's own keys, without writing them into the cache
    first (the caller writes once, in place): one softmax over both sources.

    q: [B, T, H, D] (the T new tokens); cache: (k, v) [B, Hkv, C, D] — heads ahead of slots, so neither product
    transposes the cache; kv_valid: int[B, C] (1 = a cache slot the new tokens may see; their own slots are not read
    from the cache); k_new, v_new: [B, T, Hkv, D], seen causally. → [B, T, H, D] in q.dtype, float32 softmax.
    Plain einsums, which XLA partitions over a mesh's batch and head shardings as they are (no loop to hide)."""
    k_cache, v_cache = cache
    (B, T, H, D), hkv = q.shape, k_new.shape[2]
    if k_cache.shape != v_cache.shape or k_cache.shape[:2] != (B, hkv) or k_new.shape != v_new.shape:
        raise ValueError(f"cached_attention: cache {k_cache.shape} / {v_cache.shape} must be [B, Hkv, C, D] and new "
                         f"keys {k_new.shape} / {v_new.shape} [B, T, Hkv, D] for q {q.shape}")
    qh = q.reshape(B, T, hkv, H // hkv, D)
    scale = float(D) ** -0.5
    s_cache = jnp.einsum("bthgd,bhcd->bhgtc", qh, k_cache, preferred_element_type=jnp.float32) * scale
    s_new = jnp.einsum("bthgd,bshd->bhgts", qh, k_new, preferred_element_type=jnp.float32) * scale
    s_cache = jnp.where((kv_valid > 0)[:, None, None, None, :], s_cache, -jnp.inf)
    s_new = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s_new, -jnp.inf)  # a token always sees itself
    m = jax.lax.stop_gradient(jnp.maximum(s_cache.max(-1, keepdims=True), s_new.max(-1, keepdims=True)))
    p_cache, p_new = jnp.exp(s_cache - m), jnp.exp(s_new - m)
    l = p_cache.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
    o = (jnp.einsum("bhgtc,bhcd->bhgtd", p_cache.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
         + jnp.einsum("bhgts,bshd->bhgtd", p_new.astype(v_new.dtype), v_new, preferred_element_type=jnp.float32))
    return (o / l).transpose(0, 3, 1, 2, 4).reshape(B, T, H, D).astype(q.dtype)


def target_platform() -> str:
    """The platform ("tpu", "gpu", "cpu") of the devices the program being traced is compiled for: the active mesh's
    (`jax.set_mesh`; compile-only TPU topologies included), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None and device.platform else jax.default_backend()


def resolve_implementation(implementation: str, dtype=jnp.float32) -> str:
    """"auto" → the backend for `target_platform()` and the input dtype (see the module docstring); any other
    name is checked and returned as it is."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention implementation {implementation!r}; "
                         f"choose one of {', '.join(IMPLEMENTATIONS)}.")
    if implementation != "auto":
        return implementation
    platform = target_platform()
    if platform == "tpu":
        return "pallas_tpu"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


def _local_attention(q, k, v, segment_ids, kv_segment_ids, causal, implementation):
    """The chosen backend on one device's arrays (shapes as `dot_product_attention`)."""
    lq, lk = q.shape[1], k.shape[1]
    if implementation == "xla":
        shared_segments = segment_ids is not None and kv_segment_ids is None
        blockwise = lq == lk >= BLOCKWISE_MIN_LENGTH and (causal or shared_segments)
        implementation = "xla_blockwise" if blockwise else "xla_dense"
    if implementation == "xla_dense":
        return _dense_attention(q, k, v, segment_ids, kv_segment_ids, causal)
    if implementation == "xla_blockwise":
        return blockwise_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, causal=causal)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, causal=causal)
    return pallas_tpu_attention(q, k, v, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, causal=causal,
                                platform=target_platform())  # "pallas_tpu": names were checked on the way in


def _check_inputs(q, k, v, segment_ids, kv_segment_ids):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention expects q [B, Lq, H, D] and k, v [B, Lk, Hkv, D] of equal shapes; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}.")
    (B, lq, H, D), (_, lk, hkv, _) = q.shape, k.shape
    if k.shape[0] != B or k.shape[3] != D or H % hkv:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree: batch and head_dim must match and the query head "
                         f"count ({H}) must be a multiple of the kv head count ({hkv}).")
    if segment_ids is not None and segment_ids.shape != (B, lq):
        raise ValueError(f"segment_ids must be int[B, Lq] = {(B, lq)}, got {segment_ids.shape}.")
    if kv_segment_ids is not None:
        if segment_ids is None:
            raise ValueError("kv_segment_ids given without segment_ids; pass both (or neither).")
        if kv_segment_ids.shape != (B, lk):
            raise ValueError(f"kv_segment_ids must be int[B, Lk] = {(B, lk)}, got {kv_segment_ids.shape}.")
    elif segment_ids is not None and lq != lk:
        raise ValueError(f"segment_ids alone describe keys only when Lq == Lk (got Lq={lq}, Lk={lk}); "
                         "pass kv_segment_ids [B, Lk] as well.")


def attention_mask(segment_ids, kv_segment_ids, causal, lq, lk):
    """bool[B or 1, Lq, Lk] (True = may attend: same non-negative segment id, causal order), or None when nothing is
    masked."""
    mask = None
    if segment_ids is not None:
        kv = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = (segment_ids[:, :, None] == kv[:, None, :]) & (segment_ids >= 0)[:, :, None]
    if causal:
        tri = (jnp.arange(lk)[None, :] <= jnp.arange(lq)[:, None] + (lk - lq))[None]
        mask = tri if mask is None else mask & tri
    return mask


def _dense_attention(q, k, v, segment_ids, kv_segment_ids, causal):
    """One masked softmax over [B, Hkv, G, Lq, Lk] (heads moved ahead of length first: much faster on XLA CPU)."""
    (B, lq, H, D), (_, lk, hkv, _) = q.shape, k.shape
    qh = q.reshape(B, lq, hkv, H // hkv, D).transpose(0, 2, 3, 1, 4)  # [B, Hkv, G, Lq, D]
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, Lk, D]
    s = jnp.einsum("bhgqd,bhkd->bhgqk", qh, kh, preferred_element_type=jnp.float32) * (float(D) ** -0.5)
    mask = attention_mask(segment_ids, kv_segment_ids, causal, lq, lk)
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.exp(s - jnp.where(m == -jnp.inf, 0.0, m))  # a row that sees no key: p = 0 (not NaN)
    l = p.sum(-1, keepdims=True)
    o = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vh, preferred_element_type=jnp.float32)
    o = o / jnp.where(l == 0.0, 1.0, l)
    return o.transpose(0, 3, 1, 2, 4).reshape(B, lq, H, D).astype(q.dtype)

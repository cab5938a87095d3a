"""The "cudnn" attention backend: cuDNN flash attention (NVIDIA GPU, float16/bfloat16), without a dense mask.

`cudnn_attention` has exactly the contract of `attention.dot_product_attention`. No [B, 1, Lq, Lk] mask is built;
each case goes to what cuDNN can express, or, where it cannot, to our XLA blockwise kernel
(`attention_blockwise.blockwise_attention`, exact, cost ∝ visited blocks):

- no segment ids: `jax.nn.dot_product_attention(implementation="cudnn")`, `is_causal` when causal (Lq = Lk);
- shared segment ids (self-attention, Lq = Lk: the packed ViT, a left-padded decoder prefill): cuDNN's packed
  ("THD" / ragged) layout through `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention` with per-row
  `q_offsets` / `q_seqlen` (segment starts and lengths, -1 filled, the same for kv) and the PADDING or
  PADDING_CAUSAL mask (a run of negative, padding ids is packed too and its rows are zeroed after). Each segment is then its own sequence for cuDNN, so the packed ViT costs Σ nᵢ², and causal
  within a segment (top-left) equals our position-causal AND same-segment mask. This needs every segment id to be
  one contiguous run and at most MAX_PACKED_SEGMENTS runs per row (a static bound: cuDNN's softmax statistics are
  [B·M, H, L] floats), which is checked at run time: a batch that breaks it takes the blockwise kernel (`lax.cond`).
  It also needs a Hopper-or-newer GPU and cuDNN ≥ 9.6 (checked at trace time; otherwise blockwise);
- blockwise fallbacks, and why: causal with Lq ≠ Lk (our causal mask is end-aligned, query i at position
  Lk - Lq + i; cuDNN's is top-left aligned and JAX exposes no bottom-right option), and separate `kv_segment_ids`
  (decoding against a left-padded cache: cuDNN's `key_value_seq_lengths` describe right padding only, and the packed
  layout pairs the i-th query segment with the i-th kv segment, which arbitrary q/kv ids do not guarantee).

The packed layout is a private JAX API (jax 0.10.2); it is imported lazily so that CPU/TPU installs never touch it.
"""
import jax
import jax.numpy as jnp

from qwen2vl_jax.attention_blockwise import blockwise_attention

MAX_PACKED_SEGMENTS = 64  # runs per batch row (per device) the packed cuDNN path accepts
_MIN_PACKED_CUDNN = 90600  # cuDNN 9.6: packed layout
_MIN_PACKED_CAPABILITY = (9, 0)  # Hopper


def _check_device_and_dtype(q):
    if jax.default_backend() != "gpu":
        raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU (cuDNN flash attention); the default JAX backend "
                         f"here is {jax.default_backend()!r}. Use implementation='xla' on CPU or 'pallas_tpu' on TPU.")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"implementation='cudnn' supports float16/bfloat16 inputs only, got {q.dtype}; cast q, k, v "
                         "(e.g. config dtype bfloat16) or use implementation='xla'.")


def _packed_layout_available():
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
        capability = jax.local_devices(backend="gpu")[0].compute_capability
        major, minor = (int(x) for x in str(capability).split(".")[:2])
        return check_cudnn_version() >= _MIN_PACKED_CUDNN and (major, minor) >= _MIN_PACKED_CAPABILITY
    except Exception:  # no cuDNN, not CUDA (ROCm), or the private API moved: the blockwise kernel is always exact
        return False


def packed_segments(segment_ids, max_segments=MAX_PACKED_SEGMENTS):
    """segment_ids int[B, L] → (offsets int32[B, M+1], seqlens int32[B, M], ok bool[]), M = max_segments.

    offsets: start of each run of equal ids, then -1; seqlens: its length, then -1 (the format of cuDNN's packed
    layout in JAX). ok: every row has at most M runs and every id forms a single run, i.e. the runs describe the
    segment mask exactly.
    """
    B, L = segment_ids.shape
    s = jnp.asarray(segment_ids, jnp.int32)
    is_start = jnp.concatenate([jnp.ones((B, 1), bool), s[:, 1:] != s[:, :-1]], axis=1)
    runs = is_start.sum(1)  # [B]
    starts = jax.vmap(lambda st: jnp.nonzero(st, size=max_segments + 1, fill_value=-1)[0])(is_start)
    r = jnp.arange(max_segments + 1)
    starts = jnp.where(r < runs[:, None], starts, -1).astype(jnp.int32)  # [B, M+1]
    ends = jnp.where(r[1:] < runs[:, None], starts[:, 1:], L)  # a run ends where the next starts, the last at L
    seqlens = jnp.where(r[:-1] < runs[:, None], ends - starts[:, :-1], -1).astype(jnp.int32)  # [B, M]
    distinct = 1 + (jnp.diff(jnp.sort(s, axis=1), axis=1) != 0).sum(1)
    ok = jnp.all((runs <= max_segments) & (distinct == runs))
    return starts, seqlens, ok


def _packed_cudnn(q, k, v, offsets, seqlens, causal):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention as cudnn_sdpa
    return cudnn_sdpa(q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets,
                      scale=float(q.shape[-1]) ** -0.5, qkv_layout="BTNH",
                      mask_type=MaskType.PADDING_CAUSAL if causal else MaskType.PADDING)


def cudnn_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, causal=False):
    """Same contract as `attention.dot_product_attention` (inputs already checked there).

    q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D]; segment_ids: int[B, Lq]; kv_segment_ids: int[B, Lk] → [B, Lq, H, D].
    """
    _check_device_and_dtype(q)
    lq, lk = q.shape[1], k.shape[1]
    blockwise = lambda q, k, v: blockwise_attention(q, k, v, segment_ids=segment_ids,
                                                    kv_segment_ids=kv_segment_ids, causal=causal)
    if kv_segment_ids is not None or (causal and lq != lk):
        return blockwise(q, k, v)
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn").astype(q.dtype)
    if lq < 2 or not _packed_layout_available():
        return blockwise(q, k, v)
    offsets, seqlens, ok = packed_segments(segment_ids, max(2, min(MAX_PACKED_SEGMENTS, lq)))
    out = jax.lax.cond(ok, lambda q, k, v: _packed_cudnn(q, k, v, offsets, seqlens, causal).astype(q.dtype),
                       blockwise, q, k, v)
    return jnp.where((segment_ids >= 0)[:, :, None, None], out, 0).astype(q.dtype)  # padding runs see nothing

"""The "pallas_tpu" attention backend: JAX's Pallas TPU flash-attention kernel with SegmentIds.

Adapts our contract to the kernel's: [B, L, H, D] → [B, H, L, D]; kv heads repeated for GQA (the kernel wants equal
head counts); lengths padded to a multiple of 128 (its minimum block) with padded keys in a segment of their own;
end-aligned causal masking for Lq < Lk by padding the queries in front (the kernel's causal mask is top-left aligned);
query rows that see no key set to 0. The kernel attends to every kv block of a query block (its segment mask is
applied inside blocks), so on TPU the packed ViT costs (Σ nᵢ)² at MXU speed.

Runs on TPU, or on any device in Pallas TPU interpret mode:

    with qwen2vl_jax.attention.pallas_interpret():
        out = dot_product_attention(q, k, v, segment_ids=s, implementation="pallas_tpu")

(`pallas_interpret` wraps `jax.experimental.pallas.tpu.force_tpu_interpret_mode`; tracing must happen inside it.)
"""
import contextlib
import contextvars

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

_BLOCK = 128  # the kernel's minimum block (lanes); lengths are padded to a multiple of it
_interpret = contextvars.ContextVar("qwen2vl_pallas_interpret", default=False)


@contextlib.contextmanager
def pallas_interpret():
    """Run implementation="pallas_tpu" in Pallas TPU interpret mode (on CPU; slow, for tests) inside this context."""
    token = _interpret.set(True)
    try:
        with pltpu.force_tpu_interpret_mode():
            yield
    finally:
        _interpret.reset(token)


def _kernel_block(length):
    for b in (512, 256):
        if length % b == 0:
            return b
    return _BLOCK


def _pad(x, axis, before, after, value=0):
    if before == after == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return jnp.pad(x, widths, constant_values=value)


def pallas_tpu_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, causal=False):
    """Same contract as `attention.dot_product_attention` (inputs already checked there)."""
    if jax.default_backend() != "tpu" and not _interpret.get():
        raise ValueError(f"implementation='pallas_tpu' needs a TPU (default JAX backend here: "
                         f"{jax.default_backend()!r}); on other devices run it inside "
                         "qwen2vl_jax.attention.pallas_interpret() (slow, for tests) or use implementation='xla'.")
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    (B, lq, H, D), (_, lk, hkv, _) = q.shape, k.shape
    if causal and lq > lk:
        raise ValueError(f"pallas_tpu causal attention needs Lq <= Lk (got Lq={lq}, Lk={lk}).")
    front = lk - lq if causal else 0  # end-aligned causal: query i at position Lk - Lq + i
    lqp, lkp = -(-(lq + front) // _BLOCK) * _BLOCK, -(-lk // _BLOCK) * _BLOCK

    if segment_ids is None:
        seg_q, seg_kv = jnp.zeros((B, lq), jnp.int32), jnp.zeros((B, lk), jnp.int32)
    else:
        seg_q = jnp.asarray(segment_ids, jnp.int32)
        seg_kv = seg_q if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
    pad_id = jnp.minimum(seg_q.min(), seg_kv.min()) - 1  # matches no real token
    seg_q = _pad(seg_q, 1, front, lqp - lq - front, pad_id)
    seg_kv = _pad(seg_kv, 1, 0, lkp - lk, pad_id)

    g = H // hkv
    qt = _pad(q, 1, front, lqp - lq - front).transpose(0, 2, 1, 3)  # [B, H, Lqp, D]
    kt = _pad(jnp.repeat(k, g, axis=2), 1, 0, lkp - lk).transpose(0, 2, 1, 3)  # [B, H, Lkp, D]
    vt = _pad(jnp.repeat(v, g, axis=2), 1, 0, lkp - lk).transpose(0, 2, 1, 3)

    bq, bk = _kernel_block(lqp), _kernel_block(lkp)
    blocks = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                           block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk, block_q_dkv=bq,
                           block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    out = fa.flash_attention(qt, kt, vt, segment_ids=fa.SegmentIds(q=seg_q, kv=seg_kv), causal=causal,
                             sm_scale=float(D) ** -0.5, block_sizes=blocks)
    out = out.transpose(0, 2, 1, 3)[:, front:front + lq].astype(q.dtype)

    if kv_segment_ids is not None:  # only then can a real query row see no key at all
        from qwen2vl_jax.attention import attention_mask
        visible = attention_mask(segment_ids, kv_segment_ids, causal, lq, lk).any(-1)
        out = jnp.where(visible[:, :, None, None], out, 0).astype(q.dtype)
    return out

"""The "pallas_tpu" attention backend: JAX's Pallas TPU splash-attention kernel, called per device.

`pallas_tpu_attention` has exactly the contract of `attention.dot_product_attention` and adapts it to the kernel's:

- layout [B, L, H, D] → per batch row [H, L, D] (the kernel is vmapped over the batch; in Pallas TPU interpret
  mode the rows run one after another, see `_splash`);
- GQA natively: the kernel's MHA form takes k, v as [Hkv, L, D] and maps query head h to kv head h // (H // Hkv)
  (kv heads are never repeated; dk/dv accumulate over a group inside the backward kernel);
- the scale D**-0.5 (of the caller's D) is applied to q before the kernel, which has no scale argument;
- D is zero-padded to a multiple of 128 lanes (ViT head_dim 80 → 128; zeros change no logit and add zero output
  columns, which are sliced off), lengths to a multiple of 128 with padded keys in a segment id matching no query;
- causal masks are splash's `CausalMask` with offset Lk - Lq (end-aligned; Lq > Lk works too, leading query rows
  then see no key), else `FullMask`, one per query head in a `MultiHeadMask`;
- query rows that see no key are set to 0 (splash masks with a large finite value, so such a row would otherwise
  average every value): found with a sort of the kv segment ids, no [Lq, Lk] array is built.

What is skipped and what is masked. Splash's block sparsity comes only from the STATIC mask: for `CausalMask` the
(q-block, kv-block) pairs above the diagonal are never visited, in the forward and both backward kernels (n(n+1)/2
of the n² pairs for Lq = Lk in n blocks; `active_block_fraction` reports it). Segment ids are a runtime mask applied
INSIDE every visited block (`q_ids == kv_ids`); no block is skipped because of them. So the packed ViT (FullMask +
segment ids) visits all (Σ nᵢ)² / b² block pairs, at MXU speed on TPU; the XLA "xla_blockwise" path is the one whose
cost grows with Σ nᵢ². Padding adds at most one partial block per axis and no fully padded block (blocks divide the
padded length).

Kernels are built from static shapes only (`functools.lru_cache`), so retracing does not rebuild mask infos.
Differentiable: splash's custom VJP (separate dq and dkv kernels); the padding, transposes and scaling around it are
plain jnp ops. Runs on TPU, or on any device in Pallas TPU interpret mode:

    with qwen2vl_jax.attention.pallas_interpret():
        out = dot_product_attention(q, k, v, segment_ids=s, implementation="pallas_tpu")

(`pallas_interpret` wraps `jax.experimental.pallas.tpu.force_tpu_interpret_mode`; tracing must happen inside it.)
"""
import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # the kernel's minimum block and head_dim granule
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


def _round_up(x, m):
    return -(-x // m) * m


def _kernel_block(length):
    """Largest of 512/256/128 dividing a padded length (a multiple of 128)."""
    for b in (512, 256):
        if length % b == 0:
            return b
    return LANES


def _pad(x, axis, new_len, value=0):
    if x.shape[axis] == new_len:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, new_len - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads, lq_padded, lk_padded, causal_offset, generic_interpret=False):
    """The splash MHA kernel for one batch row: q [heads, Lqp, Dp], k/v [Hkv, Lkp, Dp] (Hkv divides heads).

    causal_offset: None for a full mask, else the CausalMask offset (Lk - Lq). generic_interpret: Pallas' generic
    (non-TPU) interpreter, for tests of the vmapped path. Built once per static signature.
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    shape = (lq_padded, lk_padded)
    mask = sa.FullMask(shape) if causal_offset is None else sa.CausalMask(shape, offset=causal_offset)
    bq, bk = _kernel_block(lq_padded), _kernel_block(lk_padded)
    blocks = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk,
                           block_q_dkv=bq, block_kv_dkv=bk, block_kv_dkv_compute=bk,
                           block_q_dq=bq, block_kv_dq=bk)
    with jax.ensure_compile_time_eval():  # mask infos are constants even when first built inside a trace
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=blocks,
                                  head_shards=1, q_seq_shards=1, interpret=generic_interpret)


def active_block_fraction(lq, lk, *, causal, heads=1):
    """Fraction of (q-block, kv-block) pairs the forward kernel visits for these (unpadded) lengths, from splash's
    own mask info (block_mask > 0). 1.0 for a full mask; segment ids never lower it (see the module docstring)."""
    lqp, lkp = _round_up(lq, LANES), _round_up(lk, LANES)
    block_mask = np.asarray(_splash_kernel(heads, lqp, lkp, lk - lq if causal else None).fwd_mask_info.block_mask)
    return float((block_mask > 0).mean())


def _sees_a_key(seg_q, seg_kv, causal, lq, lk):
    """bool[B, Lq]: whether query i has any visible key, without an [Lq, Lk] array.

    The first position of each id among the keys comes from a stable sort of the kv ids; a query sees a key iff its
    id occurs and (causal) that first occurrence is at or before its position Lk - Lq + i.
    """
    def row(sq, skv):
        order = jnp.argsort(skv, stable=True)
        sorted_ids = skv[order]
        at = jnp.clip(jnp.searchsorted(sorted_ids, sq, side="left"), 0, lk - 1)
        found = sorted_ids[at] == sq
        if causal:
            found &= order[at] <= jnp.arange(lq) + (lk - lq)
        return found

    return jax.vmap(row)(seg_q, seg_kv)


def pallas_tpu_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, causal=False):
    """Same contract as `attention.dot_product_attention` (inputs already checked there).

    q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D]; segment_ids: int[B, Lq]; kv_segment_ids: int[B, Lk] → [B, Lq, H, D].
    """
    interpret = _interpret.get()
    if jax.default_backend() != "tpu" and not interpret:
        raise ValueError(f"implementation='pallas_tpu' needs a TPU (default JAX backend here: "
                         f"{jax.default_backend()!r}); on other devices run it inside "
                         "qwen2vl_jax.attention.pallas_interpret() (slow, for tests) or use implementation='xla'.")
    return _splash(q, k, v, segment_ids, kv_segment_ids, causal, mode="tpu_interpret" if interpret else "tpu")


def _splash(q, k, v, segment_ids, kv_segment_ids, causal, *, mode):
    """mode: "tpu" (compiled, batch vmapped), "tpu_interpret" (Pallas TPU interpret mode, batch rows one after
    another: in jax 0.10.2 that interpreter rejects a vmapped kernel, whose grid gains a dimension its
    dimension_semantics do not list) or "generic_interpret" (Pallas' generic interpreter, batch vmapped)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    (B, lq, H, D), (_, lk, hkv, _) = q.shape, k.shape
    lqp, lkp, dp = _round_up(lq, LANES), _round_up(lk, LANES), _round_up(D, LANES)
    kernel = _splash_kernel(H, lqp, lkp, lk - lq if causal else None, mode == "generic_interpret")

    seg = None
    if segment_ids is not None or lkp != lk:
        if segment_ids is None:
            seg_q, seg_kv = jnp.zeros((B, lq), jnp.int32), jnp.zeros((B, lk), jnp.int32)
        else:
            seg_q = jnp.asarray(segment_ids, jnp.int32)
            seg_kv = seg_q if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
        pad_id = jnp.minimum(seg_q.min(), seg_kv.min()) - 1  # matches no real query
        seg = SegmentIds(q=_pad(seg_q, 1, lqp, pad_id), kv=_pad(seg_kv, 1, lkp, pad_id))

    scale = float(D) ** -0.5
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qt = _pad(_pad(qs, 3, dp), 1, lqp).transpose(0, 2, 1, 3)  # [B, H, Lqp, Dp]
    kt = _pad(_pad(k, 3, dp), 1, lkp).transpose(0, 2, 1, 3)  # [B, Hkv, Lkp, Dp]
    vt = _pad(_pad(v, 3, dp), 1, lkp).transpose(0, 2, 1, 3)
    row = lambda q, k, v, s: kernel(q, k, v, segment_ids=s)  # one batch row: [H, Lqp, Dp]
    if mode == "tpu_interpret":
        out = jnp.stack([row(qt[b], kt[b], vt[b], None if seg is None else jax.tree.map(lambda x: x[b], seg))
                         for b in range(B)])
    else:
        out = jax.vmap(row)(qt, kt, vt, seg)
    out = out[:, :, :lq, :D].transpose(0, 2, 1, 3).astype(q.dtype)  # [B, Lq, H, D]

    # Only with separate kv ids, or causal with Lq > Lk, can a real query row see no key at all.
    if kv_segment_ids is not None or (causal and lq > lk):
        if segment_ids is None:
            visible = jnp.broadcast_to(jnp.arange(lq) + (lk - lq) >= 0, (B, lq))
        else:
            visible = _sees_a_key(seg_q, seg_kv, causal, lq, lk)
        out = jnp.where(visible[:, :, None, None], out, 0).astype(q.dtype)
    return out

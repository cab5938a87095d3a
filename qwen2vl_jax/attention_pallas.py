"""The "pallas_tpu" attention backend: JAX's Pallas TPU splash-attention kernel, block-sparse from segment ids.

`pallas_tpu_attention` has exactly the contract of `attention.dot_product_attention` and adapts it to the kernel's:

- layout [B, L, H, D] → per batch row [H, L, D]; GQA natively (the kernel's MHA form takes k, v as [Hkv, L, D] and
  maps query head h to kv head h // (H // Hkv): kv heads are never repeated);
- the scale D**-0.5 (of the caller's D) is applied to q before the kernel, which has no scale argument;
- D is zero-padded to a multiple of 128 lanes (ViT head_dim 80 → 128; zeros change no logit and add zero output
  columns, which are sliced off); lengths are padded to a multiple of the kernel block (`kernel_block`: one block of
  up to 512 rows, else 512-row blocks) with padded rows in a negative (padding) segment id;
- rows whose segment id is negative (padding) and rows that see no key return 0.

Block sparsity comes from the segment ids at run time. `mask_info` builds the kernel's `MaskInfo`s inside the trace,
per batch row, from the ids that device holds: the (q block, kv block) pair runs iff the q block's range of
non-negative ids [min, max] meets the kv block's (and, causal, some key of the kv block is at or before the q
block's last position). Exact for ids laid out in contiguous runs (packed images, frame-pairs, windows, left
padding); for other layouts the range test only over-approximates, and the exact mask is applied inside every
visited block anyway (segment equality, and causal through `_causal` on the kernel's q/k positions). Skipped pairs
are neither computed nor fetched: `data_next` repeats the last block fetched along the kernel's grid order, so the
pipeline issues no DMA for them. The same run mask serves the forward and dq kernels (kv blocks inner) and, laid out
in its grid order (q blocks inner), the dkv kernel. Each row's running blocks come first on the grid, and the grid
narrows at run time to the busiest row (`grid_widths`: 8 / 32 / 128 / all steps, one `lax.switch`), since a skipped
step still costs a grid step. The packed ViT then costs Σ nᵢ² as the XLA blockwise path does, not (Σ nᵢ)²;
`visited_block_pairs` counts the pairs from the very mask info the kernel gets, `grid_steps` the steps.

Nothing in the kernel's construction runs eagerly: the mask infos are jnp values of the trace (no constants moved
to devices), so the kernel builds under any mesh — compile-only TPU topologies included — and inside any jit.
Per batch row the mask info differs, so the batch is a loop of kernel calls (Pallas batches a kernel with batched
scalar-prefetch operands as an HLO while loop). Scalar memory per kernel call: nq · width bytes of block mask plus
as many int8/int16 entries of `data_next` (a 64k-row shard in 512-row blocks at full width: 128² · 3 B = 48 KiB).

Differentiable: splash's custom VJP (separate dq and dkv kernels). Runs on TPU, or on any device in Pallas TPU
interpret mode:

    with qwen2vl_jax.attention.pallas_interpret():
        out = dot_product_attention(q, k, v, segment_ids=s, implementation="pallas_tpu")

(`pallas_interpret` wraps `jax.experimental.pallas.tpu.force_tpu_interpret_mode`; tracing must happen inside it.)
"""
import contextlib
import contextvars
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

LANES = 128  # the kernel's minimum block and head_dim granule
MAX_BLOCK = 512  # rows per kernel block on long rows (keeps the scalar-memory mask info small)
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


def kernel_block(length, max_block=MAX_BLOCK):
    """Rows per kernel block for a row of `length`: one block of round_up(length, 128) up to `max_block`, else
    `max_block` (a multiple of 128). The row is padded to a multiple of it."""
    return min(max_block, _round_up(length, LANES))


def _pad(x, axis, new_len, value=0):
    if x.shape[axis] == new_len:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, new_len - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _causal(q_positions, k_positions):
    """The in-block causal mask splash evaluates (as `mask_function`) on query / key positions."""
    return q_positions >= k_positions


def _id_ranges(ids, block):
    """int[L] ids → (min, max) of the non-negative ids of each block of `block` rows, two int32[L / block]; a block
    of padding only gets the empty range (INT32_MAX, -1)."""
    blocks = ids.reshape(-1, block)
    real = blocks >= 0
    return (jnp.where(real, blocks, jnp.iinfo(jnp.int32).max).min(1), jnp.where(real, blocks, -1).max(1))


def block_runs(seg_q, seg_kv, bq, bk, causal_offset=None):
    """bool[nq, nk]: which (q block, kv block) pairs the kernels run, for one batch row.

    seg_q: int32[Lqp], seg_kv: int32[Lkp] (padded lengths, multiples of bq and bk); causal_offset: None, or Lk - Lq
    (query i sits at key position i + offset)."""
    q_lo, q_hi = _id_ranges(seg_q, bq)
    k_lo, k_hi = _id_ranges(seg_kv, bk)
    runs = (q_lo[:, None] <= k_hi[None, :]) & (k_lo[None, :] <= q_hi[:, None])
    if causal_offset is not None:
        last_query = (jnp.arange(runs.shape[0]) + 1) * bq - 1 + causal_offset
        runs &= (jnp.arange(runs.shape[1]) * bk)[None, :] <= last_query[:, None]
    return runs


def _compact(runs, width):
    """Compress the inner grid axis of bool[outer, inner] to `width` steps per outer index, running blocks first.

    → (block index each step fetches int32[outer, width], whether it runs bool[outer, width]). Step s of row r runs
    the s-th running block of r (in increasing order) when r has more than s of them; other steps run nothing and
    fetch the block fetched last in grid order (outer-major; before any run: the first run's), so no DMA is issued
    for them. `width` must be at least every row's count of running blocks."""
    order = jnp.argsort(~runs, axis=1, stable=True)[:, :width].astype(jnp.int32)  # running blocks first, in order
    active = jnp.arange(width)[None, :] < runs.sum(1, keepdims=True)
    flat_active, flat_order = active.reshape(-1), order.reshape(-1)
    step = jnp.arange(flat_active.size, dtype=jnp.int32)
    last = lax.cummax(jnp.where(flat_active, step, -1))
    source = jnp.where(last >= 0, last, jnp.argmax(flat_active).astype(jnp.int32))
    return flat_order[source].reshape(active.shape), active


def grid_widths(blocks):
    """The inner grid widths a kernel is compiled for along an axis of `blocks` blocks: those of 8, 32, 128 at most
    half of it, and `blocks` itself. At run time the narrowest holding every row's running blocks is taken
    (`lax.switch`): a grid step that runs nothing still costs the kernel a step (~0.35 µs on TPU), so a packed ViT
    shard of many short segments must not iterate over all (Σ nᵢ)² / b² pairs."""
    return tuple(w for w in (8, 32, 128) if 2 * w <= blocks) + (blocks,)


def _small_int(x, max_value):
    return x.astype(jnp.int8 if max_value <= 127 else jnp.int16 if max_value <= 32767 else jnp.int32)


def mask_info(seg_q, seg_kv, bq, bk, causal_offset=None, width=None):
    """The splash `MaskInfo`s of one batch row: (forward and dq, dkv), one mask for all heads.

    Forward / dq: grid (head, q block, step < width) with data_next / block_mask [1, nq, width] naming the kv block
    of each step (`_compact` of `block_runs`); dkv: grid (kv block, head, step < width) with [1, width, nk] naming
    the q block. width: None = no compression (nk for the forward, nq for dkv). block_mask is 1 where the step runs
    (masking inside the block is segment ids + `_causal`, never a stored partial block); q_sequence: the query
    positions `_causal` reads (causal only)."""
    return _mask_infos(block_runs(seg_q, seg_kv, bq, bk, causal_offset), width,
                       _q_sequence(seg_q.shape[0], causal_offset))


def _q_sequence(lqp, causal_offset):
    return None if causal_offset is None else jnp.arange(lqp, dtype=jnp.int32) + causal_offset


def _mask_infos(runs, width, q_sequence):
    """`mask_info` from a row's bool[nq, nk] `block_runs`."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_mask_info import MaskInfo

    nq, nk = runs.shape
    fetch, active = _compact(runs, nk if width is None else min(width, nk))
    fwd = MaskInfo(data_next=_small_int(fetch, nk)[None], mask_next=None, block_mask=active.astype(jnp.int8)[None],
                   partial_mask_blocks=None, q_sequence=q_sequence, is_dynamic_mask=True)
    fetch, active = _compact(runs.T, nq if width is None else min(width, nq))
    dkv = fwd._replace(data_next=_small_int(fetch.T, nq)[None], block_mask=active.T.astype(jnp.int8)[None])
    return fwd, dkv


class _Layout(NamedTuple):
    """How `_splash` lays one call out: block sizes, padded lengths, causal offset, the ids the kernel masks with
    (int32[B, Lqp] / [B, Lkp]; None when nothing is masked by id), every row's `block_runs` bool[B, nq, nk], and
    the grid widths compiled with the index of the one these rows need (the narrowest holding the busiest q or kv
    block, over all rows: one choice for the device's whole batch)."""
    bq: int
    bk: int
    lqp: int
    lkp: int
    offset: int | None
    seg_q: jax.Array | None
    seg_kv: jax.Array | None
    runs: jax.Array
    widths: tuple
    width_index: jax.Array


def _layout(segment_ids, kv_segment_ids, causal, B, lq, lk, max_block) -> _Layout:
    bq, bk = kernel_block(lq, max_block), kernel_block(lk, max_block)
    lqp, lkp = _round_up(lq, bq), _round_up(lk, bk)
    offset = lk - lq if causal else None
    seg_q = seg_kv = None
    if segment_ids is not None or lqp != lq or lkp != lk:  # padded rows need ids (-1: padding)
        seg_q = jnp.zeros((B, lq), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
        seg_kv = seg_q if kv_segment_ids is None else jnp.asarray(kv_segment_ids, jnp.int32)
        seg_q, seg_kv = _pad(seg_q, 1, lqp, -1), _pad(seg_kv, 1, lkp, -1)
    ids_q = jnp.zeros((B, lqp), jnp.int32) if seg_q is None else seg_q
    ids_kv = jnp.zeros((B, lkp), jnp.int32) if seg_kv is None else seg_kv
    runs = jax.vmap(lambda s, t: block_runs(s, t, bq, bk, offset))(ids_q, ids_kv)
    busiest = jnp.maximum(runs.sum(2).max(), runs.sum(1).max())
    widths = grid_widths(max(lqp // bq, lkp // bk))
    return _Layout(bq, bk, lqp, lkp, offset, seg_q, seg_kv, runs, widths,
                   jnp.searchsorted(jnp.asarray(widths), busiest))


def visited_block_pairs(segment_ids, kv_segment_ids=None, *, causal=False, lq=None, lk=None, max_block=MAX_BLOCK):
    """int[B]: the (q block, kv block) pairs the splash forward kernel runs per batch row, read from the mask info
    it is given (block_mask > 0). segment_ids: int[B, Lq] (None: lq/lk give the lengths, no segments)."""
    layout = _accounting_layout(segment_ids, kv_segment_ids, causal, lq, lk, max_block)
    width = layout.widths[int(layout.width_index)]
    q_sequence = _q_sequence(layout.lqp, layout.offset)
    infos = jax.vmap(lambda r: _mask_infos(r, width, q_sequence)[0])(layout.runs)
    return (infos.block_mask > 0).sum(axis=(1, 2, 3))


def grid_steps(segment_ids, kv_segment_ids=None, *, causal=False, lq=None, lk=None, max_block=MAX_BLOCK):
    """int: the forward kernel's grid steps per head and batch row — nq × the grid width `_splash` picks for these
    ids (`grid_widths`) — run or skipped."""
    layout = _accounting_layout(segment_ids, kv_segment_ids, causal, lq, lk, max_block)
    nq, nk = layout.runs.shape[1:]
    return nq * min(layout.widths[int(layout.width_index)], nk)


def _accounting_layout(segment_ids, kv_segment_ids, causal, lq, lk, max_block) -> _Layout:
    if segment_ids is None:
        return _layout(None, None, causal, 1, lq, lk or lq, max_block)
    lk = segment_ids.shape[1] if kv_segment_ids is None else kv_segment_ids.shape[1]
    return _layout(segment_ids, kv_segment_ids, causal, segment_ids.shape[0], segment_ids.shape[1], lk, max_block)


def pallas_tpu_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, causal=False, platform=None):
    """Same contract as `attention.dot_product_attention` (inputs already checked there). platform: the platform
    the program is compiled for (attention.target_platform()).

    q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D]; segment_ids: int[B, Lq]; kv_segment_ids: int[B, Lk] → [B, Lq, H, D].
    """
    interpret = _interpret.get()
    if platform != "tpu" and not interpret:
        raise ValueError(f"implementation='pallas_tpu' needs a TPU (this program is compiled for {platform!r}); on "
                         "other devices run it inside qwen2vl_jax.attention.pallas_interpret() (slow, for tests) or "
                         "use implementation='auto' or 'xla'.")
    return _splash(q, k, v, segment_ids, kv_segment_ids, causal, mode="tpu_interpret" if interpret else "tpu")


def _splash(q, k, v, segment_ids, kv_segment_ids, causal, *, mode, max_block=MAX_BLOCK):
    """mode: "tpu" (compiled; the batch is vmapped, which Pallas lowers to a loop of kernel calls since each row has
    its own mask info), "tpu_interpret" (Pallas TPU interpret mode, batch rows one after another: in jax 0.10.2
    that interpreter rejects a vmapped kernel) or "generic_interpret" (Pallas' generic interpreter, batch vmapped)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    (B, lq, _, D), lk = q.shape, k.shape[1]
    layout = _layout(segment_ids, kv_segment_ids, causal, B, lq, lk, max_block)
    bq, bk, lqp, lkp = layout.bq, layout.bk, layout.lqp, layout.lkp
    dp = _round_up(D, LANES)
    q_sequence = _q_sequence(lqp, layout.offset)
    blocks = sk.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                           block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)

    def row(q, k, v, runs, seg, width):
        """One batch row: q [H, Lqp, Dp], k/v [Hkv, Lkp, Dp] → [H, Lqp, Dp], on a grid `width` steps wide."""
        fwd, dkv = _mask_infos(runs, width, q_sequence)
        kernel = sk.SplashAttentionKernel(
            fwd, fwd, dkv, block_sizes=blocks, is_mqa=False, save_residuals=False,
            mask_value=sk.DEFAULT_MASK_VALUE, attn_logits_soft_cap=None, residual_checkpoint_name=None,
            mask_function=_causal if causal else None, interpret=mode == "generic_interpret")
        return kernel(q, k, v, segment_ids=seg)

    def rows(width, qt, kt, vt, seg):
        if mode == "tpu_interpret":
            return jnp.stack([row(qt[b], kt[b], vt[b], layout.runs[b],
                                  None if seg is None else jax.tree.map(lambda x: x[b], seg), width)
                              for b in range(B)])
        return jax.vmap(lambda *a: row(*a, width))(qt, kt, vt, layout.runs, seg)

    scale = float(D) ** -0.5
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qt = _pad(_pad(qs, 3, dp), 1, lqp).transpose(0, 2, 1, 3)  # [B, H, Lqp, Dp]
    kt = _pad(_pad(k, 3, dp), 1, lkp).transpose(0, 2, 1, 3)  # [B, Hkv, Lkp, Dp]
    vt = _pad(_pad(v, 3, dp), 1, lkp).transpose(0, 2, 1, 3)
    seg = None if layout.seg_q is None else sk.SegmentIds(q=layout.seg_q, kv=layout.seg_kv)
    if len(layout.widths) == 1:
        out = rows(layout.widths[0], qt, kt, vt, seg)
    else:
        out = lax.switch(layout.width_index, [lambda *a, w=w: rows(w, *a) for w in layout.widths], qt, kt, vt, seg)
    out = out[:, :, :lq, :D].transpose(0, 2, 1, 3)  # [B, Lq, H, D]

    # Rows the kernel visits nothing for (padding, or no key at all) come out as 0/0: keep only rows that see a key.
    valid = _rows_that_see_a_key(segment_ids, kv_segment_ids, causal, B, lq, lk)
    if valid is not None:
        out = jnp.where(valid[:, :, None, None], out, 0)
    return out.astype(q.dtype)


def _rows_that_see_a_key(segment_ids, kv_segment_ids, causal, B, lq, lk):
    """bool[B, Lq] (None: every row does). With shared ids a row sees itself unless its id is negative; with
    separate kv ids (or causal with Lq > Lk) the kv ids are searched."""
    if segment_ids is None:
        if causal and lq > lk:
            return jnp.broadcast_to(jnp.arange(lq) + (lk - lq) >= 0, (B, lq))
        return None
    valid = segment_ids >= 0
    if kv_segment_ids is not None:
        valid &= _sees_a_key(segment_ids, kv_segment_ids, causal, lq, lk)
    return valid


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

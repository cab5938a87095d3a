"""Blockwise (flash-style) attention in pure JAX that skips kv blocks no query in a block can see.

Queries are cut into blocks of `bq` rows and keys into blocks of `bk` rows. Each query block runs an online softmax
over a dynamic range [lo, hi) of kv blocks (a `fori_loop` with traced bounds, i.e. a while loop), so the work done is
proportional to the number of (q-block, kv-block) pairs visited, not to Lq·Lk:

- shared segment ids (self-attention, `kv_segment_ids` absent): when every segment id forms ONE contiguous run (packed
  images), the keys a query block can see lie in [start of the run of its first row, end of the run of its last row),
  computed from run starts/ends (a cummax and a reverse cummin). For packed segments of lengths nᵢ the visited pairs
  are ≈ Σ (nᵢ/b + 1)², i.e. the cost grows with Σ nᵢ², not (Σ nᵢ)². If some id occurs in two separate runs the
  ranges would be wrong, so that batch row falls back to all kv blocks (detected with a sort: #runs ≠ #distinct ids);
- causal: kv blocks past the query block's last position are skipped (about half the pairs);
- always, inside a block, the exact mask (segment equality, causal, key padding) is applied, so the result equals
  dense masked attention whatever the ranges.

Batch rows and query blocks are visited one after another (one `lax.map` over B·nq), heads stay inside the block
matmuls, so no while loop is vmapped (a vmapped while loop runs every lane to the longest trip count). Queries and
outputs stay in the caller's [B, L, H, D] layout and each visited block is transposed to head-major in the loop: on
CPU that beats whole-array transposes (fresh 20 MB buffers) for the packed ViT and costs the single-image case nothing
measurable. Gradients come from a hand-written flash backward (`jax.custom_vjp`) that revisits the same pairs,
recomputing the probabilities from the saved log-sum-exp and accumulating dk/dv into full-length buffers.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
DEFAULT_BLOCK_SIZE = 256


class _Static(NamedTuple):
    lq: int  # real query length
    lk: int  # real key length
    causal: bool
    scale: float
    bq: int
    bk: int


def _round_up(x, m):
    return -(-x // m) * m


def _block_size(length, block_size):
    return min(block_size, _round_up(length, 8))


def _pad_axis(x, axis, new_len, mode="constant"):
    if x.shape[axis] == new_len:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, new_len - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _segment_runs(seg, n_real):
    """seg: int32[B, L] → run_start, run_end (exclusive) int32[B, L] and contiguous bool[B] (over the first n_real)."""
    B, L = seg.shape
    pos = jnp.arange(L, dtype=jnp.int32)
    change = seg[:, 1:] != seg[:, :-1]
    first = jnp.concatenate([jnp.ones((B, 1), bool), change], axis=1)
    last = jnp.concatenate([change, jnp.ones((B, 1), bool)], axis=1)
    run_start = lax.cummax(jnp.where(first, pos, 0), axis=1)
    run_end = lax.cummin(jnp.where(last, pos + 1, L), axis=1, reverse=True)
    real = seg[:, :n_real]
    n_runs = jnp.sum(real[:, 1:] != real[:, :-1], axis=1)
    ordered = jnp.sort(real, axis=1)
    n_ids = jnp.sum(ordered[:, 1:] != ordered[:, :-1], axis=1)
    return run_start, run_end, n_runs == n_ids


def kv_block_ranges(seg_q, *, shared_segments, lq, lk, bq, bk, causal):
    """The [lo, hi) kv-block range each query block visits: two int32[B, nq].

    seg_q: int32[B, Lq_padded] (edge-padded segment ids, only read when shared_segments)."""
    B, lqp = seg_q.shape
    nq, nk = lqp // bq, _round_up(lk, bk) // bk
    first = jnp.arange(nq, dtype=jnp.int32) * bq
    last = jnp.minimum(first + bq, lq) - 1
    lo = jnp.zeros((B, nq), jnp.int32)
    hi = jnp.full((B, nq), nk, jnp.int32)
    if shared_segments:
        run_start, run_end, contiguous = _segment_runs(seg_q, lq)
        lo = jnp.where(contiguous[:, None], run_start[:, first] // bk, lo)
        hi = jnp.where(contiguous[:, None], (jnp.minimum(run_end[:, last], lk) - 1) // bk + 1, hi)
    if causal:
        hi = jnp.minimum(hi, (lk - lq + last) // bk + 1)
    return lo, jnp.maximum(hi, lo)


def _block_mask(st, qs, qpos, ks, kpos):
    """bool[bq, bk]: same non-negative segment (a negative id is padding), real key, and (causal) key position <=
    query position."""
    mask = (qs[:, None] == ks[None, :]) & (qs >= 0)[:, None] & (kpos < st.lk)[None, :]
    if st.causal:
        mask &= kpos[None, :] <= qpos[:, None]
    return mask


def _to_rows(x, hkv):
    """[bq, H, D] (caller layout) → [Hkv, bq·G, D] (row r = query r // G, group r % G)."""
    bq, H, D = x.shape
    return x.reshape(bq, hkv, H // hkv, D).transpose(1, 0, 2, 3).reshape(hkv, bq * (H // hkv), D)


def _from_rows(x, bq):
    """Inverse of _to_rows: [Hkv, bq·G, D] → [bq, H, D]."""
    hkv, rows, D = x.shape
    return x.reshape(hkv, bq, rows // bq, D).transpose(1, 0, 2, 3).reshape(bq, -1, D)


def _slices(st, q, seg_q, k, v, seg_kv, t, nq):
    """Query block t = b·nq + i in rows layout, its segment ids / positions, and a function giving kv block j."""
    _, _, H, D = q.shape
    Hkv = k.shape[2]
    G = H // Hkv
    b, i = t // nq, t % nq
    qb = _to_rows(lax.dynamic_slice(q, (b, i * st.bq, 0, 0), (1, st.bq, H, D))[0], Hkv)
    qs = jnp.repeat(lax.dynamic_slice(seg_q, (b, i * st.bq), (1, st.bq))[0], G)
    qpos = jnp.repeat(st.lk - st.lq + i * st.bq + jnp.arange(st.bq), G)

    def kv(j):
        kb = lax.dynamic_slice(k, (b, j * st.bk, 0, 0), (1, st.bk, Hkv, D))[0].transpose(1, 0, 2)
        vb = lax.dynamic_slice(v, (b, j * st.bk, 0, 0), (1, st.bk, Hkv, D))[0].transpose(1, 0, 2)
        ks = lax.dynamic_slice(seg_kv, (b, j * st.bk), (1, st.bk))[0]
        return kb, vb, ks, j * st.bk + jnp.arange(st.bk)

    return b, i, qb, qs, qpos, kv


def _logits(st, qb, kb, qs, qpos, ks, kpos):
    s = jnp.einsum("hqd,hkd->hqk", qb, kb, preferred_element_type=F32) * st.scale
    return jnp.where(_block_mask(st, qs, qpos, ks, kpos), s, -jnp.inf)


def _forward(st, q, k, v, seg_q, seg_kv, lo, hi):
    """q: [B, Lqp, H, D]; k, v: [B, Lkp, Hkv, D] (caller layout, padded) → per query block t = b·nq + i:
    out [B·nq, bq, H, D] in q.dtype and lse float32[B·nq, Hkv, bq·G]."""
    B, lqp, H, D = q.shape
    Hkv = k.shape[2]
    nq, rows = lqp // st.bq, st.bq * (H // Hkv)

    def q_block(t):
        b, i, qb, qs, qpos, kv = _slices(st, q, seg_q, k, v, seg_kv, t, nq)

        def kv_block(j, carry):
            m, l, acc = carry
            kb, vb, ks, kpos = kv(j)
            s = _logits(st, qb, kb, qs, qpos, ks, kpos)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all masked so far: keep exp() at 0, not NaN
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("hqk,hkd->hqd", p.astype(vb.dtype), vb, preferred_element_type=F32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        init = (jnp.full((Hkv, rows), -jnp.inf, F32), jnp.zeros((Hkv, rows), F32), jnp.zeros((Hkv, rows, D), F32))
        m, l, acc = lax.fori_loop(lo[b, i], hi[b, i], kv_block, init)
        empty = l == 0.0  # no visible key: output 0, lse 0 (so the backward's exp(-inf - lse) stays 0)
        o = acc / jnp.where(empty, 1.0, l)[..., None]
        lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, l)))
        return _from_rows(o.astype(q.dtype), st.bq), lse

    return lax.map(q_block, jnp.arange(B * nq))


def _backward(st, q, k, v, seg_q, seg_kv, lo, hi, o, lse, do):
    B, lqp, H, D = q.shape
    Hkv = k.shape[2]
    nq = lqp // st.bq

    def q_block(bufs, xs):
        dk_buf, dv_buf = bufs
        t, ob, dob, lseb = xs
        b, i, qb, qs, qpos, kv = _slices(st, q, seg_q, k, v, seg_kv, t, nq)
        dob = _to_rows(dob, Hkv)
        deltab = jnp.sum(dob.astype(F32) * _to_rows(ob, Hkv).astype(F32), axis=-1)

        def kv_block(j, carry):
            dq, dk_buf, dv_buf = carry
            kb, vb, ks, kpos = kv(j)
            p = jnp.exp(_logits(st, qb, kb, qs, qpos, ks, kpos) - lseb[..., None])  # masked → 0
            dp = jnp.einsum("hqd,hkd->hqk", dob, vb, preferred_element_type=F32)
            ds = (p * (dp - deltab[..., None]) * st.scale).astype(q.dtype)
            dq = dq + jnp.einsum("hqk,hkd->hqd", ds, kb, preferred_element_type=F32)
            dk = jnp.einsum("hqk,hqd->hkd", ds, qb, preferred_element_type=F32)
            dv = jnp.einsum("hqk,hqd->hkd", p.astype(do.dtype), dob, preferred_element_type=F32)
            at = (b, 0, j * st.bk, 0)  # dk/dv buffers are head-major [B, Hkv, Lkp, D]
            dk_buf = lax.dynamic_update_slice(dk_buf, lax.dynamic_slice(dk_buf, at, (1, Hkv, st.bk, D)) + dk[None], at)
            dv_buf = lax.dynamic_update_slice(dv_buf, lax.dynamic_slice(dv_buf, at, (1, Hkv, st.bk, D)) + dv[None], at)
            return dq, dk_buf, dv_buf

        init = (jnp.zeros(qb.shape, F32), dk_buf, dv_buf)
        dq, dk_buf, dv_buf = lax.fori_loop(lo[b, i], hi[b, i], kv_block, init)
        return (dk_buf, dv_buf), _from_rows(dq.astype(q.dtype), st.bq)

    lkp = k.shape[1]
    bufs = (jnp.zeros((B, Hkv, lkp, D), F32), jnp.zeros((B, Hkv, lkp, D), F32))
    (dk, dv), dq = lax.scan(q_block, bufs, (jnp.arange(B * nq), o, do, lse))
    dk, dv = (x.transpose(0, 2, 1, 3) for x in (dk, dv))
    return dq.reshape(q.shape), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(st, q, k, v, seg_q, seg_kv, lo, hi):
    return _forward(st, q, k, v, seg_q, seg_kv, lo, hi)[0]


def _attend_fwd(st, q, k, v, seg_q, seg_kv, lo, hi):
    o, lse = _forward(st, q, k, v, seg_q, seg_kv, lo, hi)
    return o, (q, k, v, seg_q, seg_kv, lo, hi, o, lse)


def _attend_bwd(st, res, do):
    q, k, v, seg_q, seg_kv, lo, hi, o, lse = res
    dq, dk, dv = _backward(st, q, k, v, seg_q, seg_kv, lo, hi, o, lse, do)
    return dq, dk, dv, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def _prepare(segment_ids, kv_segment_ids, causal, lq, lk, batch, block_size):
    """Static block geometry, padded segment ids and kv ranges shared by the kernel and the visit counter."""
    bq, bk = _block_size(lq, block_size), _block_size(lk, block_size)
    lqp, lkp = _round_up(lq, bq), _round_up(lk, bk)
    shared = segment_ids is not None and (kv_segment_ids is None or kv_segment_ids is segment_ids)
    if segment_ids is None:
        seg_q, seg_kv = jnp.zeros((batch, lqp), jnp.int32), jnp.zeros((batch, lkp), jnp.int32)
    else:
        seg_q = _pad_axis(jnp.asarray(segment_ids, jnp.int32), 1, lqp, mode="edge")
        kv_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        seg_kv = _pad_axis(jnp.asarray(kv_ids, jnp.int32), 1, lkp, mode="edge")
    lo, hi = kv_block_ranges(seg_q, shared_segments=shared, lq=lq, lk=lk, bq=bq, bk=bk, causal=causal)
    return bq, bk, lqp, lkp, seg_q, seg_kv, lo, hi


def blockwise_attention(q, k, v, *, segment_ids=None, kv_segment_ids=None, causal=False,
                        block_size=DEFAULT_BLOCK_SIZE):
    """`attention.dot_product_attention`'s contract (q: [B, Lq, H, D]; k, v: [B, Lk, Hkv, D]), computed blockwise."""
    B, lq, H, D = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    bq, bk, lqp, lkp, seg_q, seg_kv, lo, hi = _prepare(segment_ids, kv_segment_ids, causal, lq, lk, B, block_size)
    st = _Static(lq, lk, bool(causal), float(D) ** -0.5, bq, bk)
    kp, vp = _pad_axis(k, 1, lkp), _pad_axis(v, 1, lkp)
    o = _attend(st, _pad_axis(q, 1, lqp), kp, vp, seg_q, seg_kv, lo, hi)  # [B·nq, bq, H, D]
    return o.reshape(B, lqp, H, D)[:, :lq]


def visited_block_pairs(segment_ids, *, kv_segment_ids=None, causal=False, kv_length=None,
                        block_size=DEFAULT_BLOCK_SIZE):
    """How many (q-block, kv-block) pairs the blockwise kernel visits for these segment ids (int32[B, Lq]); a jax int.

    Dense attention corresponds to B · ceil(Lq/b) · ceil(Lk/b) pairs; packed contiguous segments of lengths nᵢ give
    about Σ (nᵢ/b + 1)²."""
    segment_ids = jnp.asarray(segment_ids, jnp.int32)
    B, lq = segment_ids.shape
    lk = lq if kv_length is None else kv_length
    lo, hi = _prepare(segment_ids, kv_segment_ids, causal, lq, lk, B, block_size)[-2:]
    return jnp.sum(hi - lo)

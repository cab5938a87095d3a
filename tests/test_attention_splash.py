"""implementation="pallas_tpu" (splash attention) in Pallas TPU interpret mode vs the float64 reference: values and
dq/dk/dv for the packed ViT (head_dim 80), a left-padded GQA decoder, end-aligned causal with Lq ≠ Lk; block
sparsity from the segment ids (mask infos built in the trace), visited-pair counts against an independent count. Plus the CPU-checkable parts of the cuDNN backend."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax import attention_cudnn, attention_pallas
from qwen2vl_jax.attention import dot_product_attention, pallas_interpret
from test_attention import left_padded_ids, packed_ids, qkv, reference

TOL = dict(atol=1e-5, rtol=1e-5)


def splash(q, k, v, seg=None, kv_seg=None, causal=False):
    return dot_product_attention(q, k, v, segment_ids=seg, kv_segment_ids=kv_seg, causal=causal,
                                 implementation="pallas_tpu")


def check_values_and_grads(q, k, v, seg=None, kv_seg=None, causal=False, attend=splash, mode=pallas_interpret):
    """Forward and jax.grad (q, k, v) under jit vs the float64 reference and its analytic gradients."""
    d_out = jnp.asarray(np.random.default_rng(99).standard_normal(q.shape), jnp.float32)
    f = lambda q, k, v: attend(q, k, v, seg, kv_seg, causal)
    with mode():
        out = jax.jit(f)(q, k, v)
        grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * d_out), argnums=(0, 1, 2)))(q, k, v)
    want, want_grads = reference(q, k, v, seg, kv_seg, causal=causal, d_out=d_out)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, want, **TOL)
    for name, got, exp in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, exp, **TOL, err_msg=f"d{name}")
    return out


@pytest.mark.parametrize("heads", [2])
def test_packed_vit_head_dim_80(heads):
    """Unequal packed segments + padding rows (their own id), D = 80 zero-padded to 128, lengths to 512."""
    seg = packed_ids([130, 64, 300], pad=18)
    q, k, v = qkv(0, 1, seg.shape[1], heads, 80)
    check_values_and_grads(q, k, v, seg)


@pytest.mark.parametrize("heads", [7])
def test_causal_left_padded_gqa_head_dim_128(heads):
    """Decoder prefill: causal, left padding in its own segment, one kv head for 6 or 7 query heads (no repeat)."""
    seg = left_padded_ids(200, [0, 37])
    q, k, v = qkv(1, 2, 200, heads, 128, hkv=1)
    check_values_and_grads(q, k, v, seg, causal=True)


@pytest.mark.parametrize("lq", [1, 130])
def test_end_aligned_causal_shorter_queries(lq):
    """Lq < Lk: query i at position Lk - Lq + i (CausalMask offset), left-padded kv ids, GQA 2:1."""
    lk = 150
    kv_seg = left_padded_ids(lk, [0, 9])
    q, k, v = qkv(3, 2, lq, 4, 128, lk=lk, hkv=2)
    check_values_and_grads(q, k, v, kv_seg[:, -lq:], kv_seg, causal=True)


def test_causal_without_segment_ids_and_more_queries_than_keys():
    """Lq > Lk, causal: the first Lq - Lk query rows see no key and return exactly 0."""
    q, k, v = qkv(4, 1, 200, 2, 64, lk=150)
    out = check_values_and_grads(q, k, v, causal=True)
    np.testing.assert_array_equal(out[:, :50], 0.0)


def test_rows_that_see_no_key_are_zero_not_nan():
    q, k, v = qkv(8, 1, 20, 2, 8, lk=30)
    seg_q = jnp.asarray([[1] * 10 + [7] * 10], jnp.int32)  # id 7 has no key
    seg_kv = jnp.asarray([[1] * 30], jnp.int32)
    out = check_values_and_grads(q, k, v, seg_q, seg_kv)
    np.testing.assert_array_equal(out[:, 10:], 0.0)


def test_block_aligned_lengths_without_segment_ids():
    """L = 256, D = 128: nothing padded, no SegmentIds passed to the kernel; full and causal masks."""
    q, k, v = qkv(9, 1, 256, 2, 128)
    check_values_and_grads(q, k, v)
    check_values_and_grads(q, k, v, causal=True)


def test_vmapped_batch_path():
    """On TPU the kernel is vmapped over the batch; the TPU interpreter rejects that (the tests above run batch rows
    one by one), so the vmapped form is checked with Pallas' generic interpreter."""
    seg = left_padded_ids(200, [0, 37, 5])
    q, k, v = qkv(10, 3, 200, 6, 80, hkv=2)
    generic = lambda q, k, v, s, kv_s, causal: attention_pallas._splash(q, k, v, s, kv_s, causal,
                                                                       mode="generic_interpret")
    check_values_and_grads(q, k, v, seg, causal=True, attend=generic, mode=contextlib.nullcontext)


def test_bfloat16_close_to_float32():
    seg = packed_ids([100, 156])
    q, k, v = qkv(11, 1, 256, 2, 80)
    with pallas_interpret():
        want = jax.jit(splash)(q, k, v, seg)
        got = jax.jit(splash)(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2, rtol=0)


def small_blocks(q, k, v, seg=None, kv_seg=None, causal=False):
    """Splash with 128-row blocks, so rows of a few hundred span several blocks and the sparsity is exercised."""
    return attention_pallas._splash(q, k, v, seg, kv_seg, causal, mode="tpu_interpret", max_block=128)


def exact_pairs(seg_q, seg_kv, block, causal=False):
    """Independent count: (q block, kv block) pairs holding at least one visible (query, key) pair (dense numpy)."""
    seg_q, seg_kv = np.asarray(seg_q[0]), np.asarray(seg_kv[0])
    lq, lk = len(seg_q), len(seg_kv)
    see = (seg_q[:, None] == seg_kv[None, :]) & (seg_q[:, None] >= 0)
    if causal:
        see &= np.arange(lk)[None, :] <= np.arange(lq)[:, None] + lk - lq
    nq, nk = -(-lq // block), -(-lk // block)
    return sum(see[i * block:(i + 1) * block, j * block:(j + 1) * block].any() for i in range(nq) for j in range(nk))


@pytest.mark.parametrize("case", ["packed", "lone_tokens", "causal_segments_gqa", "cross_lengths"])
def test_block_sparse_values_and_grads(case):
    """Several 128-row blocks: segments crossing block boundaries, shorter than a block, a lone token, padding rows
    (negative ids: zero output, no gradient), causal + segments with GQA, Lq ≠ Lk with separate kv ids."""
    lk = None
    if case == "packed":
        seg, kv_seg, causal, hkv = packed_ids([300, 17, 64, 1, 129], pad=101), None, False, 2
    elif case == "lone_tokens":
        seg, kv_seg, causal, hkv = packed_ids([1, 255, 1, 1, 130, 1], pad=3), None, False, 2
    elif case == "causal_segments_gqa":
        seg, kv_seg, causal, hkv = jnp.asarray([[0] * 70 + [1] * 200 + [2] * 150 + [3] * 90], jnp.int32), None, True, 1
    else:
        lk = 520
        kv_seg = jnp.asarray([[0] * 100 + [1] * 250 + [2] * 170], jnp.int32)
        seg, causal, hkv = kv_seg[:, -300:], True, 2
    q, k, v = qkv(20, 1, seg.shape[1], 2, 80, lk=lk, hkv=hkv)
    out = check_values_and_grads(q, k, v, seg, kv_seg, causal, attend=small_blocks)
    np.testing.assert_array_equal(np.asarray(out)[np.asarray(seg) < 0], 0.0)
    runs = attention_pallas.visited_block_pairs(seg, kv_seg, causal=causal, max_block=128)
    assert int(runs[0]) == exact_pairs(seg, seg if kv_seg is None else kv_seg, 128, causal)


def test_narrow_and_full_grids():
    """16 blocks of 128 rows: short segments take the 8-wide grid (forward and gradients), a long one the full 16
    (`lax.switch` at run time); both equal the reference."""
    seg = packed_ids([256] * 7 + [200], pad=56)
    q, k, v = qkv(23, 1, 2048, 1, 64)
    check_values_and_grads(q, k, v, seg, attend=small_blocks)
    assert attention_pallas.grid_steps(seg, max_block=128) == 16 * 8
    seg = packed_ids([1800, 248])
    with pallas_interpret():
        out = jax.jit(small_blocks)(q, k, v, seg)
    np.testing.assert_allclose(out, reference(q, k, v, seg), **TOL)
    assert attention_pallas.grid_steps(seg, max_block=128) == 16 * 16


def test_batch_rows_get_their_own_mask_info():
    """Two rows with different layouts in one call (the compiled path's loop of kernel calls, generic interpreter):
    each row's mask info comes from its own ids."""
    seg = jnp.concatenate([packed_ids([128, 128, 128], pad=0), packed_ids([90, 90, 90, 114], pad=0)])
    q, k, v = qkv(21, 2, 384, 2, 64)
    generic = lambda q, k, v, s, kv_s, causal: attention_pallas._splash(q, k, v, s, kv_s, causal,
                                                                       mode="generic_interpret", max_block=128)
    check_values_and_grads(q, k, v, seg, attend=generic, mode=contextlib.nullcontext)
    np.testing.assert_array_equal(attention_pallas.visited_block_pairs(seg, max_block=128), [3, 7])


def test_visited_pairs_follow_the_segments():
    """Sixteen 256-row images in 4096 rows at 512-row blocks: 8 block pairs, not 64; padding visits nothing;
    causal 2048² without segments: 10 of 16; a mask info built from the ids the kernel gets."""
    images = packed_ids([256] * 16)
    assert int(attention_pallas.visited_block_pairs(images)[0]) == 8 == exact_pairs(images, images, 512)
    half_padding = packed_ids([256] * 8, pad=2048)
    assert int(attention_pallas.visited_block_pairs(half_padding)[0]) == 4
    assert int(attention_pallas.visited_block_pairs(None, lq=2048, causal=True)[0]) == 10
    assert int(attention_pallas.visited_block_pairs(None, lq=2048)[0]) == 16
    video = packed_ids([300] * 61)  # 61 frame-pairs of 300 rows: 18,300 rows in 36 blocks
    assert int(attention_pallas.visited_block_pairs(video)[0]) == exact_pairs(video, video, 512) < 36 * 3


def test_skipped_steps_fetch_nothing_new():
    """Each row's running blocks come first on the grid; the other steps repeat the last fetched block (no DMA),
    forward (kv inner) and dkv (q inner); a grid 2 steps wide holds every row here."""
    seg = packed_ids([128, 128, 256], pad=128)  # blocks: 1 | 2 | 3 3 | pad
    runs = attention_pallas.block_runs(seg[0], seg[0], 128, 128)
    np.testing.assert_array_equal(runs, [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0],
                                         [0, 0, 0, 0, 0]])
    fetch = [[0, 0], [1, 1], [2, 3], [2, 3], [3, 3]]
    active = [[1, 0], [1, 0], [1, 1], [1, 1], [0, 0]]
    fwd, dkv = attention_pallas.mask_info(seg[0], seg[0], 128, 128, width=2)
    np.testing.assert_array_equal(fwd.data_next[0], fetch)
    np.testing.assert_array_equal(fwd.block_mask[0], active)
    np.testing.assert_array_equal(np.asarray(dkv.data_next[0]).T, fetch)  # symmetric runs: the same order
    np.testing.assert_array_equal(np.asarray(dkv.block_mask[0]).T, active)
    assert fwd.block_mask.dtype == jnp.int8 and fwd.data_next.dtype == jnp.int8
    full, _ = attention_pallas.mask_info(seg[0], seg[0], 128, 128)  # uncompressed: 5 steps a row
    np.testing.assert_array_equal(full.data_next[0, :, :2], fetch)
    assert int(full.block_mask.sum()) == int(runs.sum()) == 6


def test_grid_narrows_to_the_busiest_row():
    """A 16-block row of 256-row segments runs at most 3 blocks per row: the 8-wide grid (128 steps, not 256);
    one segment over all 16 blocks needs the full width."""
    images = packed_ids([256] * 8)
    assert attention_pallas.grid_steps(images, max_block=128) == 16 * 8
    assert attention_pallas.grid_steps(packed_ids([2048]), max_block=128) == 16 * 16
    assert attention_pallas.grid_widths(16) == (8, 16) and attention_pallas.grid_widths(9) == (9,)


def test_builds_inside_a_trace_without_running_anything():
    """The mask infos are values of the trace: lowering under jit creates no device constant and runs nothing."""
    seg = packed_ids([300, 212])
    q, k, v = qkv(22, 1, 512, 2, 64)
    with pallas_interpret():
        text = jax.jit(lambda q, k, v, s: splash(q, k, v, s)).lower(q, k, v, seg).as_text()
    assert "cummax" in text or "reduce_window" in text or "while" in text  # the fetch order is computed in-trace


def test_cudnn_backend_needs_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    q, k, v = qkv(13, 1, 8, 2, 8)
    with pytest.raises(ValueError, match="cudnn.*GPU"):
        attention_cudnn.cudnn_attention(q, k, v)


def test_cudnn_packed_layout_describes_the_segment_mask():
    """The (offsets, seqlens) handed to cuDNN's packed layout: attending within each run (causal = top-left within a
    run) reproduces segment-id attention; too many runs or an id in two runs → ok = False (blockwise fallback)."""
    seg = jnp.concatenate([packed_ids([5, 9, 2], pad=4), left_padded_ids(20, [7])])
    offsets, seqlens, ok = attention_cudnn.packed_segments(seg, max_segments=6)
    assert bool(ok) and offsets.shape == (2, 7) and seqlens.shape == (2, 6)
    np.testing.assert_array_equal(offsets, [[0, 5, 14, 16, -1, -1, -1], [0, 7, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(seqlens, [[5, 9, 2, 4, -1, -1], [7, 13, -1, -1, -1, -1]])
    q, k, v = (np.asarray(x) for x in qkv(14, 2, 20, 2, 8))
    offsets, seqlens = np.asarray(offsets), np.asarray(seqlens)
    for causal in (False, True):
        out = np.zeros(q.shape)
        for b in range(2):
            for o, n in zip(offsets[b], seqlens[b]):
                if n > 0:
                    r = slice(o, o + n)
                    out[b, r] = reference(q[b:b + 1, r], k[b:b + 1, r], v[b:b + 1, r], causal=causal)[0]
        out[np.asarray(seg) < 0] = 0  # padding rows: zeroed after the kernel (cudnn_attention)
        np.testing.assert_allclose(out, reference(q, k, v, seg, causal=causal), atol=1e-12)
    assert not bool(attention_cudnn.packed_segments(seg, max_segments=3)[2])
    assert not bool(attention_cudnn.packed_segments(jnp.asarray([[0, 0, 1, 1, 0]]), max_segments=4)[2])


def test_qwen2_5_window_and_frame_segment_ids():
    """Qwen2.5-VL's packed ViT ids (frame-pair · 2¹⁶ + window: windows of 16–64 rows, edge windows cut short,
    padding runs) and their frame-pair part, as the window and full-attention blocks pass them: splash serves both."""
    from qwen2vl_jax.inputs import WINDOW_SLOTS, vision_layout

    layout = vision_layout(np.array([(1, 10, 14), (2, 8, 8)]), 2, pad_to=512, window_units=4)
    seg = jnp.asarray(layout.segment_ids[None])
    # 5×7 merged units → 2×2 windows (three cut short); each 4×4-unit frame of the video → one window
    assert int(seg.max()) // WINDOW_SLOTS == 3 and len(np.unique(layout.segment_ids[:268])) == 4 + 1 + 1
    q, k, v = qkv(0, 1, seg.shape[1], 2, 80)
    check_values_and_grads(q, k, v, seg)
    check_values_and_grads(q, k, v, jnp.where(seg >= 0, seg // WINDOW_SLOTS, seg))

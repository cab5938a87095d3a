"""implementation="pallas_tpu" (splash attention) in Pallas TPU interpret mode vs the float64 reference: values and
dq/dk/dv for the packed ViT (head_dim 80), a left-padded GQA decoder, end-aligned causal with Lq ≠ Lk; block
sparsity from splash's own mask info; kernel caching. Plus the CPU-checkable parts of the cuDNN backend."""
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


@pytest.mark.parametrize("heads", [2, 4])
def test_packed_vit_head_dim_80(heads):
    """Unequal packed segments + padding rows (their own id), D = 80 zero-padded to 128, lengths to 512."""
    seg = packed_ids([130, 64, 300], pad=18)
    q, k, v = qkv(0, 1, seg.shape[1], heads, 80)
    check_values_and_grads(q, k, v, seg)


@pytest.mark.parametrize("heads", [6, 7])
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


def test_causal_mask_skips_blocks_above_the_diagonal():
    """Splash's static mask info: a causal 1024² mask in 512-row blocks visits 3 of 4 block pairs, 2048² 10 of 16;
    the dq and dkv kernels skip the same pairs; a full mask visits all (segment ids are masked inside blocks)."""
    assert attention_pallas.active_block_fraction(1024, 1024, causal=True) == 3 / 4
    assert attention_pallas.active_block_fraction(2048, 2048, causal=True) == 10 / 16
    assert attention_pallas.active_block_fraction(2048, 2048, causal=False) == 1.0
    kernel = attention_pallas._splash_kernel(1, 2048, 2048, 0)
    for info in (kernel.dq_mask_info, kernel.dkv_mask_info):
        assert int((np.asarray(info.block_mask) > 0).sum()) == 10
    # end-aligned 512 queries against 2048 keys: the one query block sees all 4 kv blocks
    assert attention_pallas.active_block_fraction(512, 2048, causal=True) == 1.0


def test_kernels_are_cached_across_traces():
    attention_pallas._splash_kernel.cache_clear()
    q, k, v = qkv(12, 1, 40, 2, 16)
    with pallas_interpret():
        for seed in range(2):  # two separate traces, one kernel build
            jax.jit(lambda q, k, v: splash(q, k, v, causal=True) + seed)(q, k, v)
    info = attention_pallas._splash_kernel.cache_info()
    assert info.misses == 1 and info.hits == 1


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

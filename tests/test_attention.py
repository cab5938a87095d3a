"""Attention backends vs a float64 numpy reference: values, gradients, masks, GQA, cost, backend errors.

The Pallas splash backend ("pallas_tpu", in interpret mode) is tested in test_attention_splash.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax import attention
from qwen2vl_jax.attention import dot_product_attention, visited_block_pairs
from qwen2vl_jax.attention_blockwise import blockwise_attention

TOL = dict(atol=1e-5, rtol=1e-5)


def reference(q, k, v, seg_q=None, seg_kv=None, causal=False, d_out=None):
    """float64 attention (and, given d_out, its q/k/v gradients) straight from the definition; rows that see no key
    (negative ids among them) give 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    (B, lq, H, D), (_, lk, hkv, _) = q.shape, k.shape
    g = H // hkv
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, kr) * D ** -0.5
    mask = np.ones((B, lq, lk), bool)
    if seg_q is not None:
        seg_kv = seg_q if seg_kv is None else seg_kv
        mask &= np.asarray(seg_q)[:, :, None] == np.asarray(seg_kv)[:, None, :]
        mask &= np.asarray(seg_q)[:, :, None] >= 0  # a negative id is padding: it sees no key
    if causal:
        mask &= np.arange(lk)[None, None, :] <= np.arange(lq)[None, :, None] + lk - lq
    mask = mask[:, None]
    s = np.where(mask, s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isinf(m), 0, m))
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    out = np.einsum("bhqk,bkhd->bqhd", p, vr)
    if d_out is None:
        return out
    d_out = np.asarray(d_out, np.float64)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * D ** -0.5
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q).reshape(B, lk, hkv, g, D).sum(3) * D ** -0.5
    dv = np.einsum("bhqk,bqhd->bkhd", p, d_out).reshape(B, lk, hkv, g, D).sum(3)
    return out, (dq, dk, dv)


def qkv(seed, B, lq, H, D, lk=None, hkv=None, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    lk, hkv = lk or lq, hkv or H
    return (jnp.asarray(r.standard_normal(shape), dtype) for shape in ((B, lq, H, D), (B, lk, hkv, D), (B, lk, hkv, D)))


def packed_ids(lengths, pad=0, pad_id=-1):
    """One packed row: segment i (1-based) repeated lengths[i] times, then `pad` rows of pad_id."""
    ids = np.concatenate([np.repeat(np.arange(1, len(lengths) + 1), lengths), np.full(pad, pad_id)])
    return jnp.asarray(ids[None], jnp.int32)


def left_padded_ids(L, pads):
    return jnp.asarray([[0] * p + [1] * (L - p) for p in pads], jnp.int32)


XLA_PATHS = ["xla", "xla_dense", "xla_blockwise"]
LENGTHS = [17, 200, 64, 300]


@pytest.mark.parametrize("impl", XLA_PATHS)
def test_packed_unequal_segments(impl):
    seg = packed_ids(LENGTHS, pad=43)  # 624 rows: "xla" takes the blockwise path (>= BLOCKWISE_MIN_LENGTH)
    q, k, v = qkv(0, 1, seg.shape[1], 4, 16)
    out = dot_product_attention(q, k, v, segment_ids=seg, implementation=impl)
    assert out.shape == q.shape and out.dtype == q.dtype
    np.testing.assert_allclose(out, reference(q, k, v, seg), **TOL)


@pytest.mark.parametrize("impl", XLA_PATHS)
def test_causal_left_padding(impl):
    seg = left_padded_ids(520, [0, 37, 300])
    q, k, v = qkv(1, 3, 520, 4, 16, hkv=2)
    out = dot_product_attention(q, k, v, segment_ids=seg, causal=True, implementation=impl)
    np.testing.assert_allclose(out, reference(q, k, v, seg, causal=True), **TOL)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (12, 2)])
@pytest.mark.parametrize("impl", XLA_PATHS)
def test_gqa(impl, heads, kv_heads):
    seg = packed_ids([150, 90, 300], pad=12)
    q, k, v = qkv(2, 1, seg.shape[1], heads, 8, hkv=kv_heads)
    out = dot_product_attention(q, k, v, segment_ids=seg, implementation=impl)
    np.testing.assert_allclose(out, reference(q, k, v, seg), **TOL)


@pytest.mark.parametrize("lq", [1, 7])
@pytest.mark.parametrize("impl", XLA_PATHS)
def test_decode_style_shorter_queries(impl, lq):
    """Lq < Lk, causal, end-aligned (query i at position Lk - Lq + i), left-padded keys."""
    lk = 70
    kv_seg = left_padded_ids(lk, [0, 9])
    q, k, v = qkv(3, 2, lq, 4, 16, lk=lk, hkv=2)
    out = dot_product_attention(q, k, v, segment_ids=kv_seg[:, -lq:], kv_segment_ids=kv_seg, causal=True,
                                implementation=impl)
    np.testing.assert_allclose(out, reference(q, k, v, kv_seg[:, -lq:], kv_seg, causal=True), **TOL)
    out = dot_product_attention(q, k, v, causal=True, implementation=impl)  # no segment ids
    np.testing.assert_allclose(out, reference(q, k, v, causal=True), **TOL)


@pytest.mark.parametrize("case", ["packed", "causal_gqa", "noncontiguous", "small_blocks"])
def test_blockwise_gradients_match_reference(case):
    if case == "packed":
        seg, causal, H, hkv, block = packed_ids(LENGTHS, pad=43), False, 4, 4, 256
    elif case == "causal_gqa":
        seg, causal, H, hkv, block = left_padded_ids(300, [0, 45]), True, 6, 2, 64
    elif case == "noncontiguous":  # an id in two runs: ranges fall back to all kv blocks, still exact
        seg, causal, H, hkv, block = jnp.asarray(np.r_[np.zeros(70), np.ones(100), np.zeros(90)][None], jnp.int32), \
            False, 2, 1, 32
    else:
        seg, causal, H, hkv, block = packed_ids([5, 33, 1, 64, 100], pad=3), False, 4, 2, 16
    q, k, v = qkv(4, seg.shape[0], seg.shape[1], H, 8, hkv=hkv)
    d_out = jnp.asarray(np.random.default_rng(5).standard_normal(q.shape), jnp.float32)
    loss = lambda q, k, v: jnp.sum(blockwise_attention(q, k, v, segment_ids=seg, causal=causal,
                                                       block_size=block) * d_out)
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    out_ref, grads_ref = reference(q, k, v, seg, causal=causal, d_out=d_out)
    np.testing.assert_allclose(blockwise_attention(q, k, v, segment_ids=seg, causal=causal, block_size=block),
                               out_ref, **TOL)
    for got, want in zip(grads, grads_ref):
        np.testing.assert_allclose(got, want, **TOL)


def test_dense_gradients_match_reference():
    seg = left_padded_ids(40, [0, 11])
    q, k, v = qkv(6, 2, 40, 4, 8, hkv=2)
    d_out = jnp.asarray(np.random.default_rng(7).standard_normal(q.shape), jnp.float32)
    loss = lambda q, k, v: jnp.sum(dot_product_attention(q, k, v, segment_ids=seg, causal=True,
                                                         implementation="xla_dense") * d_out)
    grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(grads, reference(q, k, v, seg, causal=True, d_out=d_out)[1]):
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("impl", ["xla_dense", "xla_blockwise"])
def test_rows_that_see_no_key_are_zero_not_nan(impl):
    q, k, v = qkv(8, 1, 20, 2, 8, lk=30)
    seg_q = jnp.asarray([[1] * 10 + [7] * 10], jnp.int32)  # id 7 has no key
    seg_kv = jnp.asarray([[1] * 30], jnp.int32)
    f = lambda q, k, v: dot_product_attention(q, k, v, segment_ids=seg_q, kv_segment_ids=seg_kv, implementation=impl)
    out = f(q, k, v)
    np.testing.assert_array_equal(out[:, 10:], 0.0)
    np.testing.assert_allclose(out[:, :10], reference(q, k, v, seg_q, seg_kv)[:, :10], **TOL)
    grads = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("impl", ["xla_dense", "xla_blockwise"])
def test_bfloat16_close_to_float32(impl):
    """bf16 inputs (logits/softmax still f32): within 3e-2 of the f32 result (bf16 has an 8-bit mantissa)."""
    seg = packed_ids([100, 200, 300])
    q, k, v = qkv(9, 1, 600, 4, 16, hkv=2)
    want = dot_product_attention(q, k, v, segment_ids=seg, implementation=impl)
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = dot_product_attention(*bf, segment_ids=seg, implementation=impl)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2, rtol=0)
    grads = jax.grad(lambda q: jnp.sum(dot_product_attention(q, *bf[1:], segment_ids=seg,
                                                             implementation=impl).astype(jnp.float32)))(bf[0])
    assert grads.dtype == jnp.bfloat16 and bool(jnp.isfinite(grads.astype(jnp.float32)).all())


def test_segment_sizes_are_not_static():
    """One compilation serves any packing of the same total length, under jit and grad."""
    traces = []

    @jax.jit
    def step(q, k, v, seg):
        traces.append(1)
        return jax.grad(lambda q: jnp.sum(dot_product_attention(q, k, v, segment_ids=seg) ** 2))(q), \
            dot_product_attention(q, k, v, segment_ids=seg)

    q, k, v = qkv(10, 1, 512, 2, 8)
    for lengths in ([512], [256, 256], [7, 100, 405], [1] * 12 + [500]):
        seg = packed_ids(lengths)
        _, out = step(q, k, v, seg)
        np.testing.assert_allclose(out, reference(q, k, v, seg), **TOL)
    assert len(traces) == 1


def test_cost_grows_with_sum_of_squared_segment_lengths():
    packed = int(visited_block_pairs(packed_ids([256] * 16)))
    single = int(visited_block_pairs(packed_ids([4096])))
    assert single == 16 * 16 and packed == 16  # 256-row blocks: ratio exactly 1/16
    # unequal, unaligned segments: at most (n/b + 2)² pairs per segment; here under half the dense 16² pairs
    lengths = [300, 77, 1000, 20, 600, 2099]
    pairs = int(visited_block_pairs(packed_ids(lengths)))
    assert pairs <= sum((n / 256 + 2) ** 2 for n in lengths) and pairs < 0.5 * 16 * 16
    # causal skips the blocks above the diagonal; non-contiguous ids fall back to every block (still exact)
    assert int(visited_block_pairs(jnp.zeros((1, 4096), jnp.int32), causal=True)) == 16 * 17 // 2
    mixed = jnp.asarray(np.tile(np.repeat([0, 1], 256), 8)[None], jnp.int32)
    assert int(visited_block_pairs(mixed)) == 256


def test_pallas_tpu_outside_tpu_or_interpret_mode_is_a_clear_error():
    if jax.default_backend() == "tpu":
        pytest.skip("on a TPU the kernel runs natively")
    q, k, v = qkv(12, 1, 8, 2, 8)
    with pytest.raises(ValueError, match="pallas_interpret"):
        dot_product_attention(q, k, v, implementation="pallas_tpu")


def test_unknown_implementation_lists_choices():
    q, k, v = qkv(13, 1, 8, 2, 8)
    with pytest.raises(ValueError, match="xla_dense.*cudnn.*pallas_tpu"):
        dot_product_attention(q, k, v, implementation="flash")


def test_bad_shapes_are_clear_errors():
    q, k, v = qkv(14, 1, 8, 3, 8, hkv=2)
    with pytest.raises(ValueError, match="multiple of the kv head count"):
        dot_product_attention(q, k, v)
    q, k, v = qkv(14, 1, 4, 2, 8, lk=8)
    with pytest.raises(ValueError, match="kv_segment_ids"):
        dot_product_attention(q, k, v, segment_ids=jnp.zeros((1, 4), jnp.int32))


def test_cudnn_needs_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present: cuDNN is checked against xla in test_cudnn_matches_xla_on_gpu")
    q, k, v = qkv(15, 1, 8, 2, 8)
    with pytest.raises(ValueError, match="cudnn.*GPU"):
        dot_product_attention(q, k, v, implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="GPU-only: cuDNN flash attention needs an NVIDIA GPU, "
                    "and this machine has none")
def test_cudnn_matches_xla_on_gpu():
    seg = packed_ids([100, 28], pad=0)
    q, k, v = (x.astype(jnp.bfloat16) for x in qkv(16, 1, 128, 4, 64, hkv=2))
    for causal in (False, True):
        got = dot_product_attention(q, k, v, segment_ids=seg, causal=causal, implementation="cudnn")
        want = dot_product_attention(q, k, v, segment_ids=seg, causal=causal, implementation="xla")
        np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.float32), atol=2e-2)


@pytest.mark.parametrize("length,causal,segments,blockwise", [
    (attention.BLOCKWISE_MIN_LENGTH, False, True, True), (attention.BLOCKWISE_MIN_LENGTH, True, False, True),
    (attention.BLOCKWISE_MIN_LENGTH - 8, False, True, False), (attention.BLOCKWISE_MIN_LENGTH, False, False, False)])
def test_xla_picks_blockwise_for_long_masked_self_attention(length, causal, segments, blockwise):
    q, k, v = qkv(17, 1, length, 2, 8)
    seg = packed_ids([length // 2, length - length // 2]) if segments else None
    jaxpr = jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, segment_ids=seg, causal=causal))(q, k, v)
    assert ("while" in str(jaxpr)) == blockwise


def test_auto_follows_the_compiled_for_devices():
    """auto: XLA on CPU (no mesh, or a mesh of CPU devices); an unknown name is refused by the config too."""
    from qwen2vl_jax import Qwen2VLConfig
    from qwen2vl_jax.attention import resolve_implementation, target_platform

    assert target_platform() == "cpu" and resolve_implementation("auto", jnp.bfloat16) == "xla"
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    with jax.set_mesh(mesh):
        assert target_platform() == "cpu" and resolve_implementation("auto") == "xla"
    assert resolve_implementation("pallas_tpu") == "pallas_tpu"
    assert Qwen2VLConfig().attention == "auto"
    with pytest.raises(ValueError, match="attention='flash'"):
        Qwen2VLConfig(attention="flash")
    q, k, v = qkv(30, 1, 40, 2, 16)
    with pytest.raises(ValueError, match="needs a TPU"):
        dot_product_attention(q, k, v, implementation="pallas_tpu")

"""The packed ViT against transformers' vision tower: last hidden states and merged features."""
import jax
import numpy as np
import pytest
import torch

from qwen2vl_jax import Qwen2VL
from qwen2vl_jax.inputs import vision_layout
from reference import pixels, reference

CASES = {
    "one_image": [(1, 8, 12)],
    "three_images_packed": [(1, 4, 4), (1, 10, 6), (1, 2, 14)],
    "video": [(3, 6, 4)],
}


@pytest.mark.parametrize("name", ["tied", "untied"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_vit_matches_transformers(name, case):
    cfg, model, params = reference(name)
    grids = np.array(CASES[case])
    px = pixels(np.random.default_rng(0), grids)
    with torch.no_grad():
        out = model.model.visual(torch.from_numpy(px), grid_thw=torch.from_numpy(grids))
    pos, seg = vision_layout(grids, cfg.vision.spatial_merge_size)[:2]
    merged, hidden = jax.jit(lambda p, x: Qwen2VL(cfg).apply({"params": p}, x, pos, seg, method=lambda m, *a: m.visual(
        *a, return_hidden=True)))(params, px)
    np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(merged), out.pooler_output.numpy(), atol=1e-5, rtol=0)


def test_padding_rows_do_not_change_real_features():
    """Bucketed batches pad the packed sequence; the padding is its own segment and must not leak."""
    cfg, _, params = reference("tied")
    grids = np.array([(1, 4, 6), (2, 2, 4)])
    px = pixels(np.random.default_rng(1), grids)
    encode = jax.jit(lambda p, x, pos, seg: Qwen2VL(cfg).apply({"params": p}, x, pos, seg,
                                                               method=Qwen2VL.encode_vision))
    apply = lambda x, pos, seg: np.asarray(encode(params, x, pos, seg))
    exact = apply(px, *vision_layout(grids, 2)[:2])
    padded_px = np.concatenate([px, 7.0 * np.ones((16, px.shape[1]), np.float32)])
    padded = apply(padded_px, *vision_layout(grids, 2, pad_to=len(px) + 16)[:2])
    np.testing.assert_allclose(padded[: len(exact)], exact, atol=1e-6, rtol=0)


def test_vision_layout_rows_are_block_major():
    pos, seg = vision_layout(np.array([(2, 2, 4)]), 2)[:2]
    # one frame: h-block 0, w-blocks 0 and 1, each 2×2 block row-major inside
    frame = [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    np.testing.assert_array_equal(pos, np.array(frame * 2))
    np.testing.assert_array_equal(seg, [1] * 8 + [2] * 8)

"""Full-model logits against transformers, dtypes, scan_layers, and clear errors on bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax import Qwen2VL, prepare_inputs
from qwen2vl_jax.checkpoint.mapping import stack_layers
from reference import left_pad, pixels, prompt, reference, torch_logits

CASES = {
    "text_only": [[12]],
    "one_image": [[3, ("image", (1, 6, 8)), 5]],
    "two_images_one_sample": [[2, ("image", (1, 4, 6)), 3, ("image", (1, 8, 4)), 4]],
    "image_and_video": [[3, ("image", (1, 4, 4)), 2, ("video", (2, 6, 4)), 4]],
    "left_padded_batch": [[2, ("image", (1, 4, 4)), 3], [6, ("image", (1, 8, 6)), 1],
                          [1, ("image", (1, 2, 10)), 9]],
}


def make_batch(cfg, pieces, seed=0):
    rng = np.random.default_rng(seed)
    ids, mask = left_pad([prompt(cfg, rng, p) for p in pieces], cfg.pad_token_id)
    grids = {kind: [g for row in pieces for g in [p for p in row if isinstance(p, tuple)] if g[0] == kind]
             for kind in ("image", "video")}
    batch = dict(input_ids=ids, attention_mask=mask)
    for kind, px_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
        if grids[kind]:
            g = np.array([grid for _, grid in grids[kind]])
            batch[px_key], batch[grid_key] = pixels(rng, g), g
    return batch


def logits(cfg, params, batch) -> np.ndarray:
    """Qwen2VL.apply on the HF-named arrays, jitted over params and pixels only (ids and grids stay concrete for the
    host-side layout): one compilation costs far less than eager op-by-op dispatch. Eager = jitted is checked by
    test_jitted_forward_equals_eager."""
    pixel_keys = [k for k in ("pixel_values", "pixel_values_videos") if k in batch]
    rest = {k: v for k, v in batch.items() if k not in pixel_keys}
    run = jax.jit(lambda p, px: Qwen2VL(cfg).apply({"params": p}, **rest, **px))
    return np.asarray(run(params, {k: batch[k] for k in pixel_keys}))


@pytest.mark.parametrize("name", ["tied", "untied"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(name, case):
    cfg, model, params = reference(name)
    batch = make_batch(cfg, CASES[case])
    ref = torch_logits(model, cfg, batch)
    ours = logits(cfg, params, batch)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


def test_jitted_forward_equals_eager():
    cfg, _, params = reference("untied")
    batch = make_batch(cfg, CASES["image_and_video"])
    eager = Qwen2VL(cfg).apply({"params": params}, **batch)
    prepared = prepare_inputs(cfg, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                              batch["video_grid_thw"], image_rows=len(batch["pixel_values"]),
                              video_rows=len(batch["pixel_values_videos"]))
    pixels_all = np.concatenate([batch["pixel_values"], batch["pixel_values_videos"]])
    forward = jax.jit(lambda p, ids, prep, px: Qwen2VL(cfg).apply({"params": p}, ids, prep, px,
                                                                   method=Qwen2VL.forward))
    np.testing.assert_allclose(np.asarray(forward(params, batch["input_ids"], prepared, pixels_all)),
                               np.asarray(eager), atol=1e-5, rtol=0)


def test_scan_layers_equals_unrolled():
    cfg, _, params = reference("untied")
    batch = make_batch(cfg, CASES["two_images_one_sample"])
    unrolled = logits(cfg, params, batch)
    scan_cfg = cfg.replace(scan_layers=True)
    scanned = logits(scan_cfg, stack_layers(params, scan_cfg), batch)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-5, rtol=0)


def test_bfloat16_close_to_float32():
    cfg, _, params = reference("tied")
    batch = make_batch(cfg, CASES["left_padded_batch"])
    f32 = logits(cfg, params, batch)
    bf16_cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    bf16_params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), params)
    bf16 = logits(bf16_cfg, bf16_params, batch)
    assert bf16.dtype == np.float32
    real = batch["attention_mask"].astype(bool)
    err = np.abs(bf16[real] - f32[real])
    scale = np.abs(f32[real]).max()
    agree = np.mean(bf16[real].argmax(-1) == f32[real].argmax(-1))
    print(f"bf16 vs fp32 logits: max abs {err.max():.4f}, mean abs {err.mean():.4f}, max |logit| {scale:.2f}, "
          f"argmax agreement {agree:.3f}")
    assert err.max() < 0.05 * scale
    assert agree >= 0.9


def test_placeholder_count_mismatch_is_a_clear_error():
    cfg, _, params = reference("tied")
    batch = make_batch(cfg, CASES["one_image"])
    batch["input_ids"] = batch["input_ids"][:, :-8]  # truncation that cuts into the image's placeholders
    batch["attention_mask"] = batch["attention_mask"][:, :-8]
    with pytest.raises(ValueError, match=r"10 image placeholder tokens .* give 12 merged features"):
        Qwen2VL(cfg).apply({"params": params}, **batch)


def test_grid_inconsistent_with_pixels_is_a_clear_error():
    cfg, _, params = reference("tied")
    batch = make_batch(cfg, CASES["one_image"])
    batch["pixel_values"] = batch["pixel_values"][:-4]
    with pytest.raises(ValueError, match=r"pixel_values has 44 patch rows but image_grid_thw"):
        Qwen2VL(cfg).apply({"params": params}, **batch)


def test_grid_not_multiple_of_merge_size_is_a_clear_error():
    cfg, _, params = reference("tied")
    batch = make_batch(cfg, CASES["one_image"])
    batch["image_grid_thw"] = np.array([[1, 3, 16]])
    with pytest.raises(ValueError, match="multiples of spatial_merge_size"):
        Qwen2VL(cfg).apply({"params": params}, **batch)


def test_traced_grids_are_a_clear_error():
    cfg, _, params = reference("tied")
    batch = make_batch(cfg, CASES["one_image"])
    with pytest.raises(ValueError, match="prepare_inputs outside jit"):
        jax.jit(lambda b: Qwen2VL(cfg).apply({"params": params}, **b))(batch)


def test_pixel_rows_of_the_wrong_width_are_named():
    cfg, _, params = reference("tied")
    batch = make_batch(cfg, CASES["image_and_video"])
    batch["pixel_values_videos"] = batch["pixel_values_videos"][:, :100]
    with pytest.raises(ValueError, match=r"pixel_values_videos must be \[patches, 1176\]"):
        Qwen2VL(cfg).apply({"params": params}, **batch)

"""get_rope_index and the rotary embeddings against transformers."""
import numpy as np
import pytest
import torch

from qwen2vl_jax import get_rope_index
from qwen2vl_jax.rope import mrope, vision_rope
from reference import left_pad, mm_token_type_ids, prompt, reference


def _ours(cfg, ids, mask, images, videos):
    return get_rope_index(ids, mask, images, videos, image_token_id=cfg.image_token_id,
                          video_token_id=cfg.video_token_id)


def _theirs(model, cfg, ids, mask, images, videos):
    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))
    pos, delta = model.model.get_rope_index(t(ids), t(mm_token_type_ids(cfg, ids)), t(images), t(videos), t(mask))
    return pos.numpy(), delta.numpy().reshape(-1)


CASES = {
    "text_only": ([[9]], None, None),
    "image": ([[4, ("image", (1, 6, 8)), 5]], [(1, 6, 8)], None),
    "image_video": ([[3, ("image", (1, 4, 6)), 2, ("video", (2, 6, 4)), 4]], [(1, 4, 6)], [(2, 6, 4)]),
    "left_padded_batch": ([[2, ("image", (1, 4, 4)), 3], [7, ("image", (1, 8, 6)), 1, ("image", (1, 2, 4)), 6],
                           [5]], [(1, 4, 4), (1, 8, 6), (1, 2, 4)], None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_get_rope_index_matches_transformers(case):
    cfg, model, _ = reference("tied")
    pieces, images, videos = CASES[case]
    rng = np.random.default_rng(1)
    ids, mask = left_pad([prompt(cfg, rng, p) for p in pieces], cfg.pad_token_id)
    images = None if images is None else np.array(images)
    videos = None if videos is None else np.array(videos)
    pos, delta = _ours(cfg, ids, mask, images, videos)
    if images is None and videos is None:  # transformers leaves text-only positions to the text model
        expected = np.broadcast_to(np.cumsum(mask, -1) - 1, pos.shape)
        np.testing.assert_array_equal(pos[:, mask == 1], expected[:, mask == 1])
        np.testing.assert_array_equal(delta, 0)
        return
    ref_pos, ref_delta = _theirs(model, cfg, ids, mask, images, videos)
    real = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, real], ref_pos[:, real])
    np.testing.assert_array_equal(delta, ref_delta)


def test_video_longer_than_wide_follows_the_original_rule():
    """LLM grid t'=6 > max(h', w')=2: the next text starts at max(all positions) + 1 = start + 6.

    transformers 5.x starts it at start + max(h', w') = start + 2 (REFERENCE.md's known divergence)."""
    cfg, model, _ = reference("tied")
    rng = np.random.default_rng(0)
    ids = np.array([prompt(cfg, rng, [2, ("video", (6, 4, 4)), 3])])
    # tokens: 2 text, <vision_start>, 24 video, <vision_end>, 3 text
    pos, delta = _ours(cfg, ids, None, None, np.array([(6, 4, 4)]))
    start = 3  # after two text tokens and <vision_start>
    video = pos[:, 0, 3:27]
    np.testing.assert_array_equal(video[0], start + np.repeat(np.arange(6), 4))
    np.testing.assert_array_equal(video[1], start + np.tile(np.repeat(np.arange(2), 2), 6))
    np.testing.assert_array_equal(video[2], start + np.tile(np.arange(2), 12))
    np.testing.assert_array_equal(pos[:, 0, 27:], np.broadcast_to(np.arange(9, 13), (3, 4)))  # vision_end, text
    assert delta[0] == 13 - ids.shape[1]
    ref_pos, _ = _theirs(model, cfg, ids, None, None, np.array([(6, 4, 4)]))
    assert ref_pos[0, 0, 27] == start + 2, "transformers' rule changed: revisit REFERENCE.md's note"


def test_mrope_matches_transformers():
    cfg, model, _ = reference("untied")
    rng = np.random.default_rng(2)
    position_ids = rng.integers(0, 300, (3, 2, 7))
    rotary = model.model.language_model.rotary_emb
    x = torch.zeros(1, dtype=torch.float32)
    cos_ref, sin_ref = rotary(x, torch.as_tensor(position_ids))
    t = cfg.text
    cos, sin = mrope(position_ids, t.head_dim, t.rope_theta, t.mrope_section)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=1e-6)


def test_vision_rope_matches_transformers():
    cfg, model, _ = reference("tied")
    rng = np.random.default_rng(3)
    pos = rng.integers(0, 100, (11, 2))
    rotary = model.model.visual.rotary_pos_emb
    cos_ref, sin_ref = rotary(torch.zeros(1), torch.as_tensor(pos))
    cos, sin = vision_rope(pos, cfg.vision.head_dim)
    np.testing.assert_allclose(np.asarray(cos), cos_ref.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(sin), sin_ref.numpy(), atol=1e-6)

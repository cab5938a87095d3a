"""Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration on random weights (float32).

Two small configs: A's 56-px windows (2×2 merged units) divide the test grids, B's 112-px windows (4×4) do not, so
its edge windows are cut short as transformers pads them. Vocabulary and token ids are not Qwen's."""
import functools
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from qwen2vl_jax import Qwen2VL, Qwen2VLConfig, TextConfig, VisionConfig, generate, prepare_inputs
from qwen2vl_jax.checkpoint.mapping import expected_torch_names, param_to_torch, params_from_torch
from qwen2vl_jax.rope import get_rope_index
from reference import _TOKENS, left_pad, mm_token_type_ids, pixels, prompt, transformers_generate

CONFIGS = {
    "A": Qwen2VLConfig(
        vision=VisionConfig(model_type="qwen2_5_vl", depth=4, embed_dim=64, num_heads=4, intermediate_size=96,
                            window_size=56, fullatt_block_indexes=(1, 3), hidden_size=64, tokens_per_second=2),
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3)), **_TOKENS),
    "B": Qwen2VLConfig(
        vision=VisionConfig(model_type="qwen2_5_vl", depth=3, embed_dim=48, num_heads=3, intermediate_size=80,
                            window_size=112, fullatt_block_indexes=(0,), hidden_size=96, tokens_per_second=4),
        text=TextConfig(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        tie_word_embeddings=False, rope_theta=10000.0), **_TOKENS),
}
IMAGE_A, IMAGE_B = (1, 8, 8), (1, 10, 14)  # merged 4×4 (A's windows divide it) and 5×7 (B's 4×4 windows do not)


@functools.lru_cache(maxsize=None)
def reference(name: str):
    """(config, transformers model, our params) sharing random weights; every tensor redrawn."""
    cfg = CONFIGS[name]
    torch.manual_seed(1)
    model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or "ln_q" in pname:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim >= 2 and "embed_tokens" not in pname:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.3 * torch.randn_like(p))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return cfg, model, params_from_torch(state, cfg)


def torch_logits(model, cfg, batch):
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if v is not None}
    kwargs["mm_token_type_ids"] = torch.from_numpy(mm_token_type_ids(cfg, np.asarray(batch["input_ids"])))
    with torch.no_grad():
        return model(**kwargs).logits.numpy()


def request(cfg, pieces, seed, seconds=None):
    """HF-named arrays for one prompt of `pieces` (see reference.prompt), plus second_per_grid_ts for its videos."""
    rng = np.random.default_rng(seed)
    ids = np.array([prompt(cfg, rng, pieces)])
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for kind, px, key in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                      "video_grid_thw")):
        grids = np.array([g for k, g in (p for p in pieces if isinstance(p, tuple)) if k == kind])
        if len(grids):
            out[px], out[key] = pixels(rng, grids), grids
    if seconds is not None:
        out["second_per_grid_ts"] = np.asarray(seconds, np.float32)
    return out


@pytest.mark.parametrize("name", ["A", "B"])
def test_vit_features_equal_transformers(name):
    cfg, model, params = reference(name)
    rng = np.random.default_rng(0)
    for grids in ([IMAGE_A], [IMAGE_B], [IMAGE_B, IMAGE_A], [(3, 6, 10)], [IMAGE_A, (2, 10, 14)]):
        px = pixels(rng, grids)
        with torch.no_grad():
            want = model.model.visual(torch.from_numpy(px), grid_thw=torch.tensor(grids)).pooler_output.numpy()
        got = np.asarray(Qwen2VL(cfg).apply({"params": params}, px, np.array(grids), method=Qwen2VL.vision_features))
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0, err_msg=str(grids))


CASES = {
    "one image": ([3, ("image", IMAGE_B), 5], None),
    "two images of different sizes": ([2, ("image", IMAGE_A), 3, ("image", IMAGE_B), 4], None),
    # 1/3 s per frame-pair × tokens_per_second: time steps 0.67 (A) / 1.33 (B), truncated to 0, 0, 1 / 0, 1, 2;
    # the time rows stay within the spatial extent (3 × 5 merged), so transformers' text rule and the released one
    # agree here (the case where they differ: test_time_scaled_video_text_follows_the_released_rule...)
    "video with second_per_grid_ts 1/3": ([4, ("video", (3, 6, 10)), 2], [1 / 3]),
}


@pytest.mark.parametrize("name", ["A", "B"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(name, case):
    cfg, model, params = reference(name)
    pieces, seconds = CASES[case]
    batch = request(cfg, pieces, seed=3, seconds=seconds)
    want = torch_logits(model, cfg, batch)
    got = np.asarray(Qwen2VL(cfg).apply({"params": params}, **batch))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["A", "B"])
def test_left_padded_batch_equals_transformers(name):
    cfg, model, params = reference(name)
    rows = [request(cfg, [2, ("image", IMAGE_B), 9], 4), request(cfg, [3, ("video", (2, 6, 10)), 1], 5, [0.5])]
    ids, mask = left_pad([r["input_ids"][0].tolist() for r in rows], cfg.pad_token_id)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=rows[0]["pixel_values"],
                 image_grid_thw=rows[0]["image_grid_thw"], pixel_values_videos=rows[1]["pixel_values_videos"],
                 video_grid_thw=rows[1]["video_grid_thw"], second_per_grid_ts=rows[1]["second_per_grid_ts"])
    want = torch_logits(model, cfg, batch)
    got = np.asarray(Qwen2VL(cfg).apply({"params": params}, **batch))
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def released_positions(tokens, grids, seconds, tokens_per_second, image_id, video_id):
    """The released Qwen2.5-VL rule, written independently: text continues at the max of all positions + 1."""
    out, start, i, videos, images = [], 0, 0, iter(zip(grids["video"], seconds)), iter(grids["image"])
    while i < len(tokens):
        if tokens[i] in (image_id, video_id):
            if tokens[i] == video_id:
                (t, h, w), second = next(videos)
                step = np.float32(tokens_per_second) * np.float32(second)
            else:
                (t, h, w), step = next(images), np.float32(1)
            block = [(start + int(np.float32(k) * step), start + y, start + x)
                     for k in range(t) for y in range(h // 2) for x in range(w // 2)]
            out += block
            start = max(max(p) for p in block) + 1
            i += len(block)
        else:
            out.append((start, start, start))
            start, i = start + 1, i + 1
    return np.array(out).T


def test_time_scaled_video_text_follows_the_released_rule_not_transformers():
    """A 6-frame-pair video of 2×3 merged units at 2 s per frame-pair (tokens_per_second 2 → time step 4): its time
    positions reach start + 20 while its sides reach start + 2. Text after it continues at the max + 1 (released
    code); transformers 5.24 continues at start + max(h', w') = start + 3, inside the video's time range."""
    cfg, model, _ = reference("A")
    batch = request(cfg, [3, ("video", (6, 4, 6)), 4], 6, seconds=[2.0])
    ids = batch["input_ids"]
    ours, _ = get_rope_index(ids, None, None, batch["video_grid_thw"], image_token_id=cfg.image_token_id,
                             video_token_id=cfg.video_token_id, second_per_grid_ts=batch["second_per_grid_ts"],
                             tokens_per_second=cfg.vision.tokens_per_second)
    want = released_positions(ids[0].tolist(), {"image": [], "video": batch["video_grid_thw"].tolist()}, [2.0], 2,
                              cfg.image_token_id, cfg.video_token_id)
    np.testing.assert_array_equal(ours[:, 0], want)
    theirs, _ = model.model.get_rope_index(torch.from_numpy(ids), torch.from_numpy(mm_token_type_ids(cfg, ids)),
                                           video_grid_thw=torch.from_numpy(batch["video_grid_thw"]),
                                           second_per_grid_ts=torch.from_numpy(batch["second_per_grid_ts"]))
    theirs = theirs.numpy()[:, 0]
    after = np.flatnonzero(ids[0] == cfg.vision_end_token_id)[0]
    np.testing.assert_array_equal(ours[:, 0, :after], theirs[:, :after])  # the video itself agrees
    assert ours[0, 0, after] == 3 + 1 + 20 + 1 and theirs[0, after] == 3 + 1 + 3  # text after it does not
    # the prepared model inputs carry the released positions too
    prepared = prepare_inputs(cfg, ids, None, None, batch["video_grid_thw"], video_rows=len(batch["pixel_values_videos"]),
                              second_per_grid_ts=batch["second_per_grid_ts"])
    np.testing.assert_array_equal(prepared["position_ids"], ours)


@pytest.mark.parametrize("name", ["A", "B"])
def test_greedy_generate_equals_transformers_per_row(name):
    cfg, model, params = reference(name)
    rows = [request(cfg, [2, ("image", IMAGE_B), 5], 7), request(cfg, [4], 8),
            request(cfg, [1, ("video", (3, 6, 10)), 3], 9, [1 / 3])]
    ids, mask = left_pad([r["input_ids"][0].tolist() for r in rows], cfg.pad_token_id)
    batch = dict(input_ids=ids, attention_mask=mask, pixel_values=rows[0]["pixel_values"],
                 image_grid_thw=rows[0]["image_grid_thw"], pixel_values_videos=rows[2]["pixel_values_videos"],
                 video_grid_thw=rows[2]["video_grid_thw"], second_per_grid_ts=rows[2]["second_per_grid_ts"])
    got = generate(cfg, jax.device_put(params), batch, max_new_tokens=6, eos_token_ids=[])
    for row, alone in zip(got, rows):
        np.testing.assert_array_equal(row, transformers_generate(model, cfg, alone, 6))


def test_conversion_round_trip_is_bit_identical(tmp_path):
    cfg, model, _ = reference("B")
    model.save_pretrained(tmp_path / "hf")
    orbax, back = tmp_path / "orbax", tmp_path / "back"
    for args in (["--hf-dir", str(tmp_path / "hf"), "--out", str(orbax)],
                 ["--to-hf", "--orbax-dir", str(orbax), "--out", str(back)]):
        subprocess.run([sys.executable, "-m", "qwen2vl_jax.checkpoint.convert", *args], check=True,
                       capture_output=True)
    assert Qwen2VLConfig.from_hf(back).replace(generation=cfg.generation) == cfg
    from safetensors.numpy import load_file

    original = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    written = {k: v for f in back.glob("*.safetensors") for k, v in load_file(f).items()}
    assert sorted(written) == sorted(expected_torch_names(cfg)) == sorted(original)
    for name, value in original.items():
        assert written[name].dtype == value.dtype and np.array_equal(written[name], value), name
    # and per tensor, through the mapping both ways
    params = params_from_torch(original, cfg)
    path = ("visual", "blocks_1", "mlp", "gate_proj", "kernel")
    name, array = param_to_torch(path, functools.reduce(lambda t, k: t[k], path, params), cfg)
    assert name == "visual.blocks.1.mlp.gate_proj.weight" and np.array_equal(array, original[name])


def test_packed_vit_on_8_devices_equals_one_device():
    """The window-ordered packed ViT laid out per batch shard on an 8-device mesh gives the single-sequence result."""
    from qwen2vl_jax.inputs import gather_vision_pixels
    from sharding.mesh import make_mesh
    from sharding.rules import axis_rules, param_shardings

    cfg, _, params = reference("B")
    rows = [request(cfg, [1, ("image", g), 2], 10 + i) for i, g in
            enumerate([IMAGE_B, IMAGE_A, (1, 6, 10), IMAGE_B, (1, 4, 12), IMAGE_A, IMAGE_B, (1, 10, 6)])]
    ids, mask = left_pad([r["input_ids"][0].tolist() for r in rows], cfg.pad_token_id)
    grids = np.concatenate([r["image_grid_thw"] for r in rows])
    px = np.concatenate([r["pixel_values"] for r in rows])
    one = np.asarray(Qwen2VL(cfg).apply({"params": params}, ids, mask, px, grids))
    mesh = make_mesh("fsdp=8")
    prepared = prepare_inputs(cfg, ids, mask, grids, image_rows=len(px), vision_shards=8)
    assert prepared["vision_pos_hw"].shape[0] == 8
    vision = gather_vision_pixels(px, prepared.pop("vision_rows"))
    with jax.set_mesh(mesh), axis_rules(mesh):
        sharded = jax.device_put(params, param_shardings(cfg, mesh))
        forward = jax.jit(lambda p, i, pr, v: Qwen2VL(cfg).apply({"params": p}, i, pr, v, method=Qwen2VL.forward))
        eight = np.asarray(forward(sharded, ids, prepared, vision))
    real = mask.astype(bool)
    np.testing.assert_allclose(eight[real], one[real], atol=2e-5, rtol=0)

"""Qwen2.5-VL (model_type "qwen2_5_vl") against transformers' Qwen2_5_VLForConditionalGeneration, random weights, f32.

Two small configs with small vocabularies (token ids remapped as in reference._TOKENS):
  A: 56-px windows = 2×2 merged units, which divide its main image grid (1, 8, 8) → 4×4 merged units;
  B: 112-px windows = 4×4 merged units, which do not divide (1, 10, 14) → 5×7 merged units (edge windows cut short).
Videos use second_per_grid_ts ≠ 1 so that tokens_per_second · second_per_grid_ts = 4/3 moves the time positions
(frame-pairs 0, 1, 2, 4 instead of 0, 1, 2, 3)."""
import functools
import json

import jax
import numpy as np
import pytest
import torch
import transformers

from qwen2vl_jax import Qwen2VL, Qwen2VLConfig, TextConfig, VisionConfig, generate
from reference import _TOKENS, left_pad, redraw, mm_token_type_ids, pixels, prompt, transformers_generate

CONFIGS = {
    "A": Qwen2VLConfig(
        vision=VisionConfig(model_type="qwen2_5_vl", depth=4, embed_dim=64, num_heads=4, intermediate_size=96,
                            patch_size=14, window_size=56, fullatt_block_indexes=(1, 3), hidden_size=64,
                            tokens_per_second=2),
        text=TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        tie_word_embeddings=True), **_TOKENS),
    "B": Qwen2VLConfig(
        vision=VisionConfig(model_type="qwen2_5_vl", depth=3, embed_dim=48, num_heads=3, intermediate_size=80,
                            patch_size=14, window_size=112, fullatt_block_indexes=(0,), hidden_size=96,
                            tokens_per_second=4),
        text=TextConfig(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                        num_attention_heads=6, num_key_value_heads=2, mrope_section=(2, 3, 3),
                        tie_word_embeddings=False, rope_theta=10000.0), **_TOKENS),
}
IMAGE = {"A": (1, 8, 8), "B": (1, 10, 14)}  # merged 4×4 (A: 2×2 windows divide it) / 5×7 (B: 4×4 windows do not)
OTHER_IMAGE = {"A": (1, 6, 10), "B": (1, 8, 8)}  # a second, differently sized image
# 4 frame-pairs of 3×5 merged units: time steps 0, 1, 2, 4 (× 4/3, truncated) stay within the spatial extent 0..4,
# so transformers' text rule and the released one agree on these prompts
VIDEO = {"A": (4, 6, 10), "B": (4, 6, 10)}
SECONDS = {"A": 2 / 3, "B": 1 / 3}  # × tokens_per_second (2 / 4) = 4/3 per frame-pair in both


def _hf_config(cfg):
    return transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict())


@functools.lru_cache(maxsize=None)
def reference(name: str):
    """(our config, transformers model in f32 eval mode, our params) sharing random weights, every tensor redrawn."""
    from qwen2vl_jax.checkpoint.mapping import params_from_torch

    cfg = CONFIGS[name]
    torch.manual_seed({"A": 11, "B": 12}[name])
    model = transformers.Qwen2_5_VLForConditionalGeneration(_hf_config(cfg)).eval()
    redraw(model)
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}  # in-memory model.* names
    return cfg, model, jax.device_put(params_from_torch(state, cfg))


def request(cfg, pieces, seed, seconds=None) -> dict:
    """One unpadded prompt as the processor lays it out (HF names), plus second_per_grid_ts for its videos."""
    rng = np.random.default_rng(seed)
    ids = np.array([prompt(cfg, rng, pieces)])
    out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for kind, px, key in (("image", "pixel_values", "image_grid_thw"),
                          ("video", "pixel_values_videos", "video_grid_thw")):
        grids = np.array([g for k, g in (p for p in pieces if isinstance(p, tuple)) if k == kind])
        if len(grids):
            out[px], out[key] = pixels(rng, grids), grids
    if "video_grid_thw" in out:
        out["second_per_grid_ts"] = np.full(len(out["video_grid_thw"]), seconds, np.float32)
    return out


def batch_of(cfg, requests) -> dict:
    """Unpadded requests → one left-padded batch, vision arrays concatenated in row order."""
    ids, mask = left_pad([r["input_ids"][0].tolist() for r in requests], cfg.pad_token_id)
    out = {"input_ids": ids, "attention_mask": mask}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [r[key] for r in requests if key in r]
        if parts:
            out[key] = np.concatenate(parts)
    return out


def torch_logits(model, cfg, batch, position_ids=None) -> np.ndarray:
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    kwargs["mm_token_type_ids"] = torch.from_numpy(mm_token_type_ids(cfg, batch["input_ids"]))
    if position_ids is not None:
        kwargs["position_ids"] = torch.from_numpy(np.asarray(position_ids, np.int64))
    with torch.no_grad():
        return model(**kwargs).logits.float().numpy()


def torch_rope_index(model, cfg, batch) -> np.ndarray:
    t = lambda key: torch.from_numpy(np.asarray(batch[key])) if key in batch else None
    pos, _ = model.model.get_rope_index(t("input_ids"), torch.from_numpy(mm_token_type_ids(cfg, batch["input_ids"])),
                                        image_grid_thw=t("image_grid_thw"), video_grid_thw=t("video_grid_thw"),
                                        second_per_grid_ts=t("second_per_grid_ts"),
                                        attention_mask=t("attention_mask"))
    return pos.numpy()


def released_rope_index(cfg, batch, time_step=None):
    """The released Qwen2.5-VL M-RoPE rule, written out independently of the library: each span (text run or vision
    block) starts at 1 + the max of ALL positions before it in its row; a video's frame-pair k sits at
    int(k · float32(tokens_per_second · second_per_grid_ts)) from its start (`time_step` overrides that step), an
    image's at 0. → (positions int[3, B, L] (1 on padding), deltas int[B])."""
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"]).astype(bool)
    merge, tps = cfg.vision.spatial_merge_size, np.float32(cfg.vision.tokens_per_second)
    images = iter(np.asarray(batch.get("image_grid_thw", np.zeros((0, 3)))).tolist())
    videos = iter(zip(np.asarray(batch.get("video_grid_thw", np.zeros((0, 3)))).tolist(),
                      np.asarray(batch.get("second_per_grid_ts", np.zeros(0)), np.float32).tolist()))
    vision = {cfg.image_token_id, cfg.video_token_id}
    out, deltas = np.ones((3,) + ids.shape, np.int64), np.zeros(len(ids), np.int64)
    for b in range(len(ids)):
        tokens, spans, nxt, i = ids[b][mask[b]], [], 0, 0
        while i < len(tokens):
            if tokens[i] in vision:
                if tokens[i] == cfg.image_token_id:
                    (t, h, w), times = next(images), np.zeros(1, np.int64)
                else:
                    (t, h, w), second = next(videos)
                    step = np.float32(tps * np.float32(second)) if time_step is None else np.float32(time_step)
                    times = np.array([int(np.float32(k) * step) for k in range(int(t))], np.int64)
                tt, hh, ww = np.meshgrid(times, np.arange(h // merge), np.arange(w // merge), indexing="ij")
                span = nxt + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
            else:
                j = i
                while j < len(tokens) and tokens[j] not in vision:
                    j += 1
                span = nxt + np.broadcast_to(np.arange(j - i), (3, j - i))
            spans.append(span)
            i += span.shape[1]
            nxt = int(span.max()) + 1
        row = np.concatenate(spans, axis=1)
        out[:, b, mask[b]] = row
        deltas[b] = row.max() + 1 - len(tokens)
    return out, deltas


def _logits(cfg, params, batch) -> np.ndarray:
    """Qwen2VL.apply on the HF-named arrays. Jitted over params and pixels only (the ids and grids stay concrete for
    the host-side layout): one compilation costs a third of eager op-by-op dispatch here."""
    pixel_keys = [k for k in ("pixel_values", "pixel_values_videos") if k in batch]
    rest = {k: v for k, v in batch.items() if k not in pixel_keys}
    run = jax.jit(lambda p, px: Qwen2VL(cfg).apply({"params": p}, **rest, **px))
    return np.asarray(run(params, {k: batch[k] for k in pixel_keys}))


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("name", ["A", "B"])
def test_config_round_trips_through_transformers(name, tmp_path):
    cfg, model, _ = reference(name)
    written = cfg.to_hf_dict()
    assert written["model_type"] == "qwen2_5_vl"
    assert Qwen2VLConfig.from_hf(written) == cfg
    hf = _hf_config(cfg)
    v = hf.vision_config
    assert (v.hidden_size, v.out_hidden_size, v.intermediate_size, v.depth, v.num_heads) == (
        cfg.vision.embed_dim, cfg.vision.hidden_size, cfg.vision.intermediate_size, cfg.vision.depth,
        cfg.vision.num_heads)
    assert (v.window_size, list(v.fullatt_block_indexes), float(v.tokens_per_second)) == (
        cfg.vision.window_size, list(cfg.vision.fullatt_block_indexes), float(cfg.vision.tokens_per_second))
    assert (hf.image_token_id, hf.video_token_id, hf.vision_start_token_id) == (500, 501, 498)
    assert Qwen2VLConfig.from_hf(hf.to_dict()) == cfg
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    # generation_config.json beside it repeats config.json's ids: nothing the config does not already hold
    assert Qwen2VLConfig.from_hf(tmp_path) == cfg


# ---------------------------------------------------------------------------------------------------- the ViT


VIT_CASES = {
    "one image": {"A": [IMAGE["A"]], "B": [IMAGE["B"]]},
    "two images of different sizes": {"A": [IMAGE["A"], OTHER_IMAGE["A"]], "B": [IMAGE["B"], OTHER_IMAGE["B"]]},
    "image then video": {"A": [(1, 4, 6), (2, 8, 8)], "B": [(1, 4, 6), (3, 10, 14)]},
}


@pytest.mark.parametrize("name", ["A", "B"])
@pytest.mark.parametrize("case", list(VIT_CASES))
def test_vit_features_equal_transformers(name, case):
    cfg, model, params = reference(name)
    grids = np.array(VIT_CASES[case][name])
    px = pixels(np.random.default_rng(5), grids)
    with torch.no_grad():
        want = model.model.visual(torch.from_numpy(px), grid_thw=torch.from_numpy(grids)).pooler_output.numpy()
    got = np.asarray(jax.jit(lambda p, x: Qwen2VL(cfg).apply({"params": p}, x, grids, method=Qwen2VL.vision_features))(
        params, px))
    assert got.shape == want.shape == (grids.prod(-1).sum() // 4, cfg.vision.hidden_size)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------- logits


def _case(cfg, name, case):
    if case == "one image":
        return request(cfg, [3, ("image", IMAGE[name]), 5], 1)
    if case == "two images of different sizes":
        return request(cfg, [2, ("image", IMAGE[name]), 3, ("image", OTHER_IMAGE[name]), 4], 2)
    if case == "time-scaled video":
        return request(cfg, [4, ("video", VIDEO[name]), 3], 3, SECONDS[name])
    if case == "left-padded image row + video row":
        return batch_of(cfg, [request(cfg, [2, ("image", IMAGE[name]), 9], 4),
                              request(cfg, [1, ("video", VIDEO[name]), 2], 5, SECONDS[name])])
    raise KeyError(case)


LOGIT_CASES = ["one image", "two images of different sizes", "time-scaled video", "left-padded image row + video row"]


@pytest.mark.parametrize("name", ["A", "B"])
@pytest.mark.parametrize("case", LOGIT_CASES)
def test_logits_equal_transformers(name, case):
    cfg, model, params = reference(name)
    batch = _case(cfg, name, case)
    if "video_grid_thw" in batch:  # the case is one where both text rules agree, and the time scaling matters
        released, _ = released_rope_index(cfg, batch)
        real = batch["attention_mask"].astype(bool)
        np.testing.assert_array_equal(torch_rope_index(model, cfg, batch)[:, real], released[:, real])
        assert not np.array_equal(released_rope_index(cfg, batch, time_step=1.0)[0], released)
    want = torch_logits(model, cfg, batch)
    got = _logits(cfg, params, batch)
    real = batch["attention_mask"].astype(bool)
    assert got.shape == want.shape
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


def test_time_beyond_the_spatial_extent_follows_the_released_rule_not_transformers():
    """A video of 4 frame-pairs × 2×2 merged units at 4/3 time step: its time positions reach start + 4 while its
    sides reach start + 1. The released rule continues the text after it at max + 1 = start + 5; transformers 5.24
    continues at start + max(h', w') = start + 2. Positions: ours = the released rule, and differ from transformers'
    exactly on the text after the video. Logits: ours = transformers' given the released positions."""
    from qwen2vl_jax.rope import get_rope_index

    cfg, model, params = reference("A")
    batch = batch_of(cfg, [request(cfg, [2, ("image", IMAGE["A"]), 3], 6),
                           request(cfg, [3, ("video", (4, 4, 4)), 4], 7, SECONDS["A"])])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ours, deltas = get_rope_index(ids, mask, batch["image_grid_thw"], batch["video_grid_thw"],
                                  image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                                  spatial_merge_size=2, second_per_grid_ts=batch["second_per_grid_ts"],
                                  tokens_per_second=cfg.vision.tokens_per_second)
    released, released_deltas = released_rope_index(cfg, batch)
    real = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(ours)[:, real], released[:, real])
    np.testing.assert_array_equal(np.asarray(deltas).reshape(-1), released_deltas)
    theirs = torch_rope_index(model, cfg, batch)
    after_video = np.zeros_like(real)
    last = np.flatnonzero(ids[1] == cfg.video_token_id)[-1]
    after_video[1, last + 1:] = True
    differs = (np.asarray(ours) != theirs).any(0) & real
    np.testing.assert_array_equal(differs, after_video)
    start = int(released[0, 1, np.flatnonzero(ids[1] == cfg.video_token_id)[0]])
    assert released[:, 1, last + 1].tolist() == [start + 5] * 3 and theirs[:, 1, last + 1].tolist() == [start + 2] * 3
    want = torch_logits(model, cfg, batch, position_ids=released)
    got = _logits(cfg, params, batch)
    np.testing.assert_allclose(got[real], want[real], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name", ["A", "B"])
def test_greedy_generate_equals_transformers_per_row(name):
    cfg, model, params = reference(name)
    rows = [request(cfg, [2, ("image", IMAGE[name]), 5], 8), request(cfg, [7], 9),
            request(cfg, [1, ("video", VIDEO[name]), 3], 10, SECONDS[name])]
    new = 6
    ours = generate(cfg, params, batch_of(cfg, rows), max_new_tokens=new, eos_token_ids=[])
    assert ours.shape == (len(rows), new) and ours.dtype == np.int32
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(ours[i], transformers_generate(model, cfg, row, new), err_msg=f"row {i}")
    if name == "B":  # the tied model A mostly repeats one token; B's untied answers vary, so they check every step
        assert max(len(set(row.tolist())) for row in ours) >= 5


# ---------------------------------------------------------------------------------------------------- conversion


def test_conversion_round_trip_is_bit_identical(tmp_path):
    import qwen2vl_jax
    from safetensors.numpy import load_file

    from qwen2vl_jax.checkpoint.convert import main
    from qwen2vl_jax.checkpoint.mapping import expected_torch_names, param_to_torch

    cfg, model, params = reference("B")
    model.save_pretrained(tmp_path / "hf")
    main(["--hf-dir", str(tmp_path / "hf"), "--out", str(tmp_path / "ox")])
    main(["--to-hf", "--orbax-dir", str(tmp_path / "ox"), "--out", str(tmp_path / "back")])
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert Qwen2VLConfig.from_hf(tmp_path / "back") == Qwen2VLConfig.from_hf(tmp_path / "hf") == cfg
    read = lambda folder: {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}
    before, after = read(tmp_path / "hf"), read(tmp_path / "back")
    assert sorted(after) == sorted(before) == sorted(expected_torch_names(cfg))
    for key, value in before.items():
        assert after[key].dtype == value.dtype and after[key].shape == value.shape, key
        np.testing.assert_array_equal(after[key].view(np.uint8), value.view(np.uint8), err_msg=key)
    # the converted Orbax folder loads as the same config and params
    loaded_cfg, loaded = qwen2vl_jax.load(tmp_path / "ox")
    assert loaded_cfg == cfg
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, params)

    # param_to_torch, leaf by leaf, gives every on-disk tensor back
    def leaves(tree, path=()):
        for key, value in tree.items():
            yield from leaves(value, path + (key,)) if isinstance(value, dict) else [(path + (key,), value)]

    names = set()
    for path, leaf in leaves(params):
        name, array = param_to_torch(path, np.asarray(leaf), cfg)
        np.testing.assert_array_equal(np.ascontiguousarray(array).view(np.uint8), before[name].view(np.uint8),
                                      err_msg=name)
        names.add(name)
    assert names == set(before)
    # transformers reads the exported folder back as the same model
    exported = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    batch = _case(cfg, "B", "one image")
    np.testing.assert_array_equal(torch_logits(exported, cfg, batch), torch_logits(model, cfg, batch))


# ---------------------------------------------------------------------------------------------------- sharded ViT


def test_packed_vit_per_batch_shard_on_8_devices_equals_one_device():
    """8 rows over fsdp=8: each batch shard's images / video packed (in window order) as its own ViT sequence, one
    shard without any; the logits equal one device's single packed sequence (which equals transformers')."""
    from qwen2vl_jax import prepare_inputs
    from qwen2vl_jax.inputs import gather_vision_pixels
    from sharding.mesh import make_mesh
    from sharding.rules import axis_rules, batch_shard_count, param_shardings

    assert len(jax.devices()) == 8, "conftest asks XLA for 8 CPU devices"
    cfg, model, params = reference("B")
    pieces = [[1, ("image", IMAGE["B"]), 2], [3, ("image", (1, 8, 8)), 1], [2, ("image", (1, 6, 10)), 2], [6],
              [1, ("image", (1, 4, 12)), 3], [2, ("video", VIDEO["B"]), 1], [1, ("image", (1, 10, 6)), 4],
              [2, ("image", IMAGE["B"]), 1, ("image", (1, 4, 4)), 1]]
    batch = batch_of(cfg, [request(cfg, p, 20 + i, SECONDS["B"]) for i, p in enumerate(pieces)])
    one = _logits(cfg, params, batch)
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(one[real], torch_logits(model, cfg, batch)[real], atol=1e-4, rtol=0)
    mesh = make_mesh("fsdp=8")
    shards = batch_shard_count(mesh)
    assert shards == 8
    prepared = prepare_inputs(cfg, batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                              batch["video_grid_thw"], image_rows=len(batch["pixel_values"]),
                              video_rows=len(batch["pixel_values_videos"]), vision_shards=shards,
                              second_per_grid_ts=batch["second_per_grid_ts"])
    assert prepared["vision_pos_hw"].shape[0] == prepared["vision_segment_ids"].shape[0] == shards
    vision = gather_vision_pixels(np.concatenate([batch["pixel_values"], batch["pixel_values_videos"]]),
                                  prepared.pop("vision_rows"))
    forward = jax.jit(lambda p, ids, prep, px: Qwen2VL(cfg).apply({"params": p}, ids, prep, px,
                                                                   method=Qwen2VL.forward))
    with jax.set_mesh(mesh), axis_rules(mesh):
        sharded = jax.device_put(params, param_shardings(cfg, mesh))
        eight = np.asarray(forward(sharded, batch["input_ids"], prepared, vision))
    np.testing.assert_allclose(eight[real], one[real], atol=2e-5, rtol=0)

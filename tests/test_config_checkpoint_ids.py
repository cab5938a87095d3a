"""Token ids and generation defaults as transformers 5 saves them (nested text_config ids, generation_config.json),
and `load` placing params on the default device: a saved checkpoint with non-Qwen ids generates what transformers
generates, and loaded params run as fast as params placed by hand."""
import json
import time

import jax
import numpy as np
import pytest
import torch
import transformers

import qwen2vl_jax
from qwen2vl_jax import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl_jax.checkpoint.mapping import params_from_torch
from qwen2vl_jax.config import GenerationDefaults
from reference import CONFIGS, hf_config, make_batch, make_request, reference, transformers_generate
from test_config import RELEASED_2B

# 1,200 tokens; special ids inside it and far from Qwen's, pad ≠ eos ≠ bos
IDS = dict(image_token_id=1150, video_token_id=1151, vision_start_token_id=1148, vision_end_token_id=1149,
           bos_token_id=1147, eos_token_id=1146, pad_token_id=1145)
NAME = "ids1200"
CONFIGS.setdefault(NAME, Qwen2VLConfig(  # registered so that reference(NAME, seed) randomizes it like the others
    vision=VisionConfig(depth=2, embed_dim=48, num_heads=3, mlp_ratio=4.0, hidden_size=96),
    text=TextConfig(vocab_size=1200, hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                    num_key_value_heads=2, mrope_section=(2, 3, 3), tie_word_embeddings=False, rope_theta=10000.0),
    **IDS))
# row 0: two images of different sizes; row 1: a two-frame-pair video. LLM grid t' = 2 ≤ max(h', w') = 4: where
# t' > max(h', w') transformers 5.24 places the text after a video differently (REFERENCE.md, known divergence)
REQUESTS = [[3, ("image", (1, 4, 4)), 2, ("image", (1, 8, 6)), 5], [2, ("video", (2, 6, 8)), 9]]
NEW = 8
# Qwen2-VL-7B-Instruct's generation_config.json as released
RELEASED_7B_GENERATION = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                          "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.1,
                          "top_p": 0.001, "top_k": 1, "transformers_version": "4.37.0"}


def _nested_only(cfg: Qwen2VLConfig) -> transformers.Qwen2VLConfig:
    """The transformers config a user builds: bos/eos/pad inside text_config only."""
    d = cfg.to_hf_dict()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        del d[key]
    return transformers.Qwen2VLConfig(**d)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(our config, transformers model, folder) for the 1,200-token model saved by transformers."""
    cfg, model, _ = reference(NAME, 3)  # seed 3: both rows' answers vary (many seeds repeat one token)
    nested = transformers.Qwen2VLForConditionalGeneration(_nested_only(cfg)).eval()
    nested.load_state_dict(model.state_dict())
    folder = tmp_path_factory.mktemp("ids1200")
    nested.save_pretrained(folder)
    return cfg, nested, folder


def _on_device(params, device):
    leaves = jax.tree_util.tree_leaves(params)
    return all(isinstance(x, jax.Array) and x.committed and x.devices() == {device} for x in leaves)


def test_saved_ids_load_and_greedy_equals_transformers(saved):
    cfg, model, folder = saved
    written = json.loads((folder / "config.json").read_text())
    assert {k: written["text_config"][k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")} == \
        {"bos_token_id": 1147, "eos_token_id": 1146, "pad_token_id": 1145}
    assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & written.keys()  # nested only: as transformers saves
    config, params = qwen2vl_jax.load(folder)
    assert {k: getattr(config, k) for k in IDS} == IDS
    assert config == cfg and config.generation == GenerationDefaults()  # generation_config.json repeats the ids
    assert _on_device(params, jax.devices()[0])
    requests = [make_request(cfg, pieces, i) for i, pieces in enumerate(REQUESTS)]
    batch = make_batch(cfg, requests)
    lengths = [r["input_ids"].shape[1] for r in requests]
    assert lengths[0] != lengths[1] and (batch["attention_mask"][:, 0] == 0).sum() == 1  # one row left padded
    ours = qwen2vl_jax.generate(config, params, batch, max_new_tokens=NEW, eos_token_ids=[])
    assert ours.shape == (2, NEW)
    for i, request in enumerate(requests):
        np.testing.assert_array_equal(ours[i], transformers_generate(model, cfg, request, NEW), err_msg=f"row {i}")
    assert min(len(set(row)) for row in ours) >= 5, "a model repeating one token would hide position errors"


def test_load_places_on_the_scoped_default_device(saved):
    device = jax.devices()[-1]
    with jax.default_device(device):
        _, params = qwen2vl_jax.load(saved[2])
    assert _on_device(params, device)


def test_nested_ids_win_over_top_level():
    d = hf_config(Qwen2VLConfig.preset("tiny")).to_dict()
    d.update(bos_token_id=1, eos_token_id=2, pad_token_id=3, image_token_id=4, video_token_id=5)
    d["text_config"].update(bos_token_id=11, eos_token_id=[12, 13], pad_token_id=None, image_token_id=14)
    config = Qwen2VLConfig.from_hf(d)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (11, 12, 3)  # None: not given
    assert (config.image_token_id, config.video_token_id) == (14, 5)
    assert config.generation == GenerationDefaults(eos_token_ids=(12, 13))
    with pytest.raises(ValueError, match=r"config.json: eos_token_id must be a token id .* got 'x'"):
        Qwen2VLConfig.from_hf({**d, "text_config": {**d["text_config"], "eos_token_id": "x"}})


def test_flat_released_layout_and_its_eos_list(tmp_path):
    assert Qwen2VLConfig.from_hf(RELEASED_2B) == Qwen2VLConfig.preset("2b")
    (tmp_path / "config.json").write_text(json.dumps({**RELEASED_2B, "eos_token_id": [151645, 151643]}))
    config = Qwen2VLConfig.from_hf(tmp_path)  # no generation_config.json: the eos list is config.json's
    assert config.eos_token_id == 151645 and config.generation == GenerationDefaults(eos_token_ids=(151645, 151643))
    assert config.replace(generation=GenerationDefaults()) == Qwen2VLConfig.preset("2b")
    assert "generation" not in config.to_hf_dict() and config.to_hf_dict() == Qwen2VLConfig.preset("2b").to_hf_dict()
    assert len({config, Qwen2VLConfig.preset("2b")}) == 2  # hashable, and the defaults are part of it


def test_released_7b_generation_config_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_2B))
    (tmp_path / "generation_config.json").write_text(json.dumps(RELEASED_7B_GENERATION))
    expected = GenerationDefaults(eos_token_ids=(151645, 151643), pad_token_id=None, temperature=0.1, top_k=1,
                                  top_p=0.001, do_sample=True, repetition_penalty=1.05)  # pad = the config's
    for source in (tmp_path, tmp_path / "config.json"):
        assert Qwen2VLConfig.from_hf(source).generation == expected
    assert expected.sampling() == (0.1, 1, 0.001)
    assert Qwen2VLConfig.from_hf(json.loads((tmp_path / "config.json").read_text())).generation == \
        GenerationDefaults()  # a dict carries no generation_config.json


@pytest.mark.parametrize("kwargs", [
    dict(do_sample=True, temperature=0.7, top_p=0.8, eos_token_id=[7, 8], pad_token_id=9),
    dict(do_sample=True, top_k=5, eos_token_id=7),
    dict(do_sample=True),
    dict(do_sample=False, repetition_penalty=1.2),  # transformers refuses to save temperature etc. without sampling
    dict(pad_token_id=9),
])
def test_generation_config_saved_by_transformers(tmp_path, kwargs):
    tiny = Qwen2VLConfig.preset("tiny")
    (tmp_path / "config.json").write_text(json.dumps(tiny.to_hf_dict()))
    transformers.GenerationConfig(**kwargs).save_pretrained(tmp_path)
    got = Qwen2VLConfig.from_hf(tmp_path).generation
    eos = kwargs.get("eos_token_id", ())
    assert got.eos_token_ids == (tuple(eos) if isinstance(eos, list) else (eos,) if eos else ())
    assert got.pad_token_id == kwargs.get("pad_token_id")
    for key in ("temperature", "top_k", "top_p", "do_sample", "repetition_penalty"):
        assert getattr(got, key) == kwargs.get(key), key
    # what transformers' generate uses when the caller passes nothing: the file, then its global defaults
    hf = transformers.GenerationConfig.from_pretrained(tmp_path)
    hf.update(**transformers.GenerationConfig._get_default_generation_params(), defaults_only=True)
    temperature, top_k, top_p = got.sampling()
    if hf.do_sample:
        assert (temperature, top_k, 1.0 if top_p is None else top_p) == (hf.temperature, hf.top_k, hf.top_p)
    else:
        assert (temperature, top_k, top_p) == (0.0, None, None)


def test_sampling_defaults():
    assert GenerationDefaults().sampling() == (0.0, None, None)
    assert GenerationDefaults(temperature=0.5, top_k=3).sampling() == (0.0, None, None)  # do_sample not given
    assert GenerationDefaults(do_sample=True).sampling() == (1.0, 50, None)
    assert GenerationDefaults(do_sample=True, temperature=0.5, top_k=3, top_p=0.9).sampling() == (0.5, 3, 0.9)
    hash(Qwen2VLConfig(generation=GenerationDefaults(eos_token_ids=(1, 2), temperature=0.5)))


@pytest.mark.parametrize("text,match", [
    ("{\"do_sample\": true,", "is not valid JSON"),
    ("[1, 2]", "holds a list, not a JSON object"),
    ("{\"top_k\": \"1\"}", "top_k must be int, got '1'"),
    ("{\"do_sample\": 1}", "do_sample must be bool"),
    ("{\"eos_token_id\": []}", "eos_token_id must be a token id"),
])
def test_malformed_generation_config_is_named(tmp_path, text, match):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_2B))
    (tmp_path / "generation_config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"generation_config.json.*{match}"):
        Qwen2VLConfig.from_hf(tmp_path)


def test_loaded_params_generate_as_fast_as_params_placed_by_hand(tmp_path):
    """If params were host arrays, every one of the ~NEW dispatches per call would copy the weights again."""
    cfg = Qwen2VLConfig(
        vision=VisionConfig(depth=1, embed_dim=32, num_heads=2, mlp_ratio=2.0, hidden_size=256),
        text=TextConfig(vocab_size=1200, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(8, 12, 12),
                        tie_word_embeddings=False), **IDS)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(hf_config(cfg))
    model.save_pretrained(tmp_path)
    config, loaded = qwen2vl_jax.load(tmp_path)
    by_hand = jax.device_put(params_from_torch({k: v.numpy() for k, v in model.state_dict().items()}, cfg))
    batch = make_batch(cfg, [make_request(cfg, [20, ("image", (1, 4, 4)), 10], 0)])

    def seconds(params):
        start = time.perf_counter()
        out = qwen2vl_jax.generate(config, params, batch, max_new_tokens=NEW, eos_token_ids=[])
        return time.perf_counter() - start, out

    first_loaded, first_hand = seconds(loaded)[1], seconds(by_hand)[1]  # compiles
    np.testing.assert_array_equal(first_loaded, first_hand)
    times = {"loaded": [], "by_hand": []}
    for _ in range(3):  # interleaved, best of 3: a busy 2-core machine slows both alike
        times["loaded"].append(seconds(loaded)[0])
        times["by_hand"].append(seconds(by_hand)[0])
    best = {k: min(v) for k, v in times.items()}
    print(f"\ngenerate {NEW} tokens: loaded {best['loaded'] * 1e3:.1f} ms, by hand {best['by_hand'] * 1e3:.1f} ms")
    assert best["loaded"] <= 1.5 * best["by_hand"], best

"""Presets, Hugging Face config reading, and parameter counts."""
import json

import jax
import numpy as np
import pytest

from qwen2vl_jax import Qwen2VLConfig
from qwen2vl_jax.checkpoint.mapping import param_shapes
from reference import hf_config

# The released Qwen2-VL-2B-Instruct config.json (flat layout), abridged to the fields that matter.
RELEASED_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960, "max_position_embeddings": 32768,
    "max_window_layers": 28, "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def test_released_flat_config_reads_as_the_2b_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_2B))
    assert Qwen2VLConfig.from_hf(tmp_path) == Qwen2VLConfig.preset("2b")


@pytest.mark.parametrize("preset", ["tiny", "2b", "7b", "72b"])
def test_nested_layout_round_trips_through_transformers(preset):
    cfg = Qwen2VLConfig.preset(preset)
    written = hf_config(cfg).to_dict()  # transformers' own nested serialization
    assert Qwen2VLConfig.from_hf(written) == cfg


def test_presets_are_hashable_and_distinct():
    presets = {Qwen2VLConfig.preset(n) for n in ("tiny", "2b", "7b", "72b")}
    assert len(presets) == 4
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        Qwen2VLConfig.preset("huge")


def _param_count(cfg):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(param_shapes(cfg)))


def test_2b_parameter_count_matches_the_released_model():
    assert _param_count(Qwen2VLConfig.preset("2b")) == 2_208_985_600


def test_parameter_counts_match_transformers_for_7b_shapes():
    """transformers on the meta device counts the 7B preset's parameters without allocating them."""
    import torch
    import transformers

    cfg = Qwen2VLConfig.preset("7b")
    with torch.device("meta"):
        model = transformers.Qwen2VLForConditionalGeneration(hf_config(cfg))
    assert _param_count(cfg) == sum(p.numel() for p in model.parameters())


# The released Qwen2.5-VL-7B-Instruct config.json (flat layout), abridged to the fields that matter.
RELEASED_2_5_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 152064,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def test_released_qwen2_5_config_reads_as_its_preset(tmp_path):
    """model_type picks the architecture: vision hidden_size is the ViT width there, out_hidden_size the merger's."""
    (tmp_path / "config.json").write_text(json.dumps(RELEASED_2_5_7B))
    cfg = Qwen2VLConfig.from_hf(tmp_path)
    assert cfg == Qwen2VLConfig.preset("2.5-7b")
    assert (cfg.vision.embed_dim, cfg.vision.hidden_size, cfg.vision.window_units) == (1280, 3584, 4)
    assert [i for i, full in enumerate(cfg.vision.full_attention_blocks) if full] == [7, 15, 23, 31]


@pytest.mark.parametrize("preset", ["2.5-3b", "2.5-7b", "2.5-32b", "2.5-72b"])
def test_qwen2_5_presets_round_trip_through_transformers(preset):
    import transformers

    cfg = Qwen2VLConfig.preset(preset)
    written = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict()).to_dict()
    assert written["model_type"] == "qwen2_5_vl"
    assert Qwen2VLConfig.from_hf(written) == cfg


def test_qwen2_5_parameter_counts_match_transformers():
    import torch
    import transformers

    for preset in ("2.5-3b", "2.5-7b"):
        cfg = Qwen2VLConfig.preset(preset)
        with torch.device("meta"):
            model = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict()))
        assert _param_count(cfg) == sum(p.numel() for p in model.parameters()), preset


def test_other_model_types_are_refused_by_name():
    with pytest.raises(ValueError, match="model_type 'qwen3_vl' is not a Qwen2-VL family model"):
        Qwen2VLConfig.from_hf(dict(RELEASED_2_5_7B, model_type="qwen3_vl"))

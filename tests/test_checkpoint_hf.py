"""Loading transformers-saved folders straight into our params."""
import json

import jax
import numpy as np
import pytest
import torch

import qwen2vl_jax
from reference import reference, torch_logits
from test_model import CASES, logits, make_batch


def _save(model, folder, **kwargs):
    as_bin = kwargs.pop("as_bin", False)
    model.save_pretrained(folder, **kwargs)
    if as_bin:  # transformers 5 only writes safetensors: rewrite as an older checkpoint's pytorch_model.bin
        from safetensors.torch import load_file

        weights = folder / "model.safetensors"
        torch.save(load_file(weights), folder / "pytorch_model.bin")
        weights.unlink()
    return folder


@pytest.mark.parametrize("name,layout", [("tied", "single"), ("untied", "sharded"), ("untied", "bin")])
def test_saved_folder_loads_with_equal_logits(tmp_path, name, layout):
    cfg, model, _ = reference(name)
    kwargs = {"single": {}, "sharded": {"max_shard_size": "100KB"}, "bin": {"as_bin": True}}[layout]
    folder = _save(model, tmp_path, **kwargs)
    files = sorted(p.name for p in tmp_path.iterdir())
    if layout == "sharded":
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    if layout == "bin":
        assert any(f.endswith(".bin") for f in files), files
    config, params = qwen2vl_jax.load(folder)
    assert config == cfg
    batch = make_batch(cfg, CASES["image_and_video"])
    ours = logits(config, params, batch)  # jitted over params and pixels
    np.testing.assert_allclose(ours, torch_logits(model, cfg, batch), atol=1e-4, rtol=0)


def test_bfloat16_folder_keeps_bfloat16_and_scan_layout(tmp_path):
    cfg, model, params32 = reference("untied")
    model16 = type(model)(model.config).to(torch.bfloat16)
    model16.load_state_dict(model.state_dict())
    folder = _save(model16, tmp_path)
    config, params = qwen2vl_jax.load(folder, scan_layers=True)
    leaves = jax.tree_util.tree_leaves(params)
    assert {str(x.dtype) for x in leaves} == {"bfloat16"}
    assert params["language_model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (3, 96, 160)
    np.testing.assert_array_equal(
        np.asarray(params["visual"]["blocks"]["attn"]["qkv"]["kernel"][1], np.float32),
        np.asarray(params32["visual"]["blocks_1"]["attn"]["qkv"]["kernel"]).astype("bfloat16").astype(np.float32))


def test_truncated_safetensors_is_named(tmp_path):
    _, model, _ = reference("tied")
    folder = _save(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file .* truncated"):
        qwen2vl_jax.load(folder)


def test_config_that_disagrees_with_the_weights_is_named(tmp_path):
    _, model, _ = reference("untied")
    folder = _save(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.2"):
        qwen2vl_jax.load(folder)


def test_folder_without_weights_is_named(tmp_path):
    _, model, _ = reference("tied")
    _save(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights in"):
        qwen2vl_jax.load(tmp_path)

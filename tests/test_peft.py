"""PEFT adapter folders (qwen2vl_jax/checkpoint/peft.py): transformers + peft load ours on the matching base and give
our logits, merge_and_unload equals lora.merged, reading is the exact inverse (scanned and unrolled), and the
training export + `qwen2vl-convert --to-hf --adapter` write the folder; Qwen2.5-VL too."""
import copy
import json
import os

import jax
import numpy as np
import peft
import pytest
from flax import linen as nn
from safetensors.numpy import load_file, save_file

from qwen2vl_jax import lora
from qwen2vl_jax.checkpoint.convert import main
from qwen2vl_jax.checkpoint.mapping import canonical_name, param_to_torch, stack_layers
from qwen2vl_jax.checkpoint.peft import ADAPTER_DIR, read_peft_adapter, write_peft_adapter
from qwen2vl_jax.model import abstract_params
from qwen2vl_jax.processing.fixtures import write_tiny_processor
from reference import reference, torch_logits
from test_model import CASES, logits, make_batch
from training.export import export_params

# decoder q/k/v/o + MLP, the untied lm_head, the ViT's qkv and the merger's first Linear (either layout)
TARGETS = (lora.DECODER_TARGETS + r"|^language_model/lm_head$|^visual/blocks(_\d+)?/attn/qkv$"
           r"|^visual/merger/mlp_0$")


@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
    """(LoRA config (unrolled), base params, adapters with A and B random, their PEFT folder, transformers logits
    of the peft model, the peft model merged)."""
    cfg, model, params = reference("untied")
    config = cfg.replace(lora=lora.LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets=TARGETS))
    rng = np.random.default_rng(3)
    adapters = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32),
                            lora.split(nn.unbox(abstract_params(config)))[1])
    folder = write_peft_adapter(tmp_path_factory.mktemp("peft") / "adapter", config, adapters, "random-untied")
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    batch = make_batch(cfg, CASES["image_and_video"])
    expected = torch_logits(hf, cfg, batch)
    merged = {canonical_name(k): v.numpy() for k, v in hf.merge_and_unload().state_dict().items()}
    return config, params, adapters, folder, batch, expected, merged


def test_folder_holds_peft_names_and_config(adapted):
    config, _, adapters, folder, *_ = adapted
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    a = tensors["base_model.model.model.language_model.layers.2.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.language_model.layers.2.self_attn.q_proj.lora_B.weight"]
    assert a.shape == (4, 96) and b.shape == (6 * 16, 4) and a.dtype == np.float32
    assert tensors["base_model.model.model.visual.blocks.1.attn.qkv.lora_B.weight"].shape == (3 * 48, 4)
    assert tensors["base_model.model.model.visual.merger.mlp.0.lora_A.weight"].shape == (4, 192)
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (512, 4)
    # the whole o_proj adapter [heads, head_dim, r] → [r, heads·head_dim]: the kernel's in dims flatten row-major
    o_a = adapters["language_model"]["layers_0"]["self_attn"]["o_proj"]["lora_a"]
    np.testing.assert_array_equal(
        tensors["base_model.model.model.language_model.layers.0.self_attn.o_proj.lora_A.weight"],
        o_a.reshape(-1, 4).T)
    assert len(tensors) == 2 * (3 * 7 + 3 + 1 + 1)
    settings = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert settings["peft_type"] == "LORA" and settings["r"] == 4 and settings["lora_alpha"] == 8.0
    assert settings["base_model_name_or_path"] == "random-untied"
    assert len(settings["target_modules"]) == len(tensors) // 2
    assert "model.visual.merger.mlp.0" in settings["target_modules"]


@pytest.mark.parametrize("scan", [False, True])
def test_peft_model_gives_our_logits(adapted, scan):
    """Our model with config.lora (unrolled, and scanned with the adapters read back from the folder) = transformers
    + peft on the same folder, float32 at 1e-4; and the adapter moves the logits (B is not zero)."""
    config, params, adapters, folder, batch, expected, _ = adapted
    if scan:
        config = config.replace(scan_layers=True)
        adapters, _ = read_peft_adapter(folder, config)
        params = stack_layers(params, config)
    ours = logits(config, lora.merge_trees(params, adapters), batch)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    base = logits(config.replace(lora=None), params, batch)
    assert np.abs(base - expected).max() > 0.1


def test_merge_and_unload_equals_lora_merged(adapted):
    config, params, adapters, _, _, _, merged = adapted
    ours = lora.merged(config, lora.merge_trees(params, adapters))
    checked = 0
    for key, value in jax.tree_util.tree_leaves_with_path(ours):
        name, torch_value = param_to_torch(tuple(k.key for k in key), np.asarray(value), config)
        np.testing.assert_allclose(torch_value, merged[name], atol=1e-5, rtol=1e-5, err_msg=name)
        checked += 1
    assert checked == len(merged)


@pytest.mark.parametrize("scan", [False, True])
def test_read_is_the_exact_inverse(adapted, tmp_path, scan):
    config, _, adapters, folder, *_ = adapted
    read, lora_config = read_peft_adapter(folder, config.replace(scan_layers=scan))
    want = stack_layers(adapters, config) if scan else adapters
    assert jax.tree.structure(read) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, read, want)
    assert (lora_config.rank, lora_config.alpha, lora_config.dropout) == (4, 8.0, 0.05)
    # the targets regex picks the same modules in both layouts
    for layout in (False, True):
        mine, theirs = (lora.split(nn.unbox(abstract_params(c.replace(scan_layers=layout))))[1]
                        for c in (config.replace(lora=lora_config), config))
        assert jax.tree.structure(mine) == jax.tree.structure(theirs)
    # written again from the read tree (scanned or not): the same tensors
    again = write_peft_adapter(tmp_path / "again", config.replace(lora=lora_config, scan_layers=scan), read)
    first, second = (load_file(os.path.join(f, "adapter_model.safetensors")) for f in (folder, again))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_partial_layers_and_bad_files_are_named(adapted, tmp_path):
    config, _, _, folder, *_ = adapted
    tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
    partial = tmp_path / "partial"
    partial.mkdir()
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.q_proj" not in k},
              str(partial / "adapter_model.safetensors"))
    (partial / "adapter_config.json").write_text(open(os.path.join(folder, "adapter_config.json")).read())
    read, lora_config = read_peft_adapter(partial, config)  # unrolled: layer 1's q_proj simply has none
    assert "q_proj" not in read["language_model"]["layers_1"]["self_attn"]
    assert lora_config.matches("language_model/layers_0/self_attn/q_proj")
    assert not lora_config.matches("language_model/layers_1/self_attn/q_proj")
    with pytest.raises(ValueError, match="scan_layers=False"):
        read_peft_adapter(partial, config.replace(scan_layers=True))
    settings = json.loads((partial / "adapter_config.json").read_text()) | {"use_dora": True}
    (partial / "adapter_config.json").write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="adapter_config.json uses use_dora"):
        read_peft_adapter(partial, config)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft_adapter(tmp_path, config)


def test_export_and_convert_write_the_adapter(adapted, tmp_path):
    """training.export.export_params on a scanned LoRA model writes export/adapter/ (the same tensors as the
    unrolled writer) beside the merged weights; `qwen2vl-convert --to-hf --adapter` turns it into a PEFT folder,
    without --adapter into full weights equal to peft's merge_and_unload; an export without LoRA is named."""
    config, params, adapters, folder, _, _, merged = adapted
    scanned = config.replace(scan_layers=True)
    tokenizer = write_tiny_processor(tmp_path / "tok")
    full = jax.device_put(lora.merge_trees(stack_layers(params, scanned), stack_layers(adapters, scanned)))
    export = export_params(str(tmp_path / "export"), scanned, full, str(tokenizer))
    assert sorted(os.listdir(os.path.join(export, ADAPTER_DIR))) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]
    main(["--to-hf", "--adapter", "--orbax-dir", export, "--out", str(tmp_path / "peft")])
    files = sorted(os.listdir(tmp_path / "peft"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "tokenizer.json" in files
    assert "config.json" not in files
    first, second = (load_file(os.path.join(f, "adapter_model.safetensors")) for f in (folder, tmp_path / "peft"))
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    main(["--to-hf", "--orbax-dir", export, "--out", str(tmp_path / "merged")])
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert weights.keys() == merged.keys()
    for name in weights:
        np.testing.assert_allclose(weights[name], merged[name], atol=1e-5, rtol=1e-5, err_msg=name)
    plain = export_params(str(tmp_path / "plain"), config.replace(lora=None), params, None)
    with pytest.raises(FileNotFoundError, match=f"{plain}/adapter holds no PEFT adapter"):
        main(["--to-hf", "--adapter", "--orbax-dir", plain, "--out", str(tmp_path / "none")])
    assert not os.path.exists(tmp_path / "none")


def test_torch_is_not_imported_by_the_library():
    import subprocess
    import sys
    code = ("import sys, qwen2vl_jax.checkpoint.peft, qwen2vl_jax.checkpoint.convert, training.export; "
            "sys.exit(('torch' in sys.modules) + 2 * ('peft' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], env=os.environ | {"JAX_PLATFORMS": "cpu"}).returncode == 0


def test_qwen2_5_vl_adapter_with_vision_mlp_targets(tmp_path):
    """Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration, SwiGLU ViT MLP, windowed attention): an adapter over the decoder
    and the ViT's gate/up/down projections loads with peft and gives our logits."""
    import test_qwen2_5_vl as q25

    cfg, model, params = q25.reference("B")
    targets = lora.DECODER_TARGETS + r"|^visual/blocks(_\d+)?/(attn/proj|mlp/(gate|up|down)_proj)$"
    config = cfg.replace(lora=lora.LoraConfig(rank=3, alpha=5.0, targets=targets))
    rng = np.random.default_rng(4)
    adapters = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(np.float32),
                            lora.split(nn.unbox(abstract_params(config)))[1])
    folder = write_peft_adapter(tmp_path / "adapter", config, adapters)
    assert "base_model.model.model.visual.blocks.2.mlp.gate_proj.lora_A.weight" in load_file(
        os.path.join(folder, "adapter_model.safetensors"))
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(model), folder).eval()
    batch = q25._case(cfg, "B", "one image")
    np.testing.assert_allclose(q25._logits(config, lora.merge_trees(params, adapters), batch),
                               q25.torch_logits(hf, cfg, batch), atol=1e-4, rtol=1e-4)

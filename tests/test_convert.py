"""qwen2vl-convert both ways, loading converted folders (in memory and onto a mesh of 8 CPU devices), bad inputs."""
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from PIL import Image
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import qwen2vl_jax
from qwen2vl_jax import Qwen2VLConfig
from qwen2vl_jax.checkpoint import lazy, orbax_files
from qwen2vl_jax.checkpoint.convert import hf_to_orbax, main, orbax_to_hf
from qwen2vl_jax.checkpoint.hf import iter_tensors
from qwen2vl_jax.processing import Processor
from qwen2vl_jax.processing.fixtures import write_tiny_processor
from reference import reference, torch_logits
from test_checkpoint_hf import _save
from test_model import CASES, logits, make_batch

LAYOUTS = {"single": {}, "sharded": {"max_shard_size": "100KB"}, "bin": {"as_bin": True}}


def _logits(config, params, batch):
    return logits(config, params, batch)  # jitted over params and pixels (test_model.logits)


def _tensors(folder) -> dict[str, np.ndarray]:
    return {name: np.array(array) for name, array in iter_tensors(str(folder))}


@pytest.mark.parametrize("name,layout,scan", [("tied", "single", False), ("untied", "sharded", True),
                                              ("untied", "bin", False)])
def test_converted_folder_loads_with_torch_logits(tmp_path, name, layout, scan):
    cfg, model, _ = reference(name)
    hf = _save(model, tmp_path / "hf", **LAYOUTS[layout])
    write_tiny_processor(hf)  # tokenizer and processor files travel with the weights
    hf_to_orbax(str(hf), str(tmp_path / "ox"), scan_layers=scan)
    files = sorted(os.listdir(tmp_path / "ox"))
    assert files == ["chat_template.json", "config.json", "generation_config.json", "params",
                     "preprocessor_config.json", "qwen2vl_jax.json", "tokenizer.json"]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), np.uint8))
    inputs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it?"}]}]
    served, original = (Processor.from_pretrained(f)(inputs, images=[image]) for f in (tmp_path / "ox", hf))
    assert served.keys() == original.keys()
    for key in served:
        np.testing.assert_array_equal(served[key], original[key])
    config, params = qwen2vl_jax.load(tmp_path / "ox")
    assert config == cfg.replace(scan_layers=scan)
    assert ("layers" in params["language_model"]) == scan
    batch = make_batch(cfg, CASES["image_and_video"])
    np.testing.assert_allclose(_logits(config, params, batch), torch_logits(model, cfg, batch), atol=1e-4, rtol=0)
    # the other layout on request, same numbers
    config2, params2 = qwen2vl_jax.load(tmp_path / "ox", scan_layers=not scan)
    assert config2.scan_layers == (not scan)
    np.testing.assert_allclose(_logits(config2, params2, batch), _logits(config, params, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_identical_and_transformers_loads_it(tmp_path, dtype):
    cfg, model, _ = reference("untied")
    model = type(model)(model.config).to(dtype)
    model.load_state_dict(reference("untied")[1].state_dict())
    hf = _save(model, tmp_path / "hf", max_shard_size="300KB")
    hf_to_orbax(str(hf), str(tmp_path / "ox"), scan_layers=True)
    stats = orbax_to_hf(str(tmp_path / "ox"), str(tmp_path / "back"), max_shard_bytes=400_000)
    assert stats["files"] > 1 and (tmp_path / "back" / "model.safetensors.index.json").exists()
    assert all(f.stat().st_size <= 400_000 + 20_000 for f in (tmp_path / "back").glob("*.safetensors"))
    before, after = _tensors(hf), _tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype and before[key].shape == after[key].shape, key
        np.testing.assert_array_equal(before[key].view(np.uint8), after[key].view(np.uint8), err_msg=key)
    assert Qwen2VLConfig.from_hf(tmp_path / "back") == Qwen2VLConfig.from_hf(hf)
    with safe_open(str(next((tmp_path / "back").glob("*.safetensors"))), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}  # the safetensors package reads our writer's files
    exported, original = (type(model).from_pretrained(folder).eval().float() for folder in (tmp_path / "back", hf))
    batch = make_batch(cfg, CASES["image_and_video"])
    np.testing.assert_array_equal(torch_logits(exported, cfg, batch), torch_logits(original, cfg, batch))


def test_cast_to_bfloat16_updates_config_and_params(tmp_path):
    cfg, model, params32 = reference("tied")
    hf = _save(model, tmp_path / "hf")
    main(["--hf-dir", str(hf), "--out", str(tmp_path / "ox"), "--dtype", "bfloat16"])
    assert json.loads((tmp_path / "ox" / "config.json").read_text())["dtype"] == "bfloat16"
    config, params = qwen2vl_jax.load(tmp_path / "ox")
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(params)} == {"bfloat16"}
    np.testing.assert_array_equal(params["language_model"]["embed_tokens"],
                                  params32["language_model"]["embed_tokens"].astype(ml_dtypes.bfloat16))
    main(["--to-hf", "--orbax-dir", str(tmp_path / "ox"), "--out", str(tmp_path / "back")])
    assert {str(a.dtype) for a in _tensors(tmp_path / "back").values()} == {"bfloat16"}


def test_blockwise_writer_chunks_one_layer_at_a_time(tmp_path):
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(0)
    layers = [rng.standard_normal((40, 30)).astype(np.float32) for _ in range(3)]
    wide = rng.standard_normal((50, 20)).astype(ml_dtypes.bfloat16)
    tree = {"stacked": lazy.stacked([lazy.from_array(x.T) for x in layers]), "wide": lazy.from_array(wide)}
    assert tree["stacked"].chunk_shape(1000) == (1, 6, 40)  # within one layer: 6 rows of 160 bytes
    written = []
    orbax_files.save(tmp_path / "ckpt", tree, on_written=written.append, block_bytes=1000)
    assert len(written) == 3 * 5 + 2 and sum(written) == 3 * 40 * 30 * 4 + wide.nbytes
    restored = ocp.PyTreeCheckpointer().restore(tmp_path / "ckpt")  # a plain Orbax checkpoint
    np.testing.assert_array_equal(restored["stacked"], np.stack([x.T for x in layers]))
    np.testing.assert_array_equal(restored["wide"], wide)
    lazily = orbax_files.open_arrays(tmp_path / "ckpt")
    np.testing.assert_array_equal(lazily["stacked"][1:3, 5:9], np.stack([x.T for x in layers])[1:3, 5:9])


def _mesh(fsdp, tensor):
    return jax.make_mesh((fsdp, tensor), ("fsdp", "tensor"), devices=jax.devices()[:fsdp * tensor],
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)


@pytest.mark.parametrize("source", ["orbax", "hf"])
def test_load_onto_a_mesh_of_8_devices(tmp_path, source):
    assert len(jax.devices()) == 8, "conftest asks XLA for 8 CPU devices"
    cfg, model, _ = reference("tied")
    hf = _save(model, tmp_path / "hf")
    folder = hf
    if source == "orbax":
        hf_to_orbax(str(hf), str(tmp_path / "ox"))
        folder = tmp_path / "ox"
    batch = make_batch(cfg, CASES["image_and_video"])
    config, single = qwen2vl_jax.load(folder)
    expected = _logits(config, single, batch)
    mesh = _mesh(4, 2)
    config, params = qwen2vl_jax.load(folder, mesh=mesh)
    lm, vis = params["language_model"], params["visual"]
    specs = {
        "embed_tokens": (lm["embed_tokens"], P("tensor", "fsdp"), (256, 16)),
        "q_proj": (lm["layers_0"]["self_attn"]["q_proj"]["kernel"], P("fsdp", "tensor", None), (16, 2, 16)),
        "k_proj": (lm["layers_1"]["self_attn"]["k_proj"]["kernel"], P("fsdp", "tensor", None), (16, 1, 16)),
        "o_proj": (lm["layers_1"]["self_attn"]["o_proj"]["kernel"], P("tensor", None, "fsdp"), (2, 16, 16)),
        "down_proj": (lm["layers_0"]["mlp"]["down_proj"]["kernel"], P("tensor", "fsdp"), (64, 16)),
        "fc1": (vis["blocks_1"]["mlp"]["fc1"]["kernel"], P("fsdp", "tensor"), (16, 64)),
        "qkv": (vis["blocks_0"]["attn"]["qkv"]["kernel"], P("fsdp", None, "tensor", None), (16, 3, 2, 16)),
    }
    for name, (array, spec, shard_shape) in specs.items():
        assert array.sharding.spec == spec, name
        assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, name  # no full copy per device
    with jax.set_mesh(mesh):
        sharded = _logits(config, params, batch)
    np.testing.assert_allclose(sharded, expected, atol=1e-5, rtol=0)


def test_kv_heads_fewer_than_the_tensor_axis_are_replicated(tmp_path):
    cfg, model, _ = reference("tied")  # 2 kv heads, 4 query heads
    config, params = qwen2vl_jax.load(_save(model, tmp_path / "hf"), mesh=_mesh(2, 4))
    attention = params["language_model"]["layers_0"]["self_attn"]
    assert attention["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert attention["k_proj"]["kernel"].sharding.spec == P("fsdp", None, None)
    batch = make_batch(cfg, CASES["one_image"])
    np.testing.assert_allclose(_logits(config, params, batch), torch_logits(model, cfg, batch), atol=1e-4, rtol=0)


def _broken(tmp_path, edit) -> str:
    _, model, _ = reference("untied")
    hf = _save(model, tmp_path / "hf")
    weights = load_file(hf / "model.safetensors")
    edit(weights)
    save_file(weights, hf / "model.safetensors")
    return str(hf)


@pytest.mark.parametrize("edit,message", [
    (lambda w: w.pop("model.layers.1.mlp.up_proj.weight"), r"missing \['model.layers.1.mlp.up_proj.weight'\]"),
    (lambda w: w.update({"visual.extra.weight": np.zeros(3, np.float32)}), r"unexpected \['visual.extra.weight'\]"),
    (lambda w: w.update({"model.layers.0.mlp.gate_proj.weight": np.zeros((160, 95), np.float32)}),
     r"model.layers.0.mlp.gate_proj.weight: expected \(160, 96\)"),
    (lambda w: w.update({"model.norm.weight": np.zeros(96, np.int64)}), r"model.norm.weight has dtype int64"),
])
def test_bad_checkpoints_are_named_and_leave_nothing_at_out(tmp_path, edit, message):
    hf = _broken(tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        hf_to_orbax(hf, str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_truncated_file_is_named_and_leaves_nothing_at_out(tmp_path):
    _, model, _ = reference("tied")
    hf = _save(model, tmp_path / "hf")
    weights = hf / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors is not a readable safetensors file .* truncated"):
        main(["--hf-dir", str(hf), "--out", str(tmp_path / "out")])
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_failure_while_writing_removes_the_temporary_folder(tmp_path, monkeypatch):
    _, model, _ = reference("tied")
    hf = _save(model, tmp_path / "hf")

    def fail(*args, **kwargs):
        os.makedirs(args[0], exist_ok=True)  # something was written
        raise OSError("disk full")

    monkeypatch.setattr(orbax_files, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        hf_to_orbax(str(hf), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_existing_out_and_wrong_folders_are_refused(tmp_path):
    _, model, _ = reference("tied")
    hf = _save(model, tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken exists"):
        hf_to_orbax(str(hf), str(tmp_path / "taken"))
    with pytest.raises(ValueError, match="has no qwen2vl_jax.json"):
        orbax_to_hf(str(hf), str(tmp_path / "back"))
    with pytest.raises(SystemExit):
        main(["--to-hf", "--hf-dir", str(hf), "--out", str(tmp_path / "x")])


def test_config_that_disagrees_with_converted_weights_is_named(tmp_path):
    _, model, _ = reference("untied")
    hf_to_orbax(str(_save(model, tmp_path / "hf")), str(tmp_path / "ox"))
    config = json.loads((tmp_path / "ox" / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2
    (tmp_path / "ox" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not match its config.json: missing \[\], unexpected "
                                         r"\[\"\['language_model'\]\['layers_2'\]"):
        qwen2vl_jax.load(tmp_path / "ox")

"""The torch ↔ params name and layout mapping."""
import numpy as np
import pytest

from qwen2vl_jax.checkpoint.mapping import canonical_name, param_to_torch, params_from_torch, torch_to_param
from reference import reference


def _flatten(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + (key,))
        else:
            yield prefix + (key,), value


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_every_tensor_round_trips(name):
    cfg, model, params = reference(name)
    state = {canonical_name(k): v.detach().numpy() for k, v in model.state_dict().items()}
    if cfg.text.tie_word_embeddings:
        state.pop("lm_head.weight")
    back = dict(param_to_torch(path, value, cfg) for path, value in _flatten(params))
    assert sorted(back) == sorted(state)
    for key, value in state.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_in_memory_names_are_accepted():
    cfg, _, _ = reference("tied")
    path, value = torch_to_param("model.language_model.layers.1.self_attn.q_proj.weight",
                                 np.zeros((64, 64), np.float32), cfg)
    assert path == ("language_model", "layers_1", "self_attn", "q_proj", "kernel") and value.shape == (64, 4, 16)


def test_missing_and_unexpected_tensors_are_named():
    cfg, model, _ = reference("tied")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    state.pop("model.visual.blocks.1.mlp.fc2.bias")
    state["model.visual.extra.weight"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"missing \['visual.blocks.1.mlp.fc2.bias'\].*unexpected "
                                         r"\['model.visual.extra.weight'\]"):
        params_from_torch(state, cfg)


def test_wrong_shapes_are_named():
    cfg, model, _ = reference("untied")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    state["model.language_model.layers.0.mlp.up_proj.weight"] = np.zeros((150, 96), np.float32)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight: expected \(160, 96\)"):
        params_from_torch(state, cfg)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    state["model.language_model.layers.1.self_attn.q_proj.weight"] = np.zeros((95, 96), np.float32)
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \(95, 96\), which does not fit"):
        params_from_torch(state, cfg)


def test_a_config_with_fewer_layers_than_the_weights_is_named():
    cfg, model, _ = reference("untied")
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    fewer = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"unexpected \['model.language_model.layers.2"):
        params_from_torch(state, fewer)

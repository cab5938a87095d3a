"""lora.train_also: parameters trained in full beside the LoRA adapters (PEFT's modules_to_save)."""
import numpy as np
import pytest

from training.param_groups import adapters_only


def _scales():
    one = lambda: np.float32(1)
    return {"language_model": {
        "embed_tokens": {"embedding": one()},
        "norm": {"scale": one()},
        "layers": {"self_attn": {"q_proj": {"kernel": np.ones(3, np.float32), "lora_a": np.ones(3, np.float32),
                                            "lora_b": np.ones(3, np.float32)}}}}}  # stacked: 3 layers


def test_adapters_only_by_default():
    kept = adapters_only(_scales())
    lm = kept["language_model"]
    assert lm["embed_tokens"]["embedding"] == 0 and lm["norm"]["scale"] == 0
    q = lm["layers"]["self_attn"]["q_proj"]
    assert (q["kernel"] == 0).all() and (q["lora_a"] == 1).all() and (q["lora_b"] == 1).all()


def test_train_also_keeps_the_matched_parameters_and_layers():
    kept = adapters_only(_scales(), "embed_tokens|layers_1/self_attn/q_proj/kernel")
    lm = kept["language_model"]
    assert lm["embed_tokens"]["embedding"] == 1 and lm["norm"]["scale"] == 0
    assert lm["layers"]["self_attn"]["q_proj"]["kernel"].tolist() == [0, 1, 0]  # one layer of the stack


def test_train_also_errors_name_the_field():
    with pytest.raises(ValueError, match="lora.train_also 'embed_token\\$' matches no parameter"):
        adapters_only(_scales(), "embed_token$")
    with pytest.raises(ValueError, match=r"lora.train_also '\(' is not a regex"):
        adapters_only(_scales(), "(")

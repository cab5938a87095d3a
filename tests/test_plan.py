"""The AOT memory planner: parameter counts against the closed form, and its byte accounting against XLA's."""
import pytest

from qwen2vl_jax import Qwen2VLConfig
from sharding.plan import _report, analytic_param_count, plan


@pytest.mark.parametrize("preset,billions", [("tiny", None), ("2b", 2.208985600), ("7b", None), ("72b", None)])
def test_analytic_parameter_count_equals_the_model(preset, billions):
    result = plan(preset, "fsdp=4,tensor=2", batch=8, seq=512, compile=False)
    assert result["param_count"] == result["analytic_param_count"] == analytic_param_count(
        Qwen2VLConfig.preset(preset))
    assert result["params_bytes"] == 4 * result["param_count"]  # float32 master params
    if billions:
        assert result["param_count"] == round(billions * 1e9)
    # nearly everything is split 8 ways; what is not (norms, biases, odd sizes) is small
    assert result["params_bytes"] / 8 <= result["params_per_device"] <= 1.02 * result["params_bytes"] / 8
    assert result["opt_state_per_device"] == pytest.approx(2 * result["params_per_device"], abs=64)


def test_compiled_plan_accounts_for_every_argument_byte():
    result = plan("tiny", "fsdp=4,tensor=2", batch=8, seq=256, patches_per_sample=64)
    xla = result["xla"]
    # + step (int32) + rng (uint32[2]); − 1: apply_if_finite's bool `last_finite` is never read, so jit drops it;
    # − labels int32[8, 256] over 4 batch shards: with the LM head on loss_index positions the step never reads them
    ours = result["params_per_device"] + result["opt_state_per_device"] + result["batch_per_device"] + 4 + 8 - 1 \
        - 8 * 256 * 4 // 4
    assert xla["arguments"] == ours
    assert xla["aliased"] >= result["params_per_device"] + result["opt_state_per_device"]  # donated state
    assert result["peak_per_device"] > xla["arguments"] and xla["temporaries"] > 0
    text = _report(result, 16e9)
    assert "fits" in text and "optimizer state" in text

"""The generation memory planner (`python -m sharding.plan --generate`): its compiled bytes against the closed form."""
import dataclasses
import importlib.util

import pytest

from qwen2vl_jax import Qwen2VLConfig
from sharding.plan import main
from sharding.plan_generate import analytic_cache_bytes, plan_generate, report


def _small(preset: str, layers: int = 2, vision_depth: int = 2) -> Qwen2VLConfig:
    config = Qwen2VLConfig.preset(preset)
    return config.replace(text=dataclasses.replace(config.text, num_hidden_layers=layers),
                          vision=dataclasses.replace(config.vision, depth=vision_depth))


def _check(result: dict, padding: float = 0.0) -> None:
    """The compiled programs hold the bytes the analytic accounting says (+ `padding`: XLA:TPU's tiled layouts)."""
    prefill, decode, cache = result["prefill"], result["decode"], result["analytic_cache"]
    # the KV cache: what decode aliases (its donated cache) is the closed form, split over batch shards × tensor
    assert result["cache_per_device"] == pytest.approx(cache["per_device"], rel=0.01)
    assert decode["aliased"] == pytest.approx(cache["per_device"], rel=0.01)
    assert prefill["outputs"] >= result["cache_per_device"]  # + first token, kv_valid, seen
    # prefill reads every parameter: its arguments are the sharded params + inputs + controls (less the controls it
    # never reads: eos ids and max_new_tokens, a few bytes)
    ours = result["params_per_device"] + result["inputs_per_device"] + result["controls_bytes"]
    assert ours - 64 <= prefill["arguments"] <= ours * (1 + padding)
    # nearly every parameter is split over tensor; what is not (norms, biases) is small
    ideal = result["analytic_params_per_device"]
    assert ideal <= result["params_per_device"] <= 1.03 * ideal
    assert result["peak_per_device"] >= result["params_per_device"] + result["cache_per_device"]


def test_generation_plan_matches_the_analytic_bytes():
    """2B (2 decoder layers, 2 ViT blocks) on tensor=2 × data=4: Hkv=2 splits over tensor, the batch over data."""
    config = _small("2b")
    result = plan_generate("2b", "tensor=2,data=4", batch=8, seq=200, max_new_tokens=32, patches_per_sample=64,
                           config=config)
    assert result["batch_shards"] == 4 and result["shapes"]["cache"] == 2048
    t = config.text
    assert result["analytic_cache"]["per_device"] == 2 * 2 * 8 * t.num_key_value_heads * 2048 * t.head_dim * 2 / 8
    _check(result)
    text = report(result, 16e9)
    assert "fits" in text and "NOT" not in text and "KV cache" in text and "decode" in text
    assert "does NOT fit" in report(result, result["peak_per_device"] - 1)


def test_cache_replicated_over_tensor_when_it_does_not_divide_the_kv_heads():
    """2 KV heads on tensor=4: the cache (like the k/v weights) stays whole on every tensor shard."""
    cache = analytic_cache_bytes(Qwen2VLConfig.preset("2b"), 8, 2048, {"tensor": 4, "data": 2}, 2)
    assert cache["heads_split"] == 1 and cache["per_device"] == cache["total"] / 2


def test_cli_generate(capsys, tmp_path):
    result = main(["--generate", "--preset", "tiny", "--mesh", "tensor=2,data=4", "--batch", "8", "--seq", "200",
                   "--max-new-tokens", "32", "--patches-per-sample", "64", "--hbm", "1M",
                   "--json", str(tmp_path / "plan.json")])
    out = capsys.readouterr().out
    assert "generation plan (XLA:CPU)" in out and "does NOT fit" in out and (tmp_path / "plan.json").exists()
    _check(result)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="XLA:TPU compile needs libtpu")
def test_tpu_topology_compile():
    """XLA:TPU (libtpu, no chip) for a v5e 2×2 slice: the same accounting, TPU buffer assignment (at XLA's lowest
    execution-time effort: the same buffers to the tolerance checked, a third of the compile time)."""
    result = plan_generate("tiny", "tensor=2,data=2", batch=8, seq=200, max_new_tokens=32, patches_per_sample=64,
                           topology="v5e:2x2", compiler_options={"exec_time_optimization_effort": -1})
    assert result["compiler"] == "XLA:TPU v5e:2x2" and result["devices"] == 4
    _check(result, padding=0.05)

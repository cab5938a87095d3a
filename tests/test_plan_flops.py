"""The planner's FLOPs, collectives and MFU ceiling (sharding/flops.py, sharding/hlo_stats.py) on the tiny preset."""
import json

import pytest

from qwen2vl_jax import Qwen2VLConfig
from sharding import flops
from sharding.plan import HBM, abstract_batch, main


def test_abstract_batch_is_packed_per_shard_and_selects_head_positions():
    config = Qwen2VLConfig.preset("tiny")
    batch = abstract_batch(config, 8, 256, 64, shards=4)
    assert batch["vision_pixels"].shape == (4, 128, config.vision.patch_dim)
    assert batch["prepared"]["vision_pos_hw"].shape == (4, 128, 2)
    assert batch["prepared"]["vision_segment_ids"].shape == (4, 128)
    assert batch["prepared"]["position_ids"].shape == (3, 8, 256)
    assert batch["loss_index"].shape == batch["loss_targets"].shape == (8, 32)
    assert "loss_index" not in abstract_batch(config, 8, 256, 64, shards=4, head_fraction=0)
    with pytest.raises(ValueError, match="batch shards"):
        abstract_batch(config, 6, 256, 64, shards=4)


def test_model_flops_formula():
    config = Qwen2VLConfig.preset("2b")
    f = flops.model_flops(config, batch=16, seq=2048, patches_per_sample=1024, head_positions=16 * 256)
    t = config.text
    # the decoder's matmul weights are the non-embedding parameters less biases and norms: ~1.3 B for 2B
    assert 1.2e9 < f["text"] / (6 * 16 * 2048) < 1.4e9
    assert f["head"] == 6 * t.vocab_size * t.hidden_size * 16 * 256
    assert f["total"] == pytest.approx(sum(v for k, v in f.items() if k != "total"))
    assert flops.hardware_flops(f, "full") > flops.hardware_flops(f, "dots") == pytest.approx(f["total"])
    ceiling = flops.mfu_ceiling(1e12, 4 / 3 * 1e12, 0.0, "v5e")
    assert ceiling["mfu_not_overlapped"] == pytest.approx(0.75) == ceiling["mfu_overlapped"]
    ceiling = flops.mfu_ceiling(1e12, 1e12, 200e9 * 1e12 / 197e12, "v5e")  # collectives as long as compute
    assert ceiling["mfu_not_overlapped"] == pytest.approx(0.5) and ceiling["mfu_overlapped"] == pytest.approx(1)
    assert {chip: spec["hbm"] for chip, spec in flops.CHIPS.items()} == HBM


def test_planner_reports_flops_collectives_and_mfu(tmp_path, capsys):
    out = tmp_path / "plan.json"
    result = main(["--preset", "tiny", "--mesh", "fsdp=4,tensor=2", "--batch", "8", "--seq", "256",
                   "--patches-per-sample", "64", "--chip", "v5e", "--compiler", "cpu", "--json", str(out)])
    text = capsys.readouterr().out
    assert text.startswith("XLA:CPU") and "overstate a TPU's memory" in text  # --compiler cpu: XLA:CPU, said loudly
    assert result["hbm"] == 16e9 and "HBM 16 GB per device" in text  # --chip sets the HBM
    assert "MFU ceiling on v5e" in text and "all-gather" in text and "model FLOPs" in text
    assert json.loads(out.read_text())["chip"] == "v5e"
    assert result["head_positions"] == 8 * 32
    # the executed matmuls XLA compiled agree with the analytic count (dense attention below 512 rows computes
    # the whole L², not the causal half; the head's and embedding's gathers are not dots)
    dots = result["hlo_dot_flops"]
    assert dots["flops_in_unknown_loops"] == 0
    assert 0.8 < dots["flops"] / result["hardware_flops_per_device"] < 1.6
    c = result["collectives"]
    assert c["all-gather"]["count"] > 0 and c["all-reduce"]["count"] > 0  # fsdp gathers, tensor-parallel sums
    assert all(t["executions"] is not None and t["executions"] >= t["count"] for t in c.values())
    assert result["wire_bytes_per_device"] > 0
    # the ViT runs per batch shard and each shard splices its own features: no collective in the splice (the old
    # one-sequence layout replicated the merged features to every device first)
    assert result["splice_bytes_per_device"] == 0 and "vision features spliced across devices: 0.000 MB" in text
    assert 0 < result["mfu"]["mfu_not_overlapped"] <= result["mfu"]["mfu_overlapped"] <= 0.75
    # nothing gathers a float activation: no all-gather of a [B, L, ...] or [V, ...] array (weights are gathered by
    # design; the int32 token ids are, by the embedding lookup's gather)
    for gather in result["all_gathers"]:
        for array in gather["arrays"]:
            dtype, dims = array[:-1].split("[")
            dims = tuple(int(d) for d in dims.split(",") if d)
            if dtype.startswith(("f", "bf")):
                assert dims[:2] != (8, 256) and dims[:1] != (8 * 64,) and dims[:2] != (4, 8 * 64 // 4), gather

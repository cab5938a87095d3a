"""XLA:TPU plans (sharding/topology.py): `--topology` for the train step, and XLA:TPU by default when `--chip` names a
TPU and libtpu is installed; the tiny preset (2 text layers) on a compile-only v5e 2×4 slice."""
import importlib.util
import json

import pytest

from sharding.plan import main
from sharding.topology import choose_compiler, default_topology, topology_shape

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="XLA:TPU compile needs libtpu (pip install -e '.[tpu-plan]')")
TINY = ["--preset", "tiny", "--mesh", "fsdp=4,tensor=2", "--batch", "8", "--seq", "256", "--patches-per-sample", "64"]


def test_topology_shapes():
    assert [topology_shape("v5e", n) for n in (2, 4, 8, 16, 128)] == [None, "2x2", "2x4", "4x4", "8x16"]
    assert [topology_shape("v5p", n) for n in (4, 8, 16, 64, 128)] == ["2x2x1", "2x2x2", "2x2x4", "4x4x4", "4x4x8"]
    assert topology_shape("v6e", 6) is None


def test_cpu_unless_a_tpu_is_named_or_cpu_is_forced():
    assert choose_compiler(None, None, "auto", 8).label == "XLA:CPU"
    assert choose_compiler("v5e", None, "cpu", 8).label == "XLA:CPU"
    assert choose_compiler("v5e", "v5e:2x4", "cpu", 8).label == "XLA:CPU"  # the escape hatch wins
    assert choose_compiler(None, "v5e:2x4", "auto", 8).label == "XLA:TPU v5e:2x4"
    with pytest.raises(ValueError, match="--compiler tpu needs"):
        choose_compiler(None, None, "tpu", 8)


@needs_libtpu
def test_default_topologies_libtpu_accepts():
    assert default_topology("v5e", 8) == "v5e:2x4" and default_topology("v5p", 8) == "v5p:2x2x2"
    assert default_topology("v5p", 64) == "v5p:4x4x4" and default_topology("v5p", 128) == "v5p:4x4x8"
    assert choose_compiler("v5e", None, "auto", 8).label == "XLA:TPU v5e:2x4"
    assert choose_compiler("v5e", None, "auto", 2).label == "XLA:CPU"  # no v5e slice of 2 chips: falls back
    with pytest.raises(ValueError, match="no v5e slice has 2 devices"):
        choose_compiler("v5e", None, "tpu", 2)


@pytest.fixture(scope="module")
def tpu_plans(tmp_path_factory):
    """The tiny train step planned twice: `--topology v5e:2x4`, and `--chip v5e` with the default topology."""
    out = tmp_path_factory.mktemp("plans")
    plans = {}
    for name, flags in {"topology": ["--topology", "v5e:2x4", "--hbm", "16G"], "default": ["--chip", "v5e"]}.items():
        plans[name] = main(TINY + flags + ["--json", str(out / f"{name}.json")])
        plans[name + "_json"] = json.loads((out / f"{name}.json").read_text())
    return plans


@needs_libtpu
def test_topology_and_default_agree(tpu_plans, capsys):
    by_topology, by_default = tpu_plans["topology"], tpu_plans["default"]
    assert by_topology["compiler"] == by_default["compiler"] == "XLA:TPU v5e:2x4"
    assert tpu_plans["default_json"]["compiler"] == "XLA:TPU v5e:2x4"  # recorded in the JSON
    assert by_topology["peak_per_device"] == by_default["peak_per_device"] > 0
    assert by_topology["xla"] == by_default["xla"]
    assert by_topology["hlo_dot_flops"] == by_default["hlo_dot_flops"]


@needs_libtpu
def test_tpu_plan_counts_flops_and_collectives(tpu_plans):
    result = tpu_plans["default"]
    dots = result["hlo_dot_flops"]
    assert dots["flops_in_unknown_loops"] == 0  # XLA:TPU's loops: trip counts read from their counters
    # the compiled matmuls (convolutions on TPU) against the analytic count of what the step executes; the
    # attention's, where a Pallas kernel runs it, are not among them
    assert 0.7 < dots["flops"] / result["hardware_flops_per_device"] < 1.3
    c = result["collectives"]
    assert c["all-gather"]["count"] > 0 and c["all-reduce"]["count"] > 0
    assert all(t["executions"] is not None for t in c.values())
    assert result["mfu"]["mfu_not_overlapped"] > 0


@needs_libtpu
def test_report_names_the_compiler_first(tpu_plans, capsys):
    from sharding.plan import _report

    text = _report(tpu_plans["default"] | {"compiler_reason": ""}, 16e9)
    assert text.splitlines()[0] == "XLA:TPU v5e:2x4" and "overstate" not in text
    assert "XLA:TPU cost_analysis()" in text

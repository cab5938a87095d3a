"""The kill soak, short (bench/soak.py has the long one): `qwen2vl-train` (data.workers=2, packing) killed 5 times —
kill -9 of its process group, SIGTERM, and kill -9 during a checkpoint save, each at least once — and `qwen2vl-eval`
killed 3 times, each restarted with the same command until it finishes with exactly what an uninterrupted run gives."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import soak  # noqa: E402
import soak_eval  # noqa: E402


def failed_runs(result: dict) -> str:
    """Each failed run's problems, the stacks a stalled run's processes dumped, and its log tail."""
    def stacks(run):
        return "".join(f"\n  {p['process'][:120]}" + "".join(
            f"\n    {s['threads']} thread(s): " + " <- ".join(f.split("/")[-1] for f in s['frames'][:6])
            for s in p["stacks"]) for p in run.get("stall_stacks", []))
    return "\n\n".join(f"run {r['run']} ({r['kind']}): {r['problems']}{stacks(r)}\n{r.get('log_tail', '')}"
                         for r in result.get("runs", []) if not r["ok"])


def test_train_killed_5_times_ends_bit_identical_to_an_uninterrupted_run(tmp_path):
    result = soak.train_soak(str(tmp_path), kills=5, seed=0, steps=40, checkpoint_every=3, workers=2, pack=True,
                             max_stalls=1)
    assert "runs" in result, f"an uninterrupted run failed: {result}"
    assert result["references_agree"]["equal"], result["references_agree"]  # the comparison means something
    assert result["metrics"]["distinct_data_crc"] == 40
    assert result["stalls"] == 0, failed_runs(result)
    assert not result["failures"], failed_runs(result)
    kills = result["kills"]
    assert kills["tried"] == kills["survived"] == 5, kills
    assert all(kills["by_kind"][kind]["tried"] >= 1 for kind in soak.KINDS), kills
    # kill -9 during a save hit a save in progress (a temporary folder) or one just committed
    assert all(soak.TMP_MARK in entry or entry.isdigit() for entry in kills["ckpt_entries"]), kills
    assert any(step > 0 for _, step in kills["landed_after_step"]), kills  # not every kill landed in the startup
    first = result["time_to_first_step_s"]["resumes"]
    assert first["n"] >= 1 and first["max"] <= soak.FIRST_STEP_S, result["time_to_first_step_s"]
    metrics = result["metrics"]
    assert metrics["equal"], metrics["mismatches"]
    assert metrics["relogged_records"] > 0  # steps after a checkpoint were run twice, with the same loss and batch
    final = result["final"]
    assert final["state"]["equal"] and final["data_state"]["equal"], final
    assert final["export"]["equal"], final["export"]
    assert final["state"]["bytes"] > 10_000_000 and final["export"]["params"]["bytes"] > 1_000_000, final
    assert result["passed"]


def test_eval_killed_3_times_writes_the_uninterrupted_file(tmp_path):
    result = soak_eval.eval_soak(str(tmp_path), kills=3, seed=0, samples=80)
    assert "runs" in result, f"an uninterrupted run failed: {result}"
    assert result["references_agree"]
    assert not result["failures"], failed_runs(result)
    kills = result["kills"]
    assert kills["tried"] == kills["survived"] == 3 and kills["finished_before_signal"] == 0, kills
    assert kills["inside_output"] >= 1, kills  # a kill landed after the run had written lines
    output = result["output"]
    assert output["equal_bytes"], output
    assert (output["lines"], output["duplicated"], output["lost"], output["error_lines"]) == (82, 0, [], 2), output
    assert output["summary_equal"] and not output["leftover_parts"], output
    assert result["passed"]

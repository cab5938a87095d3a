"""lmms-eval through our adapter vs qwen2vl-eval and a direct generate_many call, on the same samples.

    pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3
    python bench/eval_lmms.py [--samples 32]          # tiny random checkpoint, 8 fake CPU devices, batch 8

The samples: a parquet file of N images + questions, read by lmms-eval through the local task of
tests/test_lmms_eval.py and by qwen2vl-eval as `parquet:` with the `exact` task. Warm runs (the 2nd of 3).
Writes bench/results/lmms_eval.json."""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

BATCH, NEW_TOKENS = 8, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=32)
    n = parser.parse_args().samples
    import pyarrow as pa
    import pyarrow.parquet as pq
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    import test_lmms_eval as lmms_test
    from evaluation.lmms.model import Qwen2VLJax
    from evaluation.runner import evaluate_tasks
    from reference import tiny_checkpoint

    tmp = tempfile.mkdtemp()
    os.environ["HF_HOME"] = os.path.join(tmp, "hf")
    checkpoint = tiny_checkpoint(os.path.join(tmp, "ckpt"))

    def png(i):
        buffer = io.BytesIO()
        lmms_test.picture(i, (56, 56 + 28 * (i % 3))).save(buffer, format="PNG")
        return buffer.getvalue()

    data = os.path.join(tmp, "tiny.parquet")
    pq.write_table(pa.table({"question": [f"What is in picture {i}?" for i in range(n)],
                             "image": [png(i) for i in range(n)], "answer": ["cat"] * n}), data)
    tasks = os.path.join(tmp, "tasks")
    os.makedirs(tasks)
    with open(os.path.join(tasks, f"{lmms_test.TASK}.yaml"), "w") as f:
        f.write(lmms_test.TASK_YAML.format(task=lmms_test.TASK, parquet=data)
                .replace("max_new_tokens: 5", f"max_new_tokens: {NEW_TOKENS}"))
    with open(os.path.join(tasks, "utils.py"), "w") as f:
        f.write(lmms_test.TASK_UTILS)

    lm = Qwen2VLJax.create_from_arg_string(f"checkpoint={checkpoint},mesh=data=-1,batch_size={BATCH},compile_cache=")
    manager = TaskManager("ERROR", include_path=tasks)
    lmms_walls, adapter = [], []
    for _ in range(3):
        start = time.perf_counter()
        evaluator.simple_evaluate(model=lm, tasks=[lmms_test.TASK], task_manager=manager, verbosity="ERROR")
        lmms_walls.append(time.perf_counter() - start)
        adapter.append(lm.generator.last_stats["seconds"])

    jobs = [("exact", "parquet:" + data, os.path.join(tmp, f"ours{k}.jsonl")) for k in range(3)]
    start = time.perf_counter()
    summaries = evaluate_tasks(checkpoint, jobs, batch_size=BATCH, max_new_tokens=NEW_TOKENS, chunk=n)
    ours_total = time.perf_counter() - start
    result = {
        "samples": n, "batch_size": BATCH, "max_new_tokens": NEW_TOKENS, "devices": 8,
        "lmms_eval_run_s": [round(w, 3) for w in lmms_walls],
        "lmms_eval_samples_per_s": n / lmms_walls[1],
        "adapter_generate_until_s": [round(a, 3) for a in adapter],
        "adapter_samples_per_s": n / adapter[1],
        "qwen2vl_eval_samples_per_s": [s["samples_per_s"] for s in summaries],
        "qwen2vl_eval_total_s_incl_model_load": round(ours_total, 2),
    }
    result["qwen2vl_eval_vs_lmms_eval"] = result["qwen2vl_eval_samples_per_s"][1] / result["lmms_eval_samples_per_s"]
    print(json.dumps(result, indent=2))
    out = os.path.join(ROOT, "bench", "results", "lmms_eval.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", out)


if __name__ == "__main__":
    main()

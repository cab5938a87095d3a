"""Qwen2-VL-72B LoRA fine-tuning on the smallest TPU slice the planner fits it on: PLAN_72B_SLICE.

    qwen2vl-train --config configs/qwen2vl_72b_lora.py --workdir gs://BUCKET/runs/72b-lora \\
        --config.init_from=gs://BUCKET/qwen2vl-72b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

PLAN_72B"""
from configs.common import base


def get_config():
    c = base()
    c.mesh = "fsdp=8"
    c.chip = "v5e"
    c.model.preset = "72b"
    c.lora.update(dict(rank=16, alpha=32.0, base_dtype="int8"))
    c.data.update(dict(batch_size=8))
    c.optim.update(dict(learning_rate=1e-4, warmup_steps=50, weight_decay=0.0))
    c.steps = 2000
    return c

"""Qwen2-VL-7B LoRA fine-tuning on one TPU v5e-8 host (8 chips × 16 GB): rank-16 adapters on the decoder's q/k/v/o
and MLP projections, the frozen base stored in int8.

    qwen2vl-train --config configs/qwen2vl_7b_lora_v5e8.py --workdir gs://BUCKET/runs/7b-lora \\
        --config.init_from=gs://BUCKET/qwen2vl-7b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 7b --mesh fsdp=8 --batch 16 --seq 2048 --chip v5e --lora-rank 16
--lora-base int8: XLA:TPU for v5e:2x4 with libtpu, splash attention, 28 layers): PLAN_7B"""
from configs.common import base


def get_config():
    c = base()
    c.mesh = "fsdp=8"
    c.chip = "v5e"  # --check plans the step for this chip
    c.model.preset = "7b"
    c.lora.update(dict(rank=16, alpha=32.0, base_dtype="int8"))
    c.optim.update(dict(learning_rate=1e-4, warmup_steps=50, weight_decay=0.0))
    c.steps = 2000
    return c

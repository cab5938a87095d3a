"""Qwen2-VL-7B, everything trainable (stage 2), on one TPU v5p-8 host (4 chips × 95 GB).

    qwen2vl-train --config configs/qwen2vl_7b_v5p8.py --workdir gs://BUCKET/runs/7b \\
        --config.init_from=gs://BUCKET/qwen2vl-7b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 7b --mesh fsdp=4 --batch 16 --seq 2048 --remat full, bench/results/plan/
7b_v5p8.json): 52.0 GB peak per chip of 95 GB."""
from configs.common import base


def get_config():
    c = base()  # its defaults are this plan's: remat full, scan, bf16 compute, fp32 params, 16 × ≤ 2048 tokens
    c.mesh = "fsdp=4"
    c.model.preset = "7b"
    c.steps = 10000
    return c

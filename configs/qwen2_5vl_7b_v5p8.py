"""Qwen2.5-VL-7B, everything trainable, on one TPU v5p-8 host (4 chips × 95 GB).

    qwen2vl-train --config configs/qwen2_5vl_7b_v5p8.py --workdir gs://BUCKET/runs/2.5-7b \\
        --config.init_from=gs://BUCKET/qwen2.5vl-7b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 2.5-7b --mesh fsdp=4 --batch 16 --seq 2048 --remat full --hbm 95G,
bench/results/plan/2.5-7b_v5p8.json): 46.2 GB peak per chip of 95 GB."""
from configs.common import base


def get_config():
    c = base()  # its defaults are this plan's: remat full, scan, bf16 compute, fp32 params, 16 × ≤ 2048 tokens
    c.mesh = "fsdp=4"
    c.model.preset = "2.5-7b"
    c.steps = 10000
    return c

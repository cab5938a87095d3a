"""Qwen2-VL-2B, everything trainable (stage 2), on one TPU v5e-8 host (8 × 16 GB).

    qwen2vl-train --config configs/qwen2vl_2b_v5e8.py --workdir gs://BUCKET/runs/2b \\
        --config.init_from=gs://BUCKET/qwen2vl-2b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 2b --mesh fsdp=8 --batch 16 --seq 2048 --remat full, bench/results/plan/
2b_v5e8.json): 12.9 GB peak per chip of 16 GB, fp32 master params + AdamW state sharded 8 ways, bf16 compute."""
from configs.common import base


def get_config():
    c = base()  # its defaults are this plan's: remat full, scan, bf16 compute, fp32 params, 16 × ≤ 2048 tokens
    c.mesh = "fsdp=8"
    c.model.preset = "2b"
    c.steps = 10000
    return c

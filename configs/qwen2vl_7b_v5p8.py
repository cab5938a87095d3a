"""Qwen2-VL-7B, everything trainable (stage 2), on one TPU v5p-8 host (4 chips × 95 GB).

    qwen2vl-train --config configs/qwen2vl_7b_v5p8.py --workdir gs://BUCKET/runs/7b \\
        --config.init_from=gs://BUCKET/qwen2vl-7b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 7b --mesh fsdp=4 --batch 16 --seq 2048 --remat full --chip v5p: XLA:TPU for
v5p:2x2x1 with libtpu, splash attention, 28 layers; bench/results/plan/7b_v5p8.json): 52.2 GB peak per chip of
95 GB. Per chip per step: 352 TFLOP model FLOPs (465 executed with remat), 48.9 GB sent in collectives (all-gather
24.0, all-reduce 24.9), MFU ceiling 70 % not overlapped / 76 % fully overlapped. XLA:CPU figures of the same step
(--compiler cpu, 7b_v5p8_cpu.json): 46.2 GB peak (XLA:CPU understates this one), 96.1 GB sent, 65 % / 76 %."""
from configs.common import base


def get_config():
    c = base()  # its defaults are this plan's: remat full, scan, bf16 compute, fp32 params, 16 × ≤ 2048 tokens
    c.mesh = "fsdp=4"
    c.model.preset = "7b"
    c.steps = 10000
    return c

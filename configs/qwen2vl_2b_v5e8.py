"""Qwen2-VL-2B, everything trainable (stage 2), on one TPU v5e-8 host (8 × 16 GB).

    qwen2vl-train --config configs/qwen2vl_2b_v5e8.py --workdir gs://BUCKET/runs/2b \\
        --config.init_from=gs://BUCKET/qwen2vl-2b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 2b --mesh fsdp=8 --batch 16 --seq 2048 --remat full --chip v5e: XLA:TPU for
v5e:2x4 with libtpu, splash attention, 28 layers; bench/results/plan/2b_v5e8.json): 9.7 GB peak per chip of 16 GB,
fp32 master params + AdamW state sharded 8 ways, bf16 compute. Per chip per step: 44 TFLOP model FLOPs (58 executed
with remat), 16.9 GB sent in collectives (all-gather 5.0, all-reduce 1.8, collective-permute 10.1: XLA:TPU's ring
for the weights' gathers and gradient reduce-scatters), MFU ceiling 59 % not overlapped / 76 % fully overlapped.
XLA:CPU figures of the same step (--compiler cpu, 2b_v5e8_cpu.json): 9.3 GB peak, 32.4 GB sent, 49 % / 76 %."""
from configs.common import base


def get_config():
    c = base()  # its defaults are this plan's: remat full, scan, bf16 compute, fp32 params, 16 × ≤ 2048 tokens
    c.mesh = "fsdp=8"
    c.model.preset = "2b"
    c.steps = 10000
    return c

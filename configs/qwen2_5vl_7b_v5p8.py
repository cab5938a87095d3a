"""Qwen2.5-VL-7B, everything trainable, on one TPU v5p-8 host (4 chips × 95 GB).

    qwen2vl-train --config configs/qwen2_5vl_7b_v5p8.py --workdir gs://BUCKET/runs/2.5-7b \\
        --config.init_from=gs://BUCKET/qwen2.5vl-7b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 2.5-7b --mesh fsdp=4 --batch 16 --seq 2048 --remat full --chip v5p: XLA:TPU
for v5p:2x2x1 with libtpu, splash attention, 28 layers; bench/results/plan/2.5-7b_v5p8.json): 50.9 GB peak per chip
of 95 GB. Per chip per step: 350 TFLOP model FLOPs (464 executed), 49.2 GB sent in collectives, MFU ceiling 70 % /
76 %. XLA:CPU (--compiler cpu, 2.5-7b_v5p8_cpu.json): 46.1 GB peak, 96.1 GB sent, 65 % / 76 %."""
from configs.qwen2vl_7b_v5p8 import get_config as qwen2vl_recipe


def get_config():
    c = qwen2vl_recipe()  # the Qwen2-VL recipe for this slice (mesh, stage, batch, buckets, optimizer)
    c.model.preset = "2.5-7b"
    return c

"""Qwen2.5-VL-72B, LLM + merger trainable with the ViT frozen, on a TPU v5p-128 slice (64 chips × 95 GB, 16 hosts:
run the same command on every host, e.g. `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...`).

    qwen2vl-train --config configs/qwen2_5vl_72b_v5p128.py --workdir gs://BUCKET/runs/2.5-72b \\
        --config.init_from=gs://BUCKET/qwen2.5vl-72b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 2.5-72b --mesh fsdp=16,tensor=4 --batch 64 --seq 4096 --remat full --chip v5p:
XLA:TPU for v5p:4x4x4 with libtpu, splash attention, all 80 layers at full width; bench/results/plan/
2.5-72b_v5p128.json): 54.4 GB peak per chip of 95 GB with every group trainable; with the ViT frozen no optimizer
state is kept for it, so it sits a little lower. Per chip per step: 1799 TFLOP model FLOPs (2377 executed), 278 GB
sent in collectives, MFU ceiling 69 % / 76 %. XLA:CPU (--compiler cpu, 2.5-72b_v5p128_cpu.json): 88.1 GB peak,
797 GB sent, 60 % / 76 %."""
from configs.qwen2vl_72b_v5p128 import get_config as qwen2vl_recipe


def get_config():
    c = qwen2vl_recipe()  # the Qwen2-VL recipe for this slice (mesh, stage, batch, buckets, optimizer)
    c.model.preset = "2.5-72b"
    return c

"""Qwen2-VL-72B, LLM + merger trainable with the ViT frozen (stage 3), on a TPU v5p-128 slice (64 chips × 95 GB,
16 hosts: run the same command on every host, e.g. `gcloud compute tpus tpu-vm ssh NAME --worker=all --command=...`).

    qwen2vl-train --config configs/qwen2vl_72b_v5p128.py --workdir gs://BUCKET/runs/72b \\
        --config.init_from=gs://BUCKET/qwen2vl-72b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 72b --mesh fsdp=16,tensor=4 --batch 64 --seq 4096 --remat full --chip v5p:
XLA:TPU for v5p:4x4x4 with libtpu, splash attention, all 80 layers at full width; bench/results/plan/72b_v5p128.json):
54.4 GB peak per chip of 95 GB with every group trainable; stage 3 keeps no optimizer state for the ViT, so it sits a
little lower. Per chip per step: 1800 TFLOP model FLOPs (2378 executed with remat), 278 GB sent in collectives
(all-gather 39.6, tensor-parallel all-reduce 165.3, collective-permute 73.1), MFU ceiling 69 % not overlapped / 76 %
fully overlapped. XLA:CPU figures of the same step (--compiler cpu, 72b_v5p128_cpu.json): 88.1 GB peak, 796 GB sent
(float32 gathers and all-reduces), 60 % / 76 %."""
from configs.common import base


def get_config():
    c = base()
    c.stage = "llm"
    c.mesh = "fsdp=16,tensor=4"
    c.model.preset = "72b"
    c.data.update(dict(batch_size=64, length_buckets=(1024, 2048, 4096), vision_buckets=(16384, 32768, 65536)))
    c.optim.update(dict(learning_rate=5e-6, warmup_steps=200))
    c.steps = 5000
    return c

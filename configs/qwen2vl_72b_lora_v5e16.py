"""Qwen2-VL-72B LoRA fine-tuning on a TPU v5e-16 slice (16 chips × 16 GB, 4 hosts: run the same command on every
host): rank-16 adapters on the decoder's q/k/v/o and MLP projections over a frozen bf16 base.

    qwen2vl-train --config configs/qwen2vl_72b_lora_v5e16.py --workdir gs://BUCKET/runs/72b-lora \\
        --config.init_from=gs://BUCKET/qwen2vl-72b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 72b --mesh fsdp=16 --batch 16 --seq 2048 --chip v5e --lora-rank 16
--lora-base bfloat16: XLA:TPU for v5e:4x4 with libtpu, splash attention, all 80 layers; bench/results/plan/
72b_v5e16_lora.json): 14.76 GB peak per chip of 16 GB (9.23 GB of bf16 base, 0.11 GB adapter moments), 790 TFLOP
per chip per step in the compiled dots. The smallest slice the planner fits the step on is a v5e-8 with the base in
int8 (--lora-base int8 --mesh fsdp=8 --batch 8; 72b_v5e8_lora_int8.json): 15.38 GB of 16 (96 %), too close to the
limit to ship (its loading is fine: an int8 base is read and quantized one array at a time, 9.7 GB of int8 plus
the largest bf16 leaf, 4.8 GB per chip); hence v5e-16 here."""
from configs.common import base


def get_config():
    c = base()
    c.mesh = "fsdp=16"
    c.chip = "v5e"
    c.model.preset = "72b"
    c.lora.update(dict(rank=16, alpha=32.0, base_dtype="bfloat16"))
    c.optim.update(dict(learning_rate=1e-4, warmup_steps=50, weight_decay=0.0))
    c.steps = 2000
    return c

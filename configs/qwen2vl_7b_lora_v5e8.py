"""Qwen2-VL-7B LoRA fine-tuning on one TPU v5e-8 host (8 chips × 16 GB): rank-16 adapters on the decoder's q/k/v/o
and MLP projections, the frozen base stored in int8.

    qwen2vl-train --config configs/qwen2vl_7b_lora_v5e8.py --workdir gs://BUCKET/runs/7b-lora \\
        --config.init_from=gs://BUCKET/qwen2vl-7b --config.data.train=jsonl:gs://BUCKET/data/train.jsonl

Fit (python -m sharding.plan --preset 7b --mesh fsdp=8 --batch 16 --seq 2048 --chip v5e --lora-rank 16
--lora-base int8: XLA:TPU for v5e:2x4 with libtpu, splash attention, 28 layers; bench/results/plan/7b_v5e8_lora_int8.json):
5.61 GB peak per chip of 16 GB (1.28 GB params: int8 decoder projections, bf16 rest; 0.04 GB adapter moments). The
same with a bf16 base (7b_v5e8_lora.json): 6.42 GB. Full fine-tuning of the same step does not fit this slice: XLA:TPU
refuses it at 24.52 GB per chip (7b_v5e8_full.json: fp32 params 4.15 + AdamW 8.29 GB per chip). Per chip per step:
150 TFLOP in the compiled dots (7B full fine-tuning, same batch, v5p-8: 419 per chip × 4 = 1676 in all, LoRA 8 × 150 =
1199: no weight gradients), 176 TFLOP by the 6·params·tokens convention. The base is read in bf16 and quantized on
the chips one array at a time."""
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

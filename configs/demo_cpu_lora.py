"""The CPU demo's LoRA variant: rank-8 adapters on a demo checkpoint learn a question type it never saw (colour).

    # 1. the base: the CPU demo without colour questions (shape, count, digit; 1,500 steps)
    qwen2vl-train --config configs/demo_cpu.py --config.data.demo_set.types=shape,count,digit \\
        --workdir /tmp/qwen2vl-demo3
    # 2. LoRA on its export, colour questions only (the base frozen; test split: colour only)
    qwen2vl-train --config configs/demo_cpu_lora.py --config.init_from=/tmp/qwen2vl-demo3/export \\
        --workdir /tmp/qwen2vl-demo-lora

Full fine-tuning on the same data for comparison: add --config.lora.rank=0 --config.optim.learning_rate=1e-3 (the
demo's own rate). Measured numbers: bench/results/demo_lora.json and bench/README.md."""
from configs.demo_cpu import get_config as demo_config


def get_config():
    c = demo_config()
    c.init_from = ""  # required: the base run's WORKDIR/export (it carries the demo tokenizer)
    c.tokenizer = ""  # init_from's
    c.steps = 300
    c.data.demo_set = {"train": 2000, "test": 200, "types": "colour"}
    c.lora.update(dict(rank=8, alpha=16.0, targets="", base_dtype="float32"))  # "": the decoder's projections
    c.optim.update(dict(learning_rate=3e-3, warmup_steps=20, weight_decay=0.0))
    c.checkpoint_every = 100
    return c

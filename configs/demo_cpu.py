"""The CPU demo: a small Qwen2-VL learns the synthetic visual-QA set (colour, shape, count, digit) from scratch.

    qwen2vl-train --config configs/demo_cpu.py --workdir /tmp/qwen2vl-demo

Writes the data set (tfds ArrayRecord) into WORKDIR/data, trains, then evaluates on the held-out split per question
type beside the text-only baseline → WORKDIR/demo_eval.json and WORKDIR/demo.png."""
from configs.common import base


def get_config():
    c = base()
    c.steps = 1500
    c.mesh = "data=-1"
    c.tokenizer = "demo"
    c.model.update(dict(
        preset="tiny", vocab_size=-1,
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=(4, 6, 6)),
        vision=dict(depth=2, embed_dim=128, num_heads=4, hidden_size=128),
        dtype="float32", remat="none", scan_layers=False))
    c.data.update(dict(
        train="tfds:synthetic_vqa:train", eval="tfds:synthetic_vqa:test", demo_set={"train": 6000, "test": 400, "types": ""},
        batch_size=16, length_buckets=(64, 128), vision_buckets=(1024, 2048), pack=False, workers=0,
        max_pixels=140 * 140))
    c.optim.update(dict(learning_rate=1e-3, warmup_steps=50, weight_decay=0.01))
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.demo_eval = True
    return c

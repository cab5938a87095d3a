"""The CPU demo: a small Qwen2-VL learns the synthetic visual-QA set (colour, shape, count, digit) from scratch.

    qwen2vl-train --config configs/demo_cpu.py --workdir /tmp/qwen2vl-demo

Writes the data set (tfds ArrayRecord) into WORKDIR/data, trains, then evaluates on the held-out split per question
type beside the text-only baseline → WORKDIR/demo_eval.json and WORKDIR/demo.png."""
import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 600
    c.stage = "all"  # "vision" | "all" | "llm" (training.step.STAGES)
    c.mesh = "data=-1"  # all local devices along data
    c.dcn_mesh = ""
    c.init_from = ""  # a converted checkpoint folder (qwen2vl-convert), else random init from model.preset
    c.tokenizer = "demo"  # a folder with tokenizer.json + preprocessor_config.json; "demo": the demo's own
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny", vocab_size=-1,  # -1: the tokenizer's size rounded up to 64
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, mrope_section=(4, 6, 6)),
        vision=dict(depth=2, embed_dim=128, num_heads=4, hidden_size=128),
        dtype="float32", param_dtype="float32", remat="none", scan_layers=False, attention="xla"))
    c.data = ml_collections.ConfigDict(dict(
        train="tfds:synthetic_vqa:train", eval="tfds:synthetic_vqa:test", data_dir="",  # "": WORKDIR/data
        demo_set={"train": 6000, "test": 400},  # written when absent
        batch_size=16, length_buckets=(64, 128), vision_buckets=(1024, 2048), pack=False, truncate=True,
        shuffle=True, num_epochs=None, workers=0, min_pixels=56 * 56, max_pixels=112 * 112))
    c.optim = ml_collections.ConfigDict(dict(learning_rate=2e-3, warmup_steps=30, weight_decay=0.01, b1=0.9, b2=0.95,
                                             clip_norm=1.0, grad_accum=1))
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.log_every = 10
    c.max_nonfinite_steps = 50
    c.tensorboard = True
    c.demo_eval = True
    return c

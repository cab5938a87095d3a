"""Every field a training config has, with its default; configs/NAME.py start from `base()` and change a few.

Override any field from the command line: `--config.optim.learning_rate=1e-5`, `--config.data.pack=False`."""
import ml_collections


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.steps = 1000
    c.stage = "all"  # "vision" (ViT + merger) | "all" | "llm" (LLM + merger, ViT frozen): training.step.STAGES
    c.mesh = "fsdp=-1"  # mesh axes within a slice (data, fsdp, tensor, sequence; -1 = the rest of the devices)
    c.chip = ""  # the TPU chip the run is for (v4, v5e, v5p, v6e): --check plans the step's memory on it; "" = none
    c.dcn_mesh = ""  # axes across slices (multi-slice), e.g. "data=2"
    c.init_from = ""  # a converted checkpoint folder (qwen2vl-convert; local or gs://); "" = random init from preset
    c.tokenizer = ""  # folder with tokenizer.json + preprocessor_config.json; "" = init_from's; "demo" = the demo's
    c.model = ml_collections.ConfigDict(dict(
        preset="2b",  # used without init_from
        vocab_size=0,  # 0: the preset's; -1: the tokenizer's size rounded up to 64
        text={}, vision={},  # preset field overrides, e.g. text=dict(num_hidden_layers=2)
        dtype="bfloat16", param_dtype="float32", remat="full", scan_layers=True, attention="auto"))
    c.data = ml_collections.ConfigDict(dict(
        train="", eval="",  # source specs: jsonl:PATH[?root=DIR] | tfds:NAME[:SPLIT] | PATH.jsonl
        data_dir="",  # tfds data_dir; "" = WORKDIR/data
        demo_set={},  # {"train": n, "test": m}: write the synthetic demo set into data_dir when absent
        batch_size=16,  # global batch (rows)
        length_buckets=(512, 1024, 2048),  # tokens per row
        vision_buckets=(4096, 8192, 16384),  # vision patch rows per batch
        loss_fractions=(0.125, 0.5, 1.0),  # LM head on f·B·L positions, the smallest f holding all targets
        pack=True, truncate=True, shuffle=True, num_epochs=None,  # None: repeat forever
        workers=8,  # grain worker processes decoding images (0: in the main process)
        min_pixels=56 * 56, max_pixels=28 * 28 * 1024,  # images
        video_total_pixels=0))  # pixels per video; 0 = the processor's (qwen-vl-utils 0.0.14: 0.9·128000·28²)
    c.optim = ml_collections.ConfigDict(dict(learning_rate=1e-5, warmup_steps=100, weight_decay=0.1, b1=0.9, b2=0.95,
                                             clip_norm=1.0, grad_accum=1, freeze="", lr_multipliers=""))
    # freeze: a regex over parameter paths (e.g. r"visual/blocks_([0-9]|1[0-5])/": the first 16 ViT blocks) on top
    # of the stage; lr_multipliers: "PATTERN=M;PATTERN=M" (e.g. "visual/blocks=0.1;visual/merger=1"), first match
    # wins. Paths and semantics: training/param_groups.py
    c.lora = ml_collections.ConfigDict(dict(
        rank=0,  # > 0: train low-rank adapters only, the base frozen (qwen2vl_jax/lora.py)
        alpha=16.0, dropout=0.0,
        targets="",  # regex over Linear module paths; "" = the decoder's q/k/v/o and MLP projections
        base_dtype="bfloat16",  # the frozen base's storage: "bfloat16" | "float32" | "int8" (the adapted layers)
        train_also=""))  # regex over parameter paths trained in full beside the adapters (PEFT's modules_to_save),
    # e.g. "language_model/embed_tokens": the tied output rows of answer words the base never produced

    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.log_every = 10
    c.max_nonfinite_steps = 50  # stop when the loss stays NaN/inf this long (each such update is skipped)
    c.tensorboard = True
    c.compile_cache = "{workdir}/compile_cache"  # JAX's persistent compilation cache (local or gs://); "" = off
    c.demo_eval = False
    return c

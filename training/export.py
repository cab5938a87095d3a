"""The trained params as a checkpoint folder that `qwen2vl_jax.load`, `qwen2vl-generate`, `qwen2vl-eval` and
`qwen2vl-convert --to-hf` read: WORKDIR/export/ = params/ (Orbax) + qwen2vl_jax.json + config.json (+ the tokenizer
and preprocessor files), the layout `qwen2vl-convert --hf-dir` writes; with LoRA also adapter/, the adapters alone as
a PEFT folder (`qwen2vl-convert --to-hf --adapter`)."""
from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from qwen2vl_jax.checkpoint.convert import FORMAT_VERSION
from qwen2vl_jax.checkpoint.load import FORMAT_FILE, PARAMS_DIR
from qwen2vl_jax.checkpoint.peft import ADAPTER_DIR, write_peft_adapter
from qwen2vl_jax.config import Qwen2VLConfig

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
              "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json", "vocab.json",
              "merges.txt")


def export_params(directory: str, config: Qwen2VLConfig, params, tokenizer_dir: str | None,
                  pixel_bounds: dict | None = None, peft_adapter: bool = True) -> str:
    """Writes `params` (global jax arrays, any sharding; every process calls this) into `directory`, replacing an
    earlier export; `pixel_bounds` ({"min_pixels", "max_pixels"}, the training data's) go into
    preprocessor_config.json, so inference resizes images as training did. With LoRA (config.lora) the folder holds
    the merged weights (W + (alpha/rank)·A·B, in param_dtype) for the base config, and ADAPTER_DIR the adapters
    alone as a PEFT folder (checkpoint/peft.py) unless `peft_adapter` is False (a run that also trained parameters
    in full, lora.train_also: PEFT's modules_to_save, which this writer does not write; the merged weights hold
    them). → directory."""
    adapters, lora_config = None, config
    if config.lora is not None:
        from qwen2vl_jax import lora
        adapters = lora.split(params)[1] if peft_adapter else None
        if adapters is not None and jax.process_count() > 1:  # every process joins the gather; process 0 writes
            from jax.experimental import multihost_utils
            adapters = multihost_utils.process_allgather(adapters, tiled=True)
        elif adapters is not None:
            adapters = jax.tree_util.tree_map(np.asarray, adapters)
        params = jax.jit(lambda p: lora.merged(config, p, config.param_dtype))(params)
        config = config.replace(lora=None)
    out = epath.Path(directory)
    if jax.process_index() == 0 and out.exists():
        out.rmtree()
    if jax.process_count() > 1:  # nobody starts writing before the old export is gone
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("qwen2vl-train: old export removed")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / PARAMS_DIR, params)
    if jax.process_index() == 0:
        dtypes = sorted({np.dtype(x.dtype).name for x in jax.tree_util.tree_leaves(params)})
        (out / FORMAT_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                   "scan_layers": config.scan_layers, "dtypes": dtypes}, indent=2))
        hf = config.to_hf_dict() | {"dtype": dtypes[0] if len(dtypes) == 1 else "float32"}
        (out / "config.json").write_text(json.dumps(hf, indent=2))
        for name in SIDE_FILES if tokenizer_dir else ():
            source = epath.Path(tokenizer_dir) / name
            if source.exists():
                text = source.read_text()
                if name == "preprocessor_config.json" and pixel_bounds:
                    settings = json.loads(text)
                    settings.pop("size", None)  # min/max_pixels win over "size"; keep one source of truth
                    text = json.dumps(settings | {k: int(v) for k, v in pixel_bounds.items() if v}, indent=2)
                (out / name).write_text(text)
        if adapters is not None:
            write_peft_adapter(out / ADAPTER_DIR, lora_config, adapters)
    return str(out)

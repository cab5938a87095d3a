"""qwen2vl-jax: Qwen2-VL in pure-functional Flax Linen.

The config is importable without jax; the network and input layout load on first use, so host-side code
(`qwen2vl_jax.processing`, data workers) stays free of jax."""
import importlib

from qwen2vl_jax.config import Qwen2VLConfig, TextConfig, VisionConfig

_LAZY = {
    "Qwen2VL": "qwen2vl_jax.model",
    "prepare_inputs": "qwen2vl_jax.inputs",
    "get_rope_index": "qwen2vl_jax.rope",
    "load": "qwen2vl_jax.checkpoint.load",
    "generate": "qwen2vl_jax.generation",
}

__all__ = ["Qwen2VLConfig", "TextConfig", "VisionConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwen2vl_jax' has no attribute {name!r}")

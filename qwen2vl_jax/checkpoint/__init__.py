"""Checkpoints: the torch ↔ params mapping (mapping.py) and Hugging Face folder reading (hf.py)."""
from qwen2vl_jax.checkpoint.load import load

__all__ = ["load"]

"""`qwen2vl_jax.load`: params from a Hugging Face folder (config.json + safetensors or .bin)."""
from __future__ import annotations

import os

import jax.numpy as jnp

from qwen2vl_jax.checkpoint.hf import iter_tensors
from qwen2vl_jax.checkpoint.mapping import params_from_torch
from qwen2vl_jax.config import Qwen2VLConfig


def load(path: str | os.PathLike, dtype=None, *, scan_layers: bool = False):
    """→ (config, params) from a Hugging Face folder, streaming tensors one at a time.

    dtype: cast every parameter (e.g. "bfloat16"; the config's dtype/param_dtype follow); None keeps the stored
    dtype for the params and float32 compute."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a folder; pass a Hugging Face model folder (config.json + weights)")
    config = Qwen2VLConfig.from_hf(path).replace(scan_layers=scan_layers)
    if dtype is not None:
        name = jnp.dtype(dtype).name
        config = config.replace(dtype=name, param_dtype=name)
    params = params_from_torch(iter_tensors(path), config, dtype=None if dtype is None else jnp.dtype(dtype))
    return config, params

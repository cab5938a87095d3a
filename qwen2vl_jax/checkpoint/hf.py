"""Reading Hugging Face checkpoint folders lazily: one tensor at a time, memory-mapped where the format allows.

A folder holds config.json and either model.safetensors, shards listed in model.safetensors.index.json, or the
older pytorch_model.bin / pytorch_model-*.bin (+ index), read with torch.load(weights_only=True, mmap=True), never
a bare pickle."""
from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from qwen2vl_jax.checkpoint import safetensors_files

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def weight_files(folder: str) -> list[str]:
    """The weight files of an HF folder, in a stable order; ValueError when there are none."""
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = os.path.join(folder, index_name)
        if os.path.exists(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
            if missing:
                raise ValueError(f"{index} lists shards that are not in {folder}: {missing}")
            return [os.path.join(folder, s) for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
    raise ValueError(f"no weights in {folder!r}: expected model.safetensors, {SAFETENSORS_INDEX}, "
                     f"pytorch_model.bin or {BIN_INDEX}")


def iter_tensors(folder: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) for every tensor of the folder, one file at a time. Arrays are read-only views of memory
    maps (nothing is read until used); bfloat16 comes back as ml_dtypes.bfloat16."""
    for path in weight_files(folder):
        yield from (safetensors_files.read(path) if path.endswith(".safetensors") else _torch_bin(path)).items()


def _torch_bin(path: str) -> dict[str, np.ndarray]:
    import ml_dtypes
    import torch  # the .bin reader is the one runtime place torch is needed

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for damaged archives
        raise ValueError(f"{path} could not be read by torch.load(weights_only=True): {error}") from None
    return {name: tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if tensor.dtype == torch.bfloat16
            else tensor.numpy() for name, tensor in state.items()}

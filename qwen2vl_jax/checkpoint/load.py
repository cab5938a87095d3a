"""`qwen2vl_jax.load`: params from a folder converted by `qwen2vl-convert` (Orbax) or straight from a Hugging Face
folder, onto the default device or placed shard by shard onto a mesh."""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from qwen2vl_jax.checkpoint import lazy, orbax_files
from qwen2vl_jax.checkpoint.hf import iter_tensors
from qwen2vl_jax.checkpoint.mapping import param_shapes, params_from_torch, param_to_torch
from qwen2vl_jax.config import Qwen2VLConfig

PARAMS_DIR = "params"  # the Orbax PyTree checkpoint inside a converted folder
FORMAT_FILE = "qwen2vl_jax.json"  # {"format_version", "scan_layers", "dtype"} beside it


def layer_counts(config: Qwen2VLConfig) -> dict[str, tuple[str, int]]:
    return {"language_model": ("layers", config.text.num_hidden_layers), "visual": ("blocks", config.vision.depth)}


def is_converted(path: str) -> bool:
    return (epath.Path(path) / FORMAT_FILE).exists()


def open_params(path: str, config: Qwen2VLConfig) -> tuple[dict, bool]:
    """The folder's params as a tree of LazyArrays in their stored layout, nothing read yet, names and shapes checked
    against `config`. → (tree, stored scan_layers)."""
    if is_converted(path):
        scan_layers = bool(json.loads((epath.Path(path) / FORMAT_FILE).read_text())["scan_layers"])
        params_dir = path.rstrip("/") + "/" + PARAMS_DIR  # local or gs:// (Orbax reads both)
        tree = orbax_files.open_arrays(params_dir)
        _check_against_config(tree, config, params_dir)
        return tree, scan_layers
    views = params_from_torch(iter_tensors(path), config.replace(scan_layers=False))  # zero-copy, validated
    return jax.tree_util.tree_map(lazy.from_array, views), False


def _check_against_config(tree: dict, config: Qwen2VLConfig, where: str) -> None:
    unrolled = lazy.relayout(tree, False, layer_counts(config))
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(unrolled)[0]}
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]}
    missing, unexpected = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
    wrong = [f"{k}: {got[k]} (config says {want[k]})" for k in sorted(want.keys() & got.keys()) if got[k] != want[k]]
    if missing or unexpected or wrong:
        raise ValueError(f"{where} does not match its config.json: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]}, wrong shape {wrong[:6]}; convert the checkpoint again")


def load(path: str | os.PathLike, dtype=None, mesh=None, *, scan_layers: bool | None = None, shardings=None,
         rules=None):
    """→ (config, params) from a converted folder (Orbax) or a Hugging Face folder (config.json + safetensors or
    .bin), one block at a time.

    dtype: cast every parameter (e.g. "bfloat16"; config.dtype/param_dtype follow); None keeps the stored dtype.
    mesh: place every array straight into its sharding from `sharding.rules` (each device reads only its slice);
      `rules`: another table of the same kind (e.g. sharding.rules.GENERATION_RULES for inference); `shardings`
      (a tree like params) overrides the rules. Without either, params are jax.Arrays committed to the
      default device (`jax.local_devices()[0]`, or the one `jax.default_device` names), each read and copied over before
      the next is read, so the host holds one array at a time beyond what is already placed.
    scan_layers: the layer layout to return (stacked for nn.scan or unrolled); None keeps the stored one
      (unrolled for Hugging Face folders)."""
    config, tree = open_checkpoint(path, dtype, scan_layers)
    if mesh is None and shardings is None:
        device = default_device()
        return config, jax.tree_util.tree_map(lambda x: jax.device_put(lazy.materialize(x), device)
                                              .block_until_ready(), tree)
    if shardings is None:
        from sharding.rules import LOGICAL_AXIS_RULES, param_shardings  # the one rules table lives outside

        shardings = param_shardings(config, mesh, rules or LOGICAL_AXIS_RULES)
    return config, jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, x.__getitem__), tree, shardings)


def open_checkpoint(path: str | os.PathLike, dtype=None, scan_layers: bool | None = None) -> tuple[Qwen2VLConfig, dict]:
    """→ (config, params as LazyArrays: nothing read yet) of a folder `load` reads, in the layout and dtype asked
    (see `load`); each array is read when indexed, so a caller can place (and transform) one at a time."""
    path = os.fspath(path)  # a local folder; a converted folder may also be gs://
    if not epath.Path(path).is_dir():
        raise ValueError(f"{path!r} is not a folder; pass a folder written by qwen2vl-convert or a Hugging Face "
                         "model folder (config.json + weights)")
    config = Qwen2VLConfig.from_hf(path)
    tree, stored_scan = open_params(path, config)
    scan = stored_scan if scan_layers is None else scan_layers
    config = config.replace(scan_layers=scan)
    tree = lazy.relayout(tree, scan, layer_counts(config))
    if dtype is not None:
        name = jnp.dtype(dtype).name
        config = config.replace(dtype=name, param_dtype=name)
        tree = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), tree)
    return config, tree


def default_device() -> jax.Device:
    """The device jax places uncommitted arrays on: `jax.default_device`'s when set, else this process's first
    (jax.local_devices()[0]; the same as jax.devices()[0] in one process)."""
    device = jax.config.jax_default_device
    if device is None:
        return jax.local_devices()[0]
    return jax.local_devices(backend=device)[0] if isinstance(device, str) else device


def torch_state(tree: dict, config: Qwen2VLConfig) -> list[tuple[str, tuple[int, ...], np.dtype, Callable]]:
    """A tree of LazyArrays (any layout) → (torch name, torch shape, dtype, read) per tensor; `read()` loads that one
    tensor and returns it in torch layout (a transposed view: write it out in pieces)."""
    unrolled = lazy.relayout(tree, False, layer_counts(config))
    out = []
    for key, value in jax.tree_util.tree_flatten_with_path(unrolled)[0]:
        path = tuple(k.key for k in key)
        name, layout = param_to_torch(path, np.empty(value.shape, np.bool_), config)  # shape only; never touched
        out.append((name, tuple(layout.shape), np.dtype(value.dtype),
                    lambda value=value, path=path: param_to_torch(path, lazy.materialize(value), config)[1]))
    return out

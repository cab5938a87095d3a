"""`qwen2vl-convert`: Hugging Face folder → Orbax folder (`--hf-dir`), and back (`--to-hf --orbax-dir`; with
`--adapter`, a LoRA export's adapter as a PEFT folder).

Both directions stream one block (≤ 64 MiB) at a time, so checkpoints larger than RAM convert. The output is built
in a temporary folder beside --out and renamed at the end: --out holds a complete result or nothing."""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import sys
import time
from typing import Callable

import jax
import numpy as np
from tqdm import tqdm

from qwen2vl_jax.checkpoint import lazy, orbax_files, peft, safetensors_files
from qwen2vl_jax.checkpoint.hf import BIN_INDEX, SAFETENSORS_INDEX
from qwen2vl_jax.checkpoint.load import FORMAT_FILE, PARAMS_DIR, is_converted, layer_counts, open_params, torch_state
from qwen2vl_jax.config import Qwen2VLConfig

FORMAT_VERSION = 1
MAX_SHARD_BYTES = 5_000_000_000


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".bin")) or name in (SAFETENSORS_INDEX, BIN_INDEX)


def _copy_side_files(source: str, target: str, dtype: str | None) -> None:
    """config.json, generation/processor configs, tokenizer files: every small regular file but the weights."""
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and not _is_weight_file(name) and name != FORMAT_FILE:
            shutil.copy2(path, os.path.join(target, name))
    if dtype is not None:  # the config records the weights' dtype for transformers
        config_path = os.path.join(target, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        for section in (config, config.get("text_config") or {}):
            section.update({key: dtype for key in ("dtype", "torch_dtype") if key in section})
        config["dtype"] = dtype
        with open(config_path, "w") as f:
            json.dump(config, f, indent=2)


@contextlib.contextmanager
def _atomic_folder(out: str):
    """Yield a temporary folder beside `out`; rename it to `out` on success, delete it on any failure."""
    out = os.path.abspath(out)
    if os.path.exists(out):
        raise FileExistsError(f"--out {out} exists; remove it or choose another folder")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bar(total_bytes: int, desc: str):
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=None, file=sys.stderr)


def hf_to_orbax(hf_dir: str, out: str, dtype: str | None = None, scan_layers: bool = False) -> dict:
    """Convert a Hugging Face folder; → {"bytes", "tensors", "seconds"}."""
    start = time.perf_counter()
    config = Qwen2VLConfig.from_hf(hf_dir)
    tree, _ = open_params(hf_dir, config)  # names, shapes and dtypes checked before anything is written
    tree = lazy.relayout(tree, scan_layers, layer_counts(config))
    if dtype is not None:
        tree = jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)
    leaves = jax.tree_util.tree_leaves(tree)
    total = sum(x.nbytes for x in leaves)
    with _atomic_folder(out) as tmp, _bar(total, "hf → orbax") as bar:
        orbax_files.save(os.path.join(tmp, PARAMS_DIR), tree, on_written=bar.update)
        _copy_side_files(hf_dir, tmp, dtype)
        with open(os.path.join(tmp, FORMAT_FILE), "w") as f:
            json.dump({"format_version": FORMAT_VERSION, "scan_layers": scan_layers,
                       "dtypes": sorted({np.dtype(x.dtype).name for x in leaves})}, f, indent=2)
    return {"bytes": total, "tensors": len(leaves), "seconds": time.perf_counter() - start}


def _nbytes(shape: tuple[int, ...], dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize


def _shards(named: list[tuple], max_bytes: int) -> list[list[tuple]]:
    """Consecutive groups of (name, shape, dtype, read) entries of at most `max_bytes` (a larger tensor alone)."""
    shards, size = [[]], 0
    for entry in named:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


class _Prefetcher:
    """Runs `read` functions in order on a background thread, one ahead of the caller (tensorstore decompression
    overlaps the file writes)."""

    def __init__(self, reads: list[Callable[[], np.ndarray]]):
        self._reads, self._futures = reads, {}
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    def get(self, k: int) -> np.ndarray:
        for j in (k, k + 1):
            if j < len(self._reads) and j not in self._futures:
                self._futures[j] = self._pool.submit(self._reads[j])
        return self._futures.pop(k).result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(cancel_futures=True)


def orbax_to_hf(orbax_dir: str, out: str, dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Export a converted folder as safetensors shards (+ index) that transformers loads; → {"bytes", ...}."""
    start = time.perf_counter()
    if not is_converted(orbax_dir):
        raise ValueError(f"{orbax_dir} has no {FORMAT_FILE}; pass a folder written by qwen2vl-convert --hf-dir")
    config = Qwen2VLConfig.from_hf(orbax_dir)
    tree, _ = open_params(orbax_dir, config)
    if dtype is not None:
        tree = jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)
    named = torch_state(tree, config)
    shards = _shards(named, max_shard_bytes)
    total = sum(_nbytes(shape, tensor_dtype) for _, shape, tensor_dtype, _ in named)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    with _atomic_folder(out) as tmp, _bar(total, "orbax → hf") as bar, \
            _Prefetcher([read for *_, read in named]) as ahead:
        def read(k: int) -> np.ndarray:
            array = ahead.get(k)
            bar.update(array.nbytes)
            return array

        position = 0
        for file_name, shard in zip(names, shards):
            entries = []
            for name, shape, tensor_dtype, _ in shard:
                entries.append((name, shape, tensor_dtype, lambda k=position: read(k)))
                position += 1
            safetensors_files.write(os.path.join(tmp, file_name), entries, metadata={"format": "pt"})
        if len(shards) > 1:
            with open(os.path.join(tmp, SAFETENSORS_INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total},
                           "weight_map": {n: f_name for f_name, shard in zip(names, shards) for n, *_ in shard}},
                          f, indent=2)
        _copy_side_files(orbax_dir, tmp, dtype)
    return {"bytes": total, "tensors": len(named), "files": len(shards), "seconds": time.perf_counter() - start}


def adapter_to_hf(orbax_dir: str, out: str) -> dict:
    """Write the PEFT adapter of an export with LoRA (ORBAX_DIR/adapter/, written by training/export.py) as `out`:
    adapter_model.safetensors + adapter_config.json + the tokenizer and processor files; → {"bytes", ...}."""
    start = time.perf_counter()
    source = os.path.join(orbax_dir, peft.ADAPTER_DIR)
    files = (peft.ADAPTER_FILE, peft.CONFIG_FILE)
    if not all(os.path.isfile(os.path.join(source, name)) for name in files):
        raise FileNotFoundError(f"{source} holds no PEFT adapter ({' + '.join(files)}): --adapter needs the export of "
                                f"a LoRA run (qwen2vl-train with config.lora writes it); drop --adapter to write the "
                                f"full weights")
    with _atomic_folder(out) as tmp:
        for name in files:
            shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
        for name in sorted(os.listdir(orbax_dir)):  # tokenizer / processor files; no config.json: peft takes the
            path = os.path.join(orbax_dir, name)     # base model's
            if os.path.isfile(path) and not _is_weight_file(name) and name not in ("config.json", FORMAT_FILE):
                shutil.copy2(path, os.path.join(tmp, name))
    with open(os.path.join(source, peft.ADAPTER_FILE), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    total = os.path.getsize(os.path.join(source, peft.ADAPTER_FILE))
    return {"bytes": total, "tensors": len([k for k in header if k != "__metadata__"]),
            "seconds": time.perf_counter() - start}


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwen2vl-convert", description=__doc__.split("\n")[0])
    parser.add_argument("--hf-dir", help="Hugging Face folder (config.json + safetensors or pytorch_model*.bin)")
    parser.add_argument("--to-hf", action="store_true", help="export --orbax-dir as a Hugging Face folder")
    parser.add_argument("--orbax-dir", help="folder written by qwen2vl-convert --hf-dir")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast every tensor")
    parser.add_argument("--scan-layers", action="store_true", help="store layers stacked, as nn.scan uses them")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file with --to-hf")
    parser.add_argument("--adapter", action="store_true",
                        help="with --to-hf: write the LoRA adapter of a LoRA run's export (ORBAX_DIR/adapter/) as a "
                             "PEFT folder instead of the merged full weights")
    args = parser.parse_args(argv)
    if args.adapter and not args.to_hf:
        parser.error("--adapter goes with --to-hf --orbax-dir EXPORT")
    if args.adapter and args.dtype:
        parser.error("--adapter writes the float32 adapter as trained; drop --dtype")
    if args.to_hf:
        if not args.orbax_dir or args.hf_dir:
            parser.error("--to-hf takes --orbax-dir (and not --hf-dir)")
        stats = (adapter_to_hf(args.orbax_dir, args.out) if args.adapter else
                 orbax_to_hf(args.orbax_dir, args.out, args.dtype, _size(args.max_shard_size)))
    else:
        if not args.hf_dir or args.orbax_dir:
            parser.error("give --hf-dir (or --to-hf --orbax-dir)")
        stats = hf_to_orbax(args.hf_dir, args.out, args.dtype, args.scan_layers)
    rate = stats["bytes"] / max(stats["seconds"], 1e-9) / 1e6
    print(f"wrote {args.out}: {stats['tensors']} tensors, {stats['bytes'] / 1e9:.3f} GB in {stats['seconds']:.1f} s "
          f"({rate:.0f} MB/s)")


if __name__ == "__main__":
    main()

"""LoRA: low-rank adapters beside chosen linear layers, over a frozen base that may be stored in int8.

A `Linear` whose module path matches `LoraConfig.targets` computes

    y = x · W (+ bias) + (alpha / rank) · (dropout(x) · A) · B        A: [*in, rank], B: [rank, *out]

with A and B float32 parameters `lora_a` / `lora_b` next to its `kernel` (B starts at zero, so a fresh adapter
changes nothing; A starts uniform in ±1/sqrt(fan_in), as PEFT does). With `base_dtype="int8"` the matched layers
store `kernel` as int8 plus a float32 `kernel_scale` per output channel (symmetric, absmax / 127) and compute
(x · q) · scale; the layers LoRA does not target keep the model's param_dtype.

The config rides on `Qwen2VLConfig.lora`, so init, abstract shapes, sharding (the rules table names the `lora_rank`
axis), training and generation all see the same tree:

    config = config.replace(lora=LoraConfig(rank=16, alpha=32), param_dtype="bfloat16")
    params = quantize(config, merge_trees(base_params, init_adapters(config, seed)))   # int8: quantize(...)

Module paths are those of the params tree, joined by "/": "language_model/layers/self_attn/q_proj" in a scanned
model (one module in every layer), "language_model/layers_3/self_attn/q_proj" unrolled, "visual/blocks/attn/qkv",
"visual/merger/mlp_0"."""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from qwen2vl_jax.layers import STACKS, param_with_axes

# the decoder's attention and MLP projections (PEFT's usual Qwen2 target_modules)
DECODER_TARGETS = r"^language_model/layers(_\d+)?/(self_attn/[qkvo]_proj|mlp/(gate|up|down)_proj)$"
BASE_DTYPES = ("bfloat16", "float32", "int8")
ADAPTER_NAMES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: str = DECODER_TARGETS  # regex searched in a Linear's module path
    base_dtype: str = "bfloat16"  # how the frozen base is stored: "bfloat16" | "float32" | "int8" (matched layers)

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"lora.rank={self.rank!r} must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"lora.alpha={self.alpha!r} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"lora.base_dtype={self.base_dtype!r}: choose one of {', '.join(BASE_DTYPES)}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"lora.targets {self.targets!r} is not a regex: {e}") from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def quantized(self) -> bool:
        return self.base_dtype == "int8"

    def matches(self, module_path: tuple[str, ...] | str) -> bool:
        path = module_path if isinstance(module_path, str) else "/".join(module_path)
        return re.search(self.targets, path) is not None


def _fan_in_uniform(in_ndim: int):
    def init(key, shape, dtype=jnp.float32):
        bound = 1.0 / np.sqrt(np.prod(shape[:in_ndim]))
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


def adapter_delta(module, x: jax.Array, in_ndim: int, out_shape: tuple[int, ...], axes, lora: LoraConfig,
                  dtype) -> jax.Array:
    """(alpha/rank) · (dropout(x) · A) · B for `module` (a Linear), declaring A and B as its float32 params
    `lora_a` [*in, rank] / `lora_b` [rank, *out] with logical axes (*in axes, "lora_rank") / ("lora_rank", *out
    axes). Dropout runs when the apply was given a "dropout" rng (training), never otherwise."""
    in_shape = x.shape[x.ndim - in_ndim:]
    a = param_with_axes(module, "lora_a", _fan_in_uniform(in_ndim), (*in_shape, lora.rank), jnp.float32,
                        (*axes[:in_ndim], "lora_rank"))
    b = param_with_axes(module, "lora_b", jax.nn.initializers.zeros, (lora.rank, *out_shape), jnp.float32,
                        ("lora_rank", *axes[in_ndim:]))
    if lora.dropout and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0).astype(x.dtype)
    contract = (tuple(range(x.ndim - in_ndim, x.ndim)), tuple(range(in_ndim)))
    low = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), (contract, ((), ())))
    delta = jax.lax.dot_general(low, b.astype(dtype), (((low.ndim - 1,), (0,)), ((), ())))
    return delta * jnp.asarray(lora.scaling, dtype)


def is_adapter(path) -> bool:
    """Whether a params-tree path (keys or names) ends in an adapter leaf."""
    last = path[-1]
    return str(getattr(last, "key", last)) in ADAPTER_NAMES


def split(params) -> tuple[dict, dict]:
    """params → (base, adapters): two nested dicts of the same modules, each holding its own leaves only."""
    base, adapters = {}, {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = [str(getattr(k, "key", k)) for k in path]
        node = adapters if names[-1] in ADAPTER_NAMES else base
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return base, adapters


def select(params, keep) -> dict:
    """The nested dict of `params`' leaves that `keep` (a bool tree like params) marks."""
    out: dict = {}
    for (path, leaf), kept in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(keep)):
        if kept:
            _set(out, [str(getattr(k, "key", k)) for k in path], leaf)
    return out


def merge_trees(*trees) -> dict:
    """Nested dicts → one (later trees add leaves to the modules of earlier ones)."""
    out: dict = {}
    for tree in trees:
        for key, value in tree.items():
            out[key] = merge_trees(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _stacked(names: list[str]) -> bool:
    return len(names) > 1 and (names[0], names[1]) in STACKS


def _in_axes(kernel_ndim: int, scale_ndim: int, stacked: bool) -> tuple[int, ...]:
    """Kernel axes reduced for a per-output-channel scale: kernel [layers?, *in, *out], scale [layers?, *out]."""
    return tuple(range(int(stacked), int(stacked) + kernel_ndim - scale_ndim))


def quantize(config, params) -> dict:
    """Float params (as a model without int8 storage has them) → the tree `config` (lora.base_dtype "int8") declares:
    each matched kernel as int8 with its float32 `kernel_scale` (absmax/127 per output channel, per layer), every
    other base leaf cast to param_dtype, adapters kept float32. Jit it with the output shardings of
    sharding.rules.param_shardings(config, mesh) to quantize a sharded model in place."""
    from qwen2vl_jax.model import abstract_params

    target = abstract_params(config)
    out = {}

    def visit(node, want, names):
        for key, value in node.items():
            if key not in want:
                raise ValueError(f"parameter {'/'.join(names + [key])} is not in the model this LoRA config declares "
                                 f"(lora.targets {config.lora.targets!r}): build the adapters with this config")
            if isinstance(value, dict):
                visit(value, want[key], names + [key])
                continue
            goal = want[key]
            goal = getattr(goal, "value", goal)
            if _quantized_kernel(key, want):
                scale_shape = getattr(want["kernel_scale"], "value", want["kernel_scale"]).shape
                axes = _in_axes(value.ndim, len(scale_shape), _stacked(names) and config.scan_layers)
                q, scale = _quantize_kernel(value, axes)
                _set(out, names + [key], q)
                _set(out, names + ["kernel_scale"], scale)
            elif key == "kernel_scale":
                continue
            else:
                _set(out, names + [key], value.astype(goal.dtype))

    visit(params, target, [])
    return out


def _quantized_kernel(key: str, want: dict) -> bool:
    """Whether leaf `key` of a module the abstract tree declares as `want` is an int8 kernel."""
    goal = want.get(key)
    return key == "kernel" and "kernel_scale" in want and getattr(goal, "value", goal).dtype == jnp.int8


def _quantize_kernel(kernel, axes: tuple[int, ...]):
    """kernel (float) → (int8 kernel, float32 scale with `axes` (the in dims) reduced): absmax/127 per channel."""
    absmax = jnp.max(jnp.abs(kernel.astype(jnp.float32)), axis=axes, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    q = jnp.clip(jnp.round(kernel.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axes)


def place_quantized(config, lazy_base, shardings) -> dict:
    """A float base read one array at a time (`lazy_base`: arrays or LazyArrays as checkpoint.load.open_checkpoint
    gives, `[index]` reads a slice) → placed in `shardings` (param_shardings of `config`; adapters absent) with the
    matched kernels quantized on the devices as they arrive, so the peak is the int8 tree plus one float leaf, never
    the float base (72B in bf16 is 18 GB per chip of a v5e-8, in int8 9.7). Equals `quantize` of the loaded base."""
    from qwen2vl_jax.model import abstract_params

    target = abstract_params(config)
    out = {}

    def visit(node, want, where, names):
        for key, value in node.items():
            if isinstance(value, dict):
                visit(value, want[key], where[key], names + [key])
                continue
            placed = jax.make_array_from_callback(value.shape, where[key], value.__getitem__)
            if not _quantized_kernel(key, want):
                _set(out, names + [key], placed.astype(getattr(want[key], "value", want[key]).dtype))
                continue
            scale_ndim = len(getattr(want["kernel_scale"], "value", want["kernel_scale"]).shape)
            axes = _in_axes(placed.ndim, scale_ndim, _stacked(names) and config.scan_layers)
            q, scale = jax.jit(_quantize_kernel, static_argnums=1,
                               out_shardings=(where["kernel"], where["kernel_scale"]))(placed, axes)
            placed.delete()
            _set(out, names + [key], q)
            _set(out, names + ["kernel_scale"], scale)

    visit(lazy_base, target, shardings, [])
    return out


def dequantized(config, params) -> dict:
    """The inverse of `quantize` up to rounding: int8 kernels times their scales in float32, scales dropped."""
    out = {}

    def visit(node, names):
        for key, value in node.items():
            if isinstance(value, dict):
                visit(value, names + [key])
            elif key == "kernel" and "kernel_scale" in node:
                scale = node["kernel_scale"]
                axes = _in_axes(value.ndim, scale.ndim, _stacked(names) and config.scan_layers)
                _set(out, names + [key], value.astype(jnp.float32) * jnp.expand_dims(scale, axes))
            elif key != "kernel_scale":
                _set(out, names + [key], value)

    visit(params, [])
    return out


def merged(config, params, dtype="float32") -> dict:
    """Plain params for `config.replace(lora=None)`: each adapted kernel becomes W + (alpha/rank)·A·B (int8 kernels
    dequantized first), computed in float32 and stored in `dtype`; adapters dropped."""
    lora = config.lora
    out, adapters = split(dequantized(config, params))  # fresh dicts: the walk below fills in the merged kernels

    def walk(a_node, out_node, names):
        for key, value in a_node.items():
            if "lora_a" in value:
                a, b = value["lora_a"], value["lora_b"]
                kernel = out_node[key]["kernel"]
                stacked = _stacked(names + [key]) and config.scan_layers
                delta = jax.vmap(_outer)(a, b) if stacked else _outer(a, b)
                out_node[key]["kernel"] = (kernel.astype(jnp.float32) + lora.scaling * delta).astype(dtype)
            else:
                walk(value, out_node[key], names + [key])

    walk(adapters, out, [])
    return out


def _outer(a, b):
    """A [*in, r], B [r, *out] → A·B [*in, *out] in float32."""
    return jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def init_adapters(config, seed: int = 0, shardings=None) -> dict:
    """Fresh adapters (A random, B zero) for `config.lora`, as the adapter-only nested dict (`split`'s second tree),
    created in `shardings` (that subtree of param_shardings) when given; the base is not initialized."""
    import flax.linen as nn

    from qwen2vl_jax.model import _init

    def make(key):
        return split(nn.unbox(_init(config, key)))[1]

    return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))


def _set(tree: dict, names: list[str], value) -> None:
    for name in names[:-1]:
        tree = tree.setdefault(name, {})
    tree[names[-1]] = value

"""Small building blocks: a general linear layer with logical axis names, RMSNorm and LayerNorm in float32."""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Axes = Sequence[str | None]
# the model's layer stacks, (top module, stack name): under scan_layers their params carry a leading layer axis
STACKS = frozenset({("visual", "blocks"), ("language_model", "layers")})


def layer_stack(layer: type[nn.Module], config, count: int, name: str | None = None, scanned_args: int = 0,
                **kwargs):
    """`count` layers of type `layer` with the config's remat policy: one nn.scan over stacked params
    (`scan_layers`) or a list named `{name}_{i}`. Layers take (x, 3 broadcast args, `scanned_args` per-layer args)
    and return (x, per-layer output or None)."""
    policies = {"full": jax.checkpoint_policies.nothing_saveable,
                "dots": jax.checkpoint_policies.checkpoint_dots,
                "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if config.remat != "none":
        layer = nn.remat(layer, policy=policies[config.remat], prevent_cse=not config.scan_layers)
    if config.scan_layers:
        return nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast,) * 3 + (0,) * scanned_args, length=count,
                       metadata_params={nn.PARTITION_NAME: "layers"})(config, name=name, **kwargs)
    return [layer(config, name=None if name is None else f"{name}_{i}", **kwargs) for i in range(count)]


def run_stack(stack, config, x, *broadcast, scanned: tuple = ()):
    """Apply what `layer_stack` built → (x, the layers' outputs or None). `scanned`: per-layer arguments — arrays
    with a leading layer axis under nn.scan, lists indexed by layer when unrolled (None passes through); the
    outputs come back the same way (stacked, or a list: no copy into one array per call, which matters for a KV
    cache updated every decode step)."""
    if config.scan_layers:
        return stack(x, *broadcast, *scanned)
    outputs = []
    for i, layer in enumerate(stack):
        x, out = layer(x, *broadcast, *(None if arg is None else arg[i] for arg in scanned))
        outputs.append(out)
    return x, None if outputs[0] is None else outputs


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes: Axes):
    """A parameter carrying logical axis names; `sharding/` maps them to mesh axes."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class Linear(nn.Module):
    """y = x · kernel (+ bias), contracting the last `in_ndim` axes of x.

    kernel: [*in_shape, *out_shape] with logical `axes` (one name per kernel dim); bias: out_shape.
    Inputs and kernel are cast to `dtype` (the matmul dtype); the result stays in `dtype`. Where `lora` (a
    qwen2vl_jax.lora.LoraConfig) matches this layer's path, a low-rank adapter is added (and with its int8 base the
    kernel is int8 with a per-output-channel `kernel_scale`): see qwen2vl_jax/lora.py."""
    out_shape: tuple[int, ...]
    axes: Axes
    in_ndim: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    lora: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_ndim:]
        adapted = self.lora is not None and self.lora.matches(self.path)
        int8 = adapted and self.lora.quantized
        init = nn.initializers.zeros if int8 else nn.initializers.normal(0.02)  # int8: lora.quantize fills it
        kernel = param_with_axes(self, "kernel", init, (*in_shape, *self.out_shape),
                                 jnp.int8 if int8 else self.param_dtype, self.axes)
        contract = (tuple(range(x.ndim - self.in_ndim, x.ndim)), tuple(range(self.in_ndim)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if int8:  # integers up to 127 are exact in bf16; the scale applies to the output, per channel
            scale = param_with_axes(self, "kernel_scale", nn.initializers.ones, self.out_shape, jnp.float32,
                                    self.axes[self.in_ndim:])
            y = y * scale.astype(self.dtype)
        if adapted:
            from qwen2vl_jax.lora import adapter_delta  # lora.py builds on this module
            y = y + adapter_delta(self, x, self.in_ndim, self.out_shape, self.axes, self.lora, self.dtype)
        if self.use_bias:
            bias = param_with_axes(self, "bias", nn.initializers.zeros, self.out_shape, self.param_dtype,
                                   self.axes[self.in_ndim:])
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Qwen2's RMSNorm, computed in float32; x: [..., D] → [..., D] in `dtype`."""
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype, ("embed",))
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * x32).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with bias, computed in float32; x: [..., E] → [..., E] in `dtype`."""
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = param_with_axes(self, "scale", nn.initializers.ones, (d,), self.param_dtype, ("embed",))
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (d,), self.param_dtype, ("embed",))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)

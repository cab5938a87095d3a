"""Attention per device: the kernels run inside `jax.shard_map` over the batch and head axes of the active mesh.

XLA's partitioner cannot split a loop that slices q/k/v with traced indices (the blockwise kernel, Pallas calls):
left to itself it all-gathers q, k, v onto every device and runs the whole batch everywhere. `per_device` instead
hands each device its own rows (and heads), so every kernel sees local arrays only.

Which mesh axes: those the active logical-axis rules (`sharding.rules.axis_rules`, i.e. flax's
`nn.logical_axis_rules`) give the names "batch" and "heads", restricted to axes of the current mesh
(`jax.set_mesh`) with size > 1. This module names no mesh axis itself. Without a mesh or rules it calls the kernel
directly.

- The batch dim must be a multiple of the batch shards: anything else is a ValueError (replicating silently would
  run the whole batch on every device).
- Query heads are split over the head axes when they divide H. KV heads follow when they divide Hkv; otherwise
  (e.g. 2 KV heads on 4 head shards) k/v stay whole on every head shard (their projection weights are replicated
  by the same rules) and each shard slices the KV heads its query heads use.
- The length axis is never split here (no ring attention): a mesh that shards "length" gathers it around the
  kernel.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax import lax
from jax.sharding import PartitionSpec as P


def mesh_axes(mesh, logical: str) -> tuple[str, ...]:
    """Mesh axes (size > 1) the active rules give `logical`; () without rules."""
    spec = nn.logical_to_mesh_axes((logical,))
    axes = spec[0] if spec is not None and len(spec) else None
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)


def _axis_spec(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def per_device(kernel, q, k, v, segment_ids, kv_segment_ids):
    """kernel(q, k, v, segment_ids, kv_segment_ids) (shapes as `attention.dot_product_attention`) run on each
    device's rows and heads of the active mesh; → [B, Lq, H, D] in q's sharding."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids, kv_segment_ids)
    batch_axes = mesh_axes(mesh, "batch")
    head_axes = tuple(a for a in mesh_axes(mesh, "heads") if a not in batch_axes)
    (B, _, H, _), hkv = q.shape, k.shape[2]
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    if B % shards:
        raise ValueError(f"attention over a batch of {B} rows on a mesh with {shards} batch shards "
                         f"({' × '.join(f'{a}={mesh.shape[a]}' for a in batch_axes)}): the batch must be a multiple "
                         f"of {shards} (set data.batch_size, or the batch you pass, to a multiple of it)")
    tp = math.prod(mesh.shape[a] for a in head_axes)
    group = H // hkv
    local_heads = H // tp if H % tp == 0 else 0
    if tp > 1 and not (local_heads and (hkv % tp == 0 or local_heads % group == 0 or group % local_heads == 0)):
        head_axes, tp = (), 1  # heads that split unevenly stay whole (gathered around the kernel)
    if not batch_axes and not head_axes:
        return kernel(q, k, v, segment_ids, kv_segment_ids)
    b, h = _axis_spec(batch_axes), _axis_spec(head_axes)
    kv_split = tp > 1 and hkv % tp == 0
    q_spec, kv_spec, seg_spec = P(b, None, h, None), P(b, None, h if kv_split else None, None), P(b, None)

    def local(q, k, v, seg, kv_seg):
        if tp > 1 and not kv_split:  # whole k/v here: keep the KV heads this shard's query heads read
            first = lax.axis_index(head_axes) * (H // tp) // group
            count = max(H // tp // group, 1)
            k, v = (lax.dynamic_slice_in_dim(x, first, count, axis=2) for x in (k, v))
        return kernel(q, k, v, seg, kv_seg)

    in_specs = (q_spec, kv_spec, kv_spec, None if segment_ids is None else seg_spec,
                None if kv_segment_ids is None else seg_spec)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(
        q, k, v, segment_ids, kv_segment_ids)


def active_batch_axes() -> tuple[tuple[str, ...], int]:
    """(mesh axes the active rules give "batch", how many batch shards they make) on the current mesh; ((), 1)
    without a mesh or rules."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = mesh_axes(mesh, "batch")
    return axes, math.prod(mesh.shape[a] for a in axes)

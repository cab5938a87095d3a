"""The one table mapping the model's logical axis names to mesh axes, and the shardings it gives.

The model names every parameter dim (`embed`, `heads`, `mlp`, …; see DESIGN.md) and never a mesh axis; this file is
the only place the two meet. A dim whose size the mesh axes do not divide (e.g. 2 KV heads on a tensor axis of 4)
is replicated along those axes instead: correct everywhere, at the cost of memory for that (small) tensor."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical name → mesh axis or axes (None: replicated). Axes absent from a mesh are ignored.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("patches", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
)


def spec_for(shape: tuple[int, ...], logical: PartitionSpec | tuple, mesh: Mesh,
             rules=LOGICAL_AXIS_RULES) -> PartitionSpec:
    """The mesh PartitionSpec for an array of `shape` whose dims carry `logical` names, keeping only mesh axes
    that exist in `mesh`, are not used by an earlier dim, and divide the dim."""
    table = dict(rules)
    used, spec = set(), []
    for size, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for axis in axes:
            if axis in mesh.shape and axis not in used and size % (math.prod(mesh.shape[a] for a in kept)
                                                                     * mesh.shape[axis]) == 0:
                kept.append(axis)
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def param_shardings(config, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> dict:
    """NamedSharding for every parameter of `config` (its layer layout) on `mesh`."""
    from qwen2vl_jax.model import abstract_params

    boxed = abstract_params(config)
    return jax.tree_util.tree_map(
        lambda leaf: NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, mesh, rules)),
        boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))

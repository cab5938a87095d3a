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
    that exist in `mesh` with size > 1, are not used by an earlier dim, and divide the dim."""
    table = dict(rules)
    used, spec = set(), []
    for size, name in zip(shape, tuple(logical) + (None,) * (len(shape) - len(logical))):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        for axis in axes:
            if (axis in mesh.shape and mesh.shape[axis] > 1 and axis not in used
                    and size % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0):
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


def rules_for(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> tuple:
    """The table restricted to `mesh`'s axes, for `nn.logical_axis_rules` (the model's activation constraints)."""
    def keep(axes):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1)
        return None if not kept else kept[0] if len(kept) == 1 else kept

    return tuple((name, keep(axes)) for name, axes in rules)


def axis_rules(mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Context in which the model's `nn.with_logical_constraint` calls shard activations on `mesh`; enter it with
    `jax.set_mesh(mesh)` around tracing."""
    return nn.logical_axis_rules(rules_for(mesh, rules))


def opt_state_shardings(optimizer, params_shardings: dict, abstract_params: dict, mesh: Mesh):
    """Optimizer state shardings: moments follow their parameter, everything else (counts) is replicated."""
    import optax

    state = jax.eval_shape(optimizer.init, abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(optimizer, lambda _, sharding: sharding, state, params_shardings,
                                 transform_non_params=lambda _: replicated,
                                 is_leaf=lambda x: isinstance(x, NamedSharding))


# logical names of the batch arrays (training/step.py's layout); other keys are replicated
BATCH_AXES = {
    "input_ids": ("batch", "length"), "labels": ("batch", "length"), "attention_mask": ("batch", "length"),
    "splice_index": ("batch", "length"), "position_ids": (None, "batch", "length"),
    "vision_pixels": ("patches", None), "vision_pos_hw": ("patches", None), "vision_segment_ids": ("patches",),
}


def batch_shardings(batch: dict, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> dict:
    """NamedSharding per array of a (possibly nested, possibly abstract) batch dict, keyed by leaf name."""
    def one(path, leaf):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        return NamedSharding(mesh, spec_for(tuple(leaf.shape), BATCH_AXES.get(name, ()), mesh, rules))

    return jax.tree_util.tree_map_with_path(one, batch)

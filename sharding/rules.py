"""The one table mapping the model's logical axis names to mesh axes, and the shardings it gives.

The model names every parameter dim (`embed`, `heads`, `mlp`, …; see DESIGN.md) and never a mesh axis; this file is
the only place the two meet. A parameter dim whose size the mesh axes do not divide (e.g. 2 KV heads on a tensor
axis of 4) is replicated along those axes instead: correct everywhere, at the cost of memory for that (small)
tensor. A batch dim they do not divide is an error (`batch_shardings`): replicating it would run the whole batch on
every device."""
from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# logical name → mesh axis or axes (None: replicated). Axes absent from a mesh are ignored.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "sequence"),
    ("patches", None),  # patch rows within a batch shard's packed ViT sequence (the shards themselves are "batch")
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    # LoRA (qwen2vl_jax/lora.py): A [*in, rank], B [rank, *out]; the rank takes fsdp where the other dims leave it
    # free (B's out dims are tensor-parallel), so no adapter is whole on every fsdp device
    ("lora_rank", "fsdp"),
)

# Generation (inference) variant: parameters are not split over fsdp ("embed" replicated), so a decode step never
# gathers weights; tensor-parallel dims stay on `tensor` and the batch goes over data × fsdp.
GENERATION_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = tuple(
    (name, None if name == "embed" else axes) for name, axes in LOGICAL_AXIS_RULES)


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


@contextlib.contextmanager
def generation_rules(mesh: Mesh, rules=GENERATION_RULES):
    """Context for `qwen2vl_jax.generate` on `mesh`: `jax.set_mesh` + the inference rules, so the batch is split
    over the batch axes and attention runs per device. Place params with `param_shardings(config, mesh, rules)`."""
    with jax.set_mesh(mesh), axis_rules(mesh, rules):
        yield


def opt_state_shardings(optimizer, params_shardings: dict, abstract_params: dict, mesh: Mesh):
    """Optimizer state shardings: a moment follows its parameter — the state leaf whose key path ends in a
    parameter's path with that parameter's shape (so masked states, e.g. frozen parameters under
    optax.multi_transform, map too) — and everything else (counts) is replicated."""
    state = jax.eval_shape(optimizer.init, abstract_params)
    keys = lambda path: tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    owners = {keys(path): (leaf.shape, sharding) for (path, leaf), sharding in
              zip(jax.tree_util.tree_leaves_with_path(abstract_params), jax.tree_util.tree_leaves(params_shardings))}
    replicated = NamedSharding(mesh, PartitionSpec())

    def owner(path, leaf):
        names = keys(path)
        for start in range(len(names)):
            shape, sharding = owners.get(names[start:], (None, None))
            if shape == leaf.shape:
                return sharding
        return replicated

    return jax.tree_util.tree_map_with_path(owner, state)


# logical names of the batch arrays (training/step.py's layout); other keys are replicated. The vision arrays carry
# a leading shard axis (one packed ViT sequence per batch shard), split like the batch.
BATCH_AXES = {
    "input_ids": ("batch", "length"), "labels": ("batch", "length"), "attention_mask": ("batch", "length"),
    "splice_index": ("batch", "length"), "position_ids": (None, "batch", "length"),
    "vision_pixels": ("batch", "patches", None), "vision_pos_hw": ("batch", "patches", None),
    "vision_segment_ids": ("batch", "patches"), "loss_index": ("batch", None), "loss_targets": ("batch", None),
}


def batch_shard_count(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> int:
    """How many ways the batch is split on `mesh`: the product of the mesh axes the rules give "batch"."""
    axes = dict(rules_for(mesh, rules)).get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def _batch_spec(name: str, shape: tuple[int, ...], mesh: Mesh, rules) -> PartitionSpec:
    logical, shards = BATCH_AXES.get(name, ()), batch_shard_count(mesh, rules)
    if "batch" in logical and shape[logical.index("batch")] % shards:
        raise ValueError(
            f"batch array {name!r} has {shape[logical.index('batch')]} along its batch dim, which the {shards} batch "
            f"shards of mesh {dict(mesh.shape)} do not divide: set data.batch_size to a multiple of {shards} (the "
            "data pipeline then builds one packed ViT sequence per shard), or change the mesh")
    return spec_for(shape, logical, mesh, rules)


def _leaf_name(path) -> str:
    return path[-1].key if hasattr(path[-1], "key") else str(path[-1])


def batch_shardings(batch: dict, mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> dict:
    """NamedSharding per array of a (possibly nested, possibly abstract) batch dict, keyed by leaf name. A batch dim
    the batch shards do not divide is a ValueError naming the array and the mesh."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, _batch_spec(_leaf_name(path), tuple(leaf.shape), mesh, rules)), batch)


def local_batch_shards(mesh: Mesh, rules=LOGICAL_AXIS_RULES) -> tuple[int, ...]:
    """The batch shards (0 … batch_shard_count − 1) that this process's devices hold, in order."""
    shards = batch_shard_count(mesh, rules)
    sharding = NamedSharding(mesh, spec_for((shards,), ("batch",), mesh, rules))
    return tuple(sorted({index[0].start or 0 for index in sharding.addressable_devices_indices_map((shards,)).values()}))


def place_local_batch(batch: dict, mesh: Mesh, shard_ids, rules=LOGICAL_AXIS_RULES) -> tuple[dict, dict]:
    """A process's batch — the rows and vision sequences of its batch shards `shard_ids` only (data_pipeline's
    layout) — → (global jax arrays, their shardings): each local device takes its slice from this process's shards."""
    shards, position = batch_shard_count(mesh, rules), {s: i for i, s in enumerate(shard_ids)}

    def one(path, x):
        logical = BATCH_AXES.get(_leaf_name(path), ())
        axis = logical.index("batch") if "batch" in logical else None
        per = None if axis is None else x.shape[axis] // len(shard_ids)
        shape = x.shape if axis is None else x.shape[:axis] + (per * shards,) + x.shape[axis + 1:]
        sharding = NamedSharding(mesh, _batch_spec(_leaf_name(path), shape, mesh, rules))

        def local(index):
            if axis is not None:  # global rows → the same rows of this process's copy of their shard
                rows = range(shape[axis])[index[axis]]
                shard = rows.start // per
                start = position[shard] * per + rows.start - shard * per
                index = index[:axis] + (slice(start, start + len(rows)),) + index[axis + 1:]
            return x[index]

        return jax.make_array_from_callback(shape, sharding, local), sharding

    placed = jax.tree_util.tree_map_with_path(one, batch)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], NamedSharding)
    return (jax.tree_util.tree_map(lambda x: x[0], placed, is_leaf=is_pair),
            jax.tree_util.tree_map(lambda x: x[1], placed, is_leaf=is_pair))

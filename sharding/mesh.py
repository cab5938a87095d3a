"""Device meshes from a few numbers: axes `data`, `fsdp`, `tensor` (and `sequence`, unused by the rules today).

    mesh = make_mesh("fsdp=-1,tensor=4")                    # -1 takes the devices left over
    mesh = make_mesh({"fsdp": 16, "tensor": 4}, dcn="data=2")  # 2 slices: data across the DCN, the rest inside

Axis types are Auto (the compiler propagates shardings from the params, batch and the model's logical
constraints); enter a mesh with `jax.set_mesh(mesh)`. On several hosts call `initialize_distributed()` first."""
from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("data", "fsdp", "tensor", "sequence")


def parse_axes(spec: str | dict[str, int] | None) -> dict[str, int]:
    """"fsdp=4,tensor=2" or a dict → {axis: size} in AXES order; unknown axes and more than one -1 are errors."""
    if spec is None or spec == "":
        return {}
    if isinstance(spec, str):
        pairs = [part.split("=") for part in spec.split(",") if part.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"mesh {spec!r}: write axis=size pairs separated by commas, e.g. fsdp=4,tensor=2")
        spec = {name.strip(): int(size) for name, size in pairs}
    unknown = sorted(set(spec) - set(AXES))
    if unknown:
        raise ValueError(f"mesh axes {unknown} are not among {AXES}")
    if sum(size == -1 for size in spec.values()) > 1:
        raise ValueError(f"mesh {spec}: at most one axis may be -1")
    return {name: spec[name] for name in AXES if name in spec}


def resolve_axes(axes: dict[str, int], device_count: int) -> dict[str, int]:
    """Fill the -1 axis (or add `fsdp` when no axis is -1 and devices are left) so the sizes multiply to
    `device_count`; every AXES name appears (size 1 when unused)."""
    axes = {name: axes.get(name, 1) for name in AXES}
    known = math.prod(size for size in axes.values() if size != -1)
    if device_count % known:
        raise ValueError(f"mesh {axes} does not divide {device_count} devices")
    if -1 in axes.values():
        axes[next(n for n, s in axes.items() if s == -1)] = device_count // known
    elif known != device_count:
        raise ValueError(f"mesh {axes} uses {known} of {device_count} devices; give one axis size -1 to fill")
    return axes


def make_mesh(ici: str | dict[str, int] = "fsdp=-1", *, dcn: str | dict[str, int] | None = None,
              devices=None) -> Mesh:
    """A Mesh with Auto axis types over `devices` (default: all). `ici` sizes the axes within a slice, `dcn` the
    number of slices along each axis (multi-slice: the data-center network carries only the dcn axes)."""
    devices = list(jax.devices() if devices is None else devices)
    dcn_axes = {name: 1 for name in AXES} | parse_axes(dcn)
    slices = math.prod(dcn_axes.values())
    ici_axes = resolve_axes(parse_axes(ici), len(devices) // slices)
    grid = device_grid(tuple(ici_axes[n] for n in AXES), tuple(dcn_axes[n] for n in AXES), devices)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def device_grid(ici_shape: tuple[int, ...], dcn_shape: tuple[int, ...], devices) -> np.ndarray:
    """Devices arranged as ici_shape × dcn_shape (elementwise). Across slices (dcn > 1) each slice — or, where
    devices have no slice_index (CPU, GPU), each process — is one block of the grid, so only dcn axes cross it."""
    from jax.experimental import mesh_utils

    if math.prod(dcn_shape) > 1:
        return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                    process_is_granule=not hasattr(devices[0], "slice_index"))
    if devices[0].platform == "cpu":  # no physical topology to follow
        return np.array(devices).reshape(ici_shape)
    return mesh_utils.create_device_mesh(ici_shape, devices)


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` when this process is one of several: on Cloud TPU pods JAX finds the
    coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. A no-op on one
    host, and when already initialized."""
    if jax.distributed.is_initialized():
        return
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need a collectives backend
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                                   int(os.environ["JAX_PROCESS_ID"]))
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0 or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()

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


def initialize_distributed() -> str | None:
    """`jax.distributed.initialize()` when this process is one of several; → what it joined ("env" or the name of
    JAX's cluster, e.g. "SlurmCluster"), None when it stays alone. Call it before anything touches a backend.

    Explicit: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID; gloo collectives on CPU). Otherwise JAX's
    own cluster detection (the ClusterEnv classes jax.distributed.initialize() asks): Open MPI (mpirun), SLURM,
    GKE TPU pods (TPU_WORKER_HOSTNAMES), Cloud TPU VMs (GCE metadata), Kubernetes jobs. A no-op for one process (a
    single-host TPU VM, a 1-task SLURM job, a laptop) and when already initialized. A TPU environment that names
    several workers but that JAX cannot resolve is an error, not N independent runs."""
    if jax.distributed.is_initialized():
        return None
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        count = os.environ.get("JAX_NUM_PROCESSES")
        if count is not None and int(count) <= 1:
            return None
        if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes need a collectives backend
        process = os.environ.get("JAX_PROCESS_ID")
        # unset values are left to JAX's detection (e.g. the address given by hand on SLURM, the rest from SLURM)
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], None if count is None else int(count),
                                   None if process is None else int(process))
        return "env"
    cluster = detected_cluster()
    if cluster is not None:
        name, count = cluster
        if count <= 1:
            return None
        jax.distributed.initialize()  # JAX's detection picks the same cluster and fills in every argument
        return name
    if several_processes_expected():
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as error:
            raise RuntimeError(
                "the environment says this process is one of several (TPU_WORKER_HOSTNAMES, MEGASCALE_*, TPU_WORKER_ID "
                "with a multi-host TPU_ACCELERATOR_TYPE, or OMPI_COMM_WORLD_SIZE) but JAX found no coordinator; set "
                "JAX_COORDINATOR_ADDRESS (process 0's host:port), JAX_NUM_PROCESSES and JAX_PROCESS_ID in every "
                f"process: {error}") from error
        return "env"
    return None


def detected_cluster() -> tuple[str, int] | None:
    """(class name, process count) of the first cluster environment JAX's auto-detection finds (in JAX's order, opt-in
    methods such as mpi4py skipped, as jax.distributed.initialize() does), or None."""
    try:
        from jax._src import clusters
        envs = list(clusters.ClusterEnv._cluster_types)
    except (ImportError, AttributeError):  # a JAX without this registry: the TPU env check below still applies
        return None
    import importlib.util
    for env in envs:
        if env.__name__ == "K8sCluster" and importlib.util.find_spec("kubernetes") is None:
            continue  # it would only warn that the package is missing (any pod, e.g. a CI container)
        if not env.opt_in_only_method and env.is_env_present():
            return env.__name__, int(env.get_process_count())
    return None


def several_processes_expected() -> bool:
    """A TPU runtime's or an MPI launcher's own variables say this process is one of several (whether or not JAX's
    detection recognizes the environment)."""
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hosts = os.environ.get("TPU_PROCESS_ADDRESSES") or os.environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") and int(os.environ.get("MEGASCALE_NUM_SLICES") or 2) > 1:
        return True
    size = os.environ.get("TPU_ACCELERATOR_TYPE", "").rpartition("-")[2]  # e.g. v4-32, v5litepod-16, v5p-128
    if ("TPU_WORKER_ID" in os.environ or "CLOUD_TPU_TASK_ID" in os.environ) and size.isdigit():
        return int(size) > 8  # one host holds at most 8 (TensorCores on v2-v4 and v5p, chips on v5e and v6e)
    return False

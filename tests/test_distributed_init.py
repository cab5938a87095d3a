"""sharding.mesh.initialize_distributed on each platform, from its environment variables alone: jax.distributed is
never really started (initialize is replaced by a recorder), and JAX's own cluster classes decide what is detected
(their TPU-VM flag and the GCE metadata server are faked)."""
import os

import jax
import pytest
from jax._src.clusters import cloud_tpu_cluster

from sharding import mesh

CLEARED = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_CPU_COLLECTIVES_IMPLEMENTATION",
           "KUBERNETES_SERVICE_HOST", "CLOUD_TPU_TASK_ID", "TPU_SKIP_MDS_QUERY")
CLEARED_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "TPU_", "MEGASCALE_")


@pytest.fixture
def calls(monkeypatch):
    """A clean environment (no launcher, no TPU); → the list of jax.distributed.initialize calls made."""
    for name in list(os.environ):
        if name in CLEARED or name.startswith(CLEARED_PREFIXES):
            monkeypatch.delenv(name)
    made = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: made.append((args, kwargs)))
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", False)
    return made


def on_tpu_vm(monkeypatch, metadata=None):
    """Pretend to be a Cloud TPU VM whose metadata server holds `metadata` (404 for other keys; a GKE node has no
    agent-worker-number, and JAX asks for it before it looks at GKE's variables)."""
    monkeypatch.setattr(cloud_tpu_cluster, "running_in_cloud_tpu_vm", True)
    metadata = metadata or {}

    def get_metadata(key):
        return (metadata[key], 200) if key in metadata else ("", 404)

    monkeypatch.setattr(cloud_tpu_cluster, "get_metadata", get_metadata)


def setenv(monkeypatch, **values):
    for name, value in values.items():
        monkeypatch.setenv(name, str(value))


def test_one_process_on_a_laptop_is_a_no_op(calls):
    assert mesh.initialize_distributed() is None and calls == []


def test_already_initialized_is_a_no_op(calls, monkeypatch):
    setenv(monkeypatch, JAX_COORDINATOR_ADDRESS="localhost:1234", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=0)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert mesh.initialize_distributed() is None and calls == []


def test_explicit_variables(calls, monkeypatch):
    setenv(monkeypatch, JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES=4, JAX_PROCESS_ID=3)
    before = jax.config.jax_cpu_collectives_implementation
    try:
        jax.config.update("jax_cpu_collectives_implementation", None)
        assert mesh.initialize_distributed() == "env"
        assert jax.config.jax_cpu_collectives_implementation == "gloo"  # CPU processes need cross-process collectives
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
    assert calls == [(("10.0.0.1:1234", 4, 3), {})]


def test_explicit_single_process_is_a_no_op(calls, monkeypatch):
    setenv(monkeypatch, JAX_COORDINATOR_ADDRESS="localhost:1234", JAX_NUM_PROCESSES=1, JAX_PROCESS_ID=0)
    assert mesh.initialize_distributed() is None and calls == []


def test_slurm_job_with_several_tasks(calls, monkeypatch):
    setenv(monkeypatch, SLURM_JOB_ID=4242, SLURM_STEP_NODELIST="node[001-002]", SLURM_NTASKS=2, SLURM_PROCID=1,
           SLURM_LOCALID=0)
    assert mesh.initialize_distributed() == "SlurmCluster"
    assert calls == [((), {})]  # JAX fills in the coordinator, the count and the id from SLURM itself
    from jax._src.clusters import SlurmCluster
    assert SlurmCluster.get_coordinator_address(None, None).startswith("node001:")


def test_slurm_job_with_one_task_is_a_no_op(calls, monkeypatch):
    setenv(monkeypatch, SLURM_JOB_ID=4242, SLURM_STEP_NODELIST="node001", SLURM_NTASKS=1, SLURM_PROCID=0,
           SLURM_LOCALID=0)
    assert mesh.initialize_distributed() is None and calls == []


def test_slurm_allocation_shell_without_a_step_is_a_no_op(calls, monkeypatch):
    setenv(monkeypatch, SLURM_JOB_ID=4242, SLURM_NTASKS=8)  # salloc/sbatch body: one process, no srun step
    assert mesh.initialize_distributed() is None and calls == []


def test_open_mpi(calls, monkeypatch):
    setenv(monkeypatch, OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
           OMPI_COMM_WORLD_SIZE=2, OMPI_COMM_WORLD_RANK=1, OMPI_COMM_WORLD_LOCAL_RANK=1)
    assert mesh.initialize_distributed() == "OmpiCluster" and calls == [((), {})]


def test_open_mpi_single_rank_is_a_no_op(calls, monkeypatch):
    setenv(monkeypatch, OMPI_MCA_orte_hnp_uri="1531576320.0;tcp://10.96.0.1:34911", OMPI_COMM_WORLD_SIZE=1,
           OMPI_COMM_WORLD_RANK=0, OMPI_COMM_WORLD_LOCAL_RANK=0)
    assert mesh.initialize_distributed() is None and calls == []


def test_gke_tpu_pod(calls, monkeypatch):
    on_tpu_vm(monkeypatch)
    setenv(monkeypatch, TPU_WORKER_HOSTNAMES="w-0.svc,w-1.svc,w-2.svc,w-3.svc", TPU_WORKER_ID=2,
           TPU_ACCELERATOR_TYPE="v5litepod-16")
    assert mesh.initialize_distributed() == "GkeTpuCluster" and calls == [((), {})]
    assert (cloud_tpu_cluster.GkeTpuCluster.get_process_count(), cloud_tpu_cluster.GkeTpuCluster.get_process_id()) \
        == (4, 2)


def test_gke_single_host_tpu_is_a_no_op(calls, monkeypatch):
    on_tpu_vm(monkeypatch)
    setenv(monkeypatch, TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID=0, TPU_ACCELERATOR_TYPE="v5litepod-8")
    assert mesh.initialize_distributed() is None and calls == []


def test_gke_multislice_of_single_host_slices(calls, monkeypatch):
    on_tpu_vm(monkeypatch)
    setenv(monkeypatch, TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID=0, MEGASCALE_COORDINATOR_ADDRESS="s0-w0:8080",
           MEGASCALE_NUM_SLICES=2, MEGASCALE_SLICE_ID=1)
    assert mesh.initialize_distributed() == "GkeTpuCluster" and calls == [((), {})]


def test_cloud_tpu_vm_pod_from_metadata(calls, monkeypatch):
    on_tpu_vm(monkeypatch, {"agent-worker-number": "1", "tpu-env": "ACCELERATOR_TYPE: 'v4-32'\n",
                            "worker-network-endpoints": "w0:0:10.0.0.2,w1:1:10.0.0.3,w2:2:10.0.0.4,w3:3:10.0.0.5"})
    assert mesh.initialize_distributed() == "GceTpuCluster" and calls == [((), {})]
    assert cloud_tpu_cluster.GceTpuCluster.get_process_id() == 1


def test_single_host_cloud_tpu_vm_is_a_no_op(calls, monkeypatch):
    on_tpu_vm(monkeypatch, {"agent-worker-number": "0", "tpu-env": "", "worker-network-endpoints": "w0:0:10.0.0.2"})
    assert mesh.initialize_distributed() is None and calls == []


def test_tpu_worker_variables_jax_cannot_resolve_still_initialize(calls, monkeypatch):
    """TPU_WORKER_ID + a multi-host accelerator type without a VM JAX recognizes: JAX is asked (and here answers);
    a one-host type stays alone."""
    setenv(monkeypatch, CLOUD_TPU_TASK_ID=1, TPU_ACCELERATOR_TYPE="v4-16")
    assert mesh.initialize_distributed() == "env" and calls == [((), {})]
    setenv(monkeypatch, TPU_ACCELERATOR_TYPE="v5p-8")
    assert mesh.initialize_distributed() is None and len(calls) == 1


def test_unresolvable_multi_host_environment_says_what_to_set(calls, monkeypatch):
    setenv(monkeypatch, OMPI_COMM_WORLD_SIZE=4, OMPI_COMM_WORLD_RANK=0)  # Open MPI 5: no orte URI for JAX to read

    def fails(*args, **kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", fails)
    with pytest.raises(RuntimeError, match="JAX_COORDINATOR_ADDRESS"):
        mesh.initialize_distributed()

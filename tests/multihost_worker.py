"""One process of the multi-host check (tests/test_multihost.py): `python tests/multihost_worker.py OUT_JSON`.

With JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set it joins a `jax.distributed` job (gloo
collectives on CPU); without them it runs alone. Either way it owns JAX_LOCAL_DEVICES CPU devices (default 2), builds
the same seeded params and 4-row batch as every other process, shards them on a "data=2,fsdp=2" mesh over all global
devices, and writes the loss, two sharded train steps' losses / grad norms (the second uses the optimizer state the
first left), and the loss after them to OUT_JSON (suffixed `.<process index>` when several processes run)."""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.environ.get('JAX_LOCAL_DEVICES', '2')}"
sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

from sharding.mesh import initialize_distributed  # noqa: E402

initialize_distributed()  # before anything touches a backend

import functools  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from reference import reference  # noqa: E402
from sharding.mesh import make_mesh  # noqa: E402
from sharding.rules import axis_rules, batch_shardings  # noqa: E402
from test_sharding import train_batch  # noqa: E402
from training.step import init_state, jit_train_step, loss_fn, make_optimizer, state_shardings  # noqa: E402


def place(tree, shardings):
    """Global arrays from host numpy trees that every process holds in full: each device takes its slice."""
    def one(x, sharding):
        x = np.asarray(x)
        x = x.astype(np.int32) if x.dtype == np.int64 else x
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree_util.tree_map(one, tree, shardings)


def main(out_path: str) -> None:
    cfg, _, params = reference("untied")
    optimizer = make_optimizer(1e-3, warmup_steps=1, total_steps=10)
    mesh = make_mesh("data=2,fsdp=2")
    batch = train_batch(cfg, shards=4)
    shardings = state_shardings(cfg, optimizer, mesh)
    b_shard = batch_shardings(batch, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def loss_only(p, b):
        with axis_rules(mesh):
            return loss_fn(p, b, cfg)[0]

    loss_jit = jax.jit(loss_only, out_shardings=replicated)
    with jax.set_mesh(mesh):
        b = place(batch, b_shard)
        state = jax.jit(functools.partial(init_state, optimizer=optimizer), out_shardings=shardings)(
            place(params, shardings.params))
        loss_before = float(loss_jit(state.params, b))
        step = jit_train_step(cfg, optimizer, mesh, shardings, b_shard)
        step_losses, grad_norms = [], []
        for _ in range(2):
            state, metrics = step(state, b)
            step_losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
        loss_after = float(loss_jit(state.params, b))
    result = {"loss_before": loss_before, "step_losses": step_losses, "grad_norms": grad_norms,
              "loss_after": loss_after,
              "process_index": jax.process_index(), "process_count": jax.process_count(),
              "device_count": jax.device_count(), "local_device_count": jax.local_device_count()}
    if jax.process_count() > 1:
        out_path = f"{out_path}.{jax.process_index()}"
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])

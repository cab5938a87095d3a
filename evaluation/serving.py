"""A checkpoint opened for generation on this host's devices: the one place the CLIs (qwen2vl-generate, qwen2vl-eval)
turn `--mesh` / `--dtype` into a mesh, params placed by the inference rules and the context generate runs in.

    model = open_model("ckpt/", mesh="tensor=2,data=4", dtype="bfloat16")
    with model.context():
        tokens = qwen2vl_jax.generate(model.config, model.params, batch, max_new_tokens=32)
"""
from __future__ import annotations

import dataclasses
import math

import jax

DEFAULT_MESH = "data=-1"  # every local device a batch shard


@dataclasses.dataclass
class Model:
    config: object
    params: dict
    mesh: jax.sharding.Mesh

    def context(self):
        """Generation on `mesh`: jax.set_mesh + sharding.rules.GENERATION_RULES."""
        from sharding.rules import generation_rules

        return generation_rules(self.mesh)


def add_model_flags(parser) -> None:
    parser.add_argument("--mesh", default=DEFAULT_MESH,
                        help="axis=size,... over this host's devices (data, fsdp, tensor; -1 fills), e.g. tensor=4 "
                             "or data=2,tensor=4; weights split over tensor, the batch over data "
                             f"(default {DEFAULT_MESH})")
    parser.add_argument("--dtype", help="cast the weights and compute, e.g. bfloat16 (TPU) or float32 (fastest on "
                                        "CPUs); default: as stored")


def open_model(checkpoint: str, mesh: str = DEFAULT_MESH, dtype: str | None = None) -> Model:
    """Params of `checkpoint` (converted or Hugging Face folder) read straight into their shards on a mesh of this
    process's devices (each device reads only its slice). A `mesh` with a -1 axis spans every local device; one
    without takes the first devices its sizes multiply to."""
    import qwen2vl_jax
    from sharding.mesh import make_mesh, parse_axes
    from sharding.rules import GENERATION_RULES

    axes, devices = parse_axes(mesh), jax.local_devices()
    if -1 not in axes.values():  # a mesh without -1 takes the first devices it needs (data=1: one device)
        wanted = math.prod(axes.values())
        if wanted > len(devices):
            raise ValueError(f"--mesh {mesh} needs {wanted} devices; this process has {len(devices)}")
        devices = devices[:wanted]
    device_mesh = make_mesh(mesh, devices=devices)
    config, params = qwen2vl_jax.load(checkpoint, dtype=dtype, mesh=device_mesh, rules=GENERATION_RULES)
    return Model(config, params, device_mesh)

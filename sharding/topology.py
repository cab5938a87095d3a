"""Which compiler plans a TPU program on a machine without a TPU: XLA:TPU for a compile-only slice, or XLA:CPU.

    devices = tpu_devices("v5e:2x4")                    # 8 compile-only v5e devices (libtpu, no chip)
    default_topology("v5p", 64)                         # "v5p:4x4x4"
    choose_compiler("v5e", None, "auto", 8)             # Compiler("XLA:TPU", "v5e:2x4") when libtpu imports

`jax.experimental.topologies` builds a TPU slice's devices from libtpu alone; a program lowered for a mesh of them
compiles with XLA:TPU (TPU buffer assignment, TPU fusion, async collectives) and cannot run. Names it accepts:
"<chip>:<shape>", 2-D for v5e/v6e (v5e:2x2, v5e:2x4, v5e:4x4, …, v5e:16x16), 3-D for v4/v5p (v5p:2x2x1,
v5p:2x2x2, v5p:4x4x4, v5p:4x4x8, …); at least one host's 2x2 chips."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys

TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
_THREE_D = ("v4", "v5p")  # 3-D torus slices; v5e and v6e are 2-D
CPU_WARNING = ("WARNING: XLA:CPU plan, not a TPU's: its figures overstate a TPU's memory (float32 copies of bf16 "
               "weights, caches and activations: no bf16 matmul on CPU) and follow CPU fusion and buffer assignment; "
               "its collectives are XLA:CPU's partitioning.")


@dataclasses.dataclass(frozen=True)
class Compiler:
    """name: "XLA:TPU" or "XLA:CPU"; topology: the TPU slice compiled for (None on CPU); label: the report's
    "XLA:TPU v5e:2x4" / "XLA:CPU"; reason: why this one was chosen (printed with the plan)."""
    name: str
    topology: str | None = None
    reason: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} {self.topology}" if self.topology else self.name


def libtpu_available() -> bool:
    """Whether libtpu is installed (the `[tpu-plan]` extra): XLA:TPU compiles for compile-only devices."""
    return importlib.util.find_spec("libtpu") is not None


def _prepare_libtpu() -> None:
    """Environment for compile-only use of libtpu on a CPU machine: no cloud metadata server to ask, and other
    processes (tests, planners) may hold libtpu's lockfile at the same time."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of a TPU slice `topology` (e.g. "v5e:2x2"), `num_slices` copies of it (multi-slice: devices carry
    slice_index), for compiling only: libtpu, no TPU needed. → list of compile-only jax devices."""
    _prepare_libtpu()
    from jax.experimental import topologies

    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs).devices)
    except Exception as error:  # no libtpu, or a name it does not know
        raise RuntimeError(f"--topology {topology}: XLA:TPU is unavailable here ({error}); install libtpu "
                           "(`pip install -e '.[tpu-plan]'`, the version jax[tpu] pins) — it compiles without a TPU; "
                           "names look like v5e:2x4 or v5p:2x2x2") from error


def plan_devices(topology: str | None, dcn: str | dict | None = None) -> list | None:
    """The compile-only devices of `topology` (× the slices `dcn` asks for, e.g. "data=2"), or None: a planner's
    mesh then takes this machine's (fake CPU) devices."""
    from sharding.mesh import parse_axes

    return tpu_devices(topology, math.prod(parse_axes(dcn).values() or [1])) if topology else None


def topology_shape(chip: str, chips: int) -> str | None:
    """The most compact slice of `chips` chips (a power of two, ≥ 4) on `chip`: 2-D a×b (b ∈ {a, 2a}) for
    v5e/v6e, 3-D a×b×c (c ≤ 2a) for v4/v5p, with "1" padding a 2-D host (v5p:2x2x1). None when there is none."""
    if chips < 4 or chips & (chips - 1):
        return None
    k = int(math.log2(chips))
    dims = 3 if chip in _THREE_D else 2
    if dims == 3 and chips == 4:
        return "2x2x1"
    sizes = [2 ** (k // dims + (i >= dims - k % dims)) for i in range(dims)]  # e.g. 128 → 4x4x8, 8 → 2x4
    return "x".join(map(str, sizes))


def default_topology(chip: str, devices: int) -> str:
    """The default slice name for `devices` devices of `chip` (one device per chip; v4's compile-only slices may
    give one per TensorCore, checked against libtpu): v5e 8 → "v5e:2x4", v5p 8 → "v5p:2x2x2", v5p 64 →
    "v5p:4x4x4". Raises ValueError naming --topology when no slice has that many devices."""
    if chip not in TPU_CHIPS:
        raise ValueError(f"--chip {chip!r}: not a TPU generation ({', '.join(TPU_CHIPS)})")
    candidates = [f"{chip}:{shape}" for chips in (devices, devices // 2) if (shape := topology_shape(chip, chips))]
    for name in candidates:
        if len(tpu_devices(name)) == devices:
            return name
    raise ValueError(f"no {chip} slice has {devices} devices (a power of two ≥ 4 per slice); pass --topology "
                     f"(e.g. {chip}:{topology_shape(chip, 8)}) with a mesh of that many devices, or --compiler cpu")


def choose_compiler(chip: str | None, topology: str | None, compiler: str = "auto", devices: int = 1) -> Compiler:
    """Which compiler a plan uses. `compiler`: "auto" (XLA:TPU when `topology` is given, or when `chip` names a TPU
    generation and libtpu imports; else XLA:CPU), "tpu" (XLA:TPU or an error) or "cpu" (XLA:CPU, the escape hatch).
    `devices`: devices per slice (the mesh's ICI part), used for the default topology of `chip`."""
    if compiler not in ("auto", "tpu", "cpu"):
        raise ValueError(f"--compiler {compiler!r}: choose auto, tpu or cpu")
    if compiler == "cpu":
        return Compiler("XLA:CPU", reason="--compiler cpu")
    if topology:
        return Compiler("XLA:TPU", topology, "--topology")
    if chip in TPU_CHIPS and libtpu_available():
        try:
            return Compiler("XLA:TPU", default_topology(chip, devices), f"--chip/--hbm {chip}, libtpu installed")
        except ValueError as error:
            if compiler == "tpu":
                raise
            return Compiler("XLA:CPU", reason=f"no default topology: {error}")
    if compiler == "tpu":
        raise ValueError("--compiler tpu needs --topology or a TPU --chip/--hbm, and libtpu "
                         "(pip install -e '.[tpu-plan]')")
    why = "libtpu not installed" if chip in TPU_CHIPS else "no TPU named (--chip/--hbm/--topology)"
    return Compiler("XLA:CPU", reason=why)


def cpu_warning(reason: str = "") -> str:
    """CPU_WARNING with how to get XLA:TPU figures instead, given why XLA:CPU was chosen."""
    if reason == "--compiler cpu":
        hint = "(--compiler cpu)"
    elif libtpu_available():
        hint = "For XLA:TPU figures name the TPU: --chip v5e (or v5p, v4, v6e) or --topology v5e:2x4."
    else:
        hint = "For XLA:TPU figures install libtpu (pip install -e '.[tpu-plan]'; no TPU needed) and name the TPU."
    return f"{CPU_WARNING} {hint}"


def warn_cpu(compiler: Compiler, stream=sys.stderr) -> None:
    """Print the XLA:CPU warning to stderr (the report repeats it on stdout) when the plan is XLA:CPU's."""
    if compiler.name == "XLA:CPU":
        print(cpu_warning(compiler.reason), file=stream)

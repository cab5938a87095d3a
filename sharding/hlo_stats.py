"""What a compiled program communicates: collectives, while loops and matmul FLOPs read from its HLO text.

    compiled = jax.jit(f).lower(*args).compile()
    collectives(compiled)        → [Collective]: every all-gather / all-reduce / reduce-scatter / all-to-all /
                                   collective-permute (an async -start/-done pair counted once, at its -start)
    collective_totals(compiled)  → {kind: {"count", "executions", "bytes", "bytes_per_step", "wire_bytes_per_step"}}
    all_gathers(compiled)        → the all-gathers, largest result first (`largest_all_gather`: the first or None)
    while_loops(compiled)        → [WhileLoop]: trip count (when XLA knows it) and the dynamic slices of its body
    dot_flops(compiled)          → matmul FLOPs per device per step from the dots, × known loop trip counts

The text is the per-device program after SPMD partitioning, so every shape is what ONE device holds, and byte counts
are per device. It reads XLA:CPU's and XLA:TPU's programs (sharding/hlo_parse.py): on TPU the matmuls are mostly
`convolution`s inside fusions and collectives are async (`*-start`/`*-done`, or the same collective repeated in the
start / continuation / done fusions of an async chain), each counted once. Trip counts come from XLA's
`known_trip_count` annotation, else from the loop's counter (`compare` against a constant in the condition, the
initial constant and the step the body adds); loops with traced bounds (the blockwise attention's kv loop) have
none, and anything inside them has `executions=None`. What the text cannot say: which logical array (activation or
weight) a shape is — tests decide that from shapes; how long an overlapped collective takes; and values of
dynamic-slice offsets (only sizes)."""
from __future__ import annotations

import dataclasses
import math
import re

from sharding.hlo_parse import (Array, Instruction, Module, called, executions, parse_arrays,  # noqa: F401
                                parse_hlo, trip_count)

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Collective:
    """kind: one of COLLECTIVES; arrays: its result arrays per device (for -start, those of the matching -done);
    bytes: their total; operand_bytes: its inputs'; group: devices per replica group (None: unknown);
    executions: times one step runs it (trip counts of the loops around it; None if one is unknown);
    wire_bytes: bytes each device sends once, for a bandwidth-optimal ring over `group` devices; op_name: the
    metadata's jax op name ("" when absent)."""
    kind: str
    name: str
    computation: str
    arrays: tuple[Array, ...]
    bytes: int
    operand_bytes: int
    group: int | None
    executions: int | None
    is_async: bool
    op_name: str = ""  # the jax op it came from (HLO metadata), e.g. ".../language_model.embed/jit(_take)/gather"

    @property
    def wire_bytes(self) -> float:
        n = self.group or 1
        if self.kind == "collective-permute":
            return float(self.bytes)
        if n <= 1:
            return 0.0
        factor = {"all-gather": (n - 1) / n, "all-to-all": (n - 1) / n, "all-reduce": 2 * (n - 1) / n,
                  "reduce-scatter": float(n - 1)}[self.kind]
        return factor * self.bytes


@dataclasses.dataclass(frozen=True)
class WhileLoop:
    """A while instruction: body/condition computation names, trip_count (None: not known at compile time),
    executions (how often the loop itself starts per step; None if unknown), depth (0: not inside another loop),
    and slices: (opcode, sliced or updated buffer, slice or update) for every dynamic-slice / dynamic-update-slice /
    gather in the body, the computations it calls included, nested loops' bodies excluded."""
    name: str
    computation: str
    body: str
    condition: str
    trip_count: int | None
    executions: int | None
    depth: int
    slices: tuple[tuple[str, Array, Array], ...]


def _module(program) -> Module:
    if isinstance(program, Module):
        return program
    return parse_hlo(program if isinstance(program, str) else program.as_text())


def _group_size(attributes: str, num_partitions: int) -> int | None:
    groups = re.search(r"replica_groups=(\{\{[^=]*?\}\}|\{\}|\[[\d,]+\]<=\[[\d,]+\](?:T\([\d,]+\))?|mesh\[[^\]]*\]"
                       r"\s*\{[^}]*\})", attributes)
    if not groups:
        return num_partitions if "source_target_pairs" not in attributes else None
    text = groups.group(1)
    if text == "{}":
        return num_partitions
    if text.startswith("{{"):
        return len(text[2:].split("}")[0].split(","))
    if text.startswith("["):
        return int(text[1:].split("]")[0].split(",")[-1])
    sizes = dict((k, int(v)) for k, v in re.findall(r"'([^']+)'=(\d+)", text.split("]")[0]))
    chosen = text.split("]", 1)[1]
    total = 1
    for name, sub in re.findall(r"'([^']+)'(?::\(\d+\)(\d+))?", chosen):
        total *= int(sub) if sub else sizes.get(name, 1)
    return total


def collectives(program) -> list[Collective]:
    """Every collective of a compiled program (or its HLO text), in program order, each once; see `Collective`.
    An async pair (`all-gather-start`/`-done`, `async-start` wrappers) counts once, at its start, with the done's
    result; XLA:TPU's async collective fusions repeat the collective (same channel_id) in the start, continuation
    and done fusions of one computation: counted once."""
    module = _module(program)
    runs = executions(module)
    done_of = {i.operands[0]: i for c in module.computations.values() for i in c
               if i.opcode.endswith("-done") and i.operands}
    found: dict[tuple, list[Instruction]] = {}
    for name, instructions in module.computations.items():
        for i in instructions:
            if _kind(i) in COLLECTIVES:
                channel = re.search(r"\bchannel_id=(\d+)", i.attributes)
                key = (module.home(name), _kind(i), channel.group(1)) if channel else (name, i.name)
                found.setdefault(key, []).append(i)
    return [_collective(module, runs, done_of, copies) for copies in found.values()]


def _kind(instruction: Instruction) -> str:
    return instruction.opcode[:-6] if instruction.opcode.endswith("-start") else instruction.opcode


def _collective(module: Module, runs: dict, done_of: dict, copies: list[Instruction]) -> Collective:
    """One collective from its instruction(s): `copies` are the same collective in an async chain's fusions."""
    i = copies[0]
    arrays = i.arrays
    if i.opcode.endswith("-start"):
        done = done_of.get(i.name)
        arrays = done.arrays if done else arrays[len(arrays) // 2:]
    operand_bytes = sum(a.bytes for o in i.operands if o in module.by_name for a in module.by_name[o].arrays)
    op_name = re.search(r'op_name="([^"]*)"', i.attributes)
    return Collective(_kind(i), i.name, i.computation, arrays, sum(a.bytes for a in arrays), operand_bytes,
                      _group_size(i.attributes, module.num_partitions), runs.get(i.computation, 0),
                      i.opcode.endswith("-start") or len(copies) > 1, op_name.group(1) if op_name else "")


def collective_totals(program) -> dict[str, dict]:
    """Per kind: count (instructions), executions (per step, None if some count is unknown), bytes (result bytes
    per device, each instruction once), bytes_per_step and wire_bytes_per_step (× executions; instructions inside
    loops of unknown trip count counted once, and flagged by executions None). Collectives over groups of one device
    (no communication, e.g. a psum over a size-1 axis) are counted in `trivial` only."""
    totals = {kind: {"count": 0, "executions": 0, "bytes": 0, "bytes_per_step": 0, "wire_bytes_per_step": 0.0,
                     "trivial": 0} for kind in COLLECTIVES}
    for c in collectives(program):
        t = totals[c.kind]
        if c.group == 1:
            t["trivial"] += 1
            continue
        times = 1 if c.executions is None else c.executions
        t["count"] += 1
        t["executions"] = None if t["executions"] is None or c.executions is None else t["executions"] + times
        t["bytes"] += c.bytes
        t["bytes_per_step"] += c.bytes * times
        t["wire_bytes_per_step"] += c.wire_bytes * times
    return totals


def all_gathers(program, min_elements: int = 0) -> list[Collective]:
    """The all-gathers whose result has at least `min_elements` elements (largest array), by bytes, largest first
    (groups of one device, which move nothing, left out)."""
    gathers = [c for c in collectives(program) if c.kind == "all-gather" and c.group != 1
               and max((a.elements for a in c.arrays), default=0) >= min_elements]
    return sorted(gathers, key=lambda c: -c.bytes)


def largest_all_gather(program) -> Collective | None:
    gathers = all_gathers(program)
    return gathers[0] if gathers else None


def while_loops(program) -> list[WhileLoop]:
    """Every while loop of the program, in program order; see `WhileLoop`."""
    module = _module(program)
    runs = executions(module)
    loops = []
    for name, instructions in module.computations.items():
        for i in instructions:
            if i.opcode == "while":
                roles = dict(called(i))
                loops.append((i, roles.get("body"), roles.get("condition")))

    caller = {}  # computation → the computation that calls it (a while body: the loop's computation)
    for name, instructions in module.computations.items():
        for i in instructions:
            for _, callee in called(i):
                caller.setdefault(callee, name)
    bodies = {body for _, body, _ in loops}

    def depth(computation: str, seen=()) -> int:
        if computation not in caller or computation in seen:
            return 0
        return (computation in bodies) + depth(caller[computation], seen + (computation,))

    out = []
    for i, body, condition in loops:
        slices, seen, todo = [], set(), [body]
        while todo:
            name = todo.pop()
            if name in seen or name not in module.computations:
                continue
            seen.add(name)
            for j in module.computations[name]:
                todo += [callee for role, callee in called(j) if role not in ("body", "condition")]
                if j.opcode in ("dynamic-slice", "dynamic-update-slice", "gather") and j.operands:
                    buffer = module.by_name.get(j.operands[0])
                    piece = module.by_name.get(j.operands[1]) if j.opcode == "dynamic-update-slice" else j
                    if buffer and piece and buffer.arrays and piece.arrays:
                        slices.append((j.opcode, buffer.arrays[0], piece.arrays[0]))
        out.append(WhileLoop(i.name, i.computation, body, condition, trip_count(module, i), runs.get(i.computation, 0),
                             depth(i.computation), tuple(slices)))
    return out


def dot_flops(program) -> dict:
    """Matmul FLOPs per device per step: 2 · result elements · MACs per result element for every `dot` and
    `convolution` (XLA:TPU writes matmuls as convolutions, most inside fusions), × the known trip counts around it
    → {"flops": ..., "flops_in_unknown_loops": ... (those counted once), "kernel_calls": Pallas/Mosaic kernel
    launches (XLA:TPU `tpu_custom_call`s, e.g. splash attention: their FLOPs are not in "flops") per step,
    "kernel_flops": the FLOPs those kernels declare in a cost estimate, where they do, × trip counts}."""
    module = _module(program)
    runs = executions(module)
    known, unknown, kernels, calls = 0.0, 0.0, 0.0, 0
    for name, instructions in module.computations.items():
        if name not in runs:  # never run (a computation only a dead instruction names)
            continue
        for i in instructions:
            flops = _matmul_flops(module, i)
            mosaic = i.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in i.attributes
            kernel = _kernel_flops(i) if mosaic else 0.0
            if runs[name] is None:
                unknown += flops
            else:
                known += flops * runs[name]
                kernels += kernel * runs[name]
                calls += mosaic * runs[name]
    return {"flops": known, "flops_in_unknown_loops": unknown, "kernel_calls": calls, "kernel_flops": kernels}


def _matmul_flops(module: Module, i: Instruction) -> float:
    """2 · multiply-adds of a dot (result elements · ∏ lhs contracting dims) or a convolution (_convolution_macs);
    0 for anything else."""
    if i.opcode not in ("dot", "convolution") or not i.arrays or len(i.operands) < 2:
        return 0.0
    lhs, rhs = (module.by_name.get(o) for o in i.operands[:2])
    if lhs is None or rhs is None or not lhs.arrays or not rhs.arrays:
        return 0.0
    if i.opcode == "convolution":
        return 2.0 * _convolution_macs(i.attributes, lhs.arrays[0].shape, rhs.arrays[0].shape, i.arrays[0].shape)
    dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attributes)
    macs = math.prod(lhs.arrays[0].shape[int(d)] for d in dims.group(1).split(",") if d) if dims else 1
    return 2.0 * i.arrays[0].elements * macs


def _convolution_macs(attributes: str, lhs: tuple, kernel: tuple, out: tuple) -> int:
    """Multiply-adds of a convolution: (batch × output features) · kernel input features (per feature group) ·
    ∏ over spatial dims of the (output position, window tap) pairs that land on the input. XLA:TPU writes matmuls as
    convolutions whose spatial dims are batch or broadcast dims (size-1 inputs padded to the window: one valid tap
    per output position, not the whole window), so the taps are counted, not assumed. 0 if unreadable."""
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", attributes)
    if not labels or not all(len(l) == len(s) for l, s in zip(labels.groups(), (lhs, kernel, out))):
        return 0
    lhs_l, kernel_l, out_l = labels.groups()
    spatial = sorted(c for c in out_l if c.isdigit())
    window = _window(attributes, len(spatial))
    macs = math.prod(out) // math.prod(out[out_l.index(d)] for d in spatial) * kernel[kernel_l.index("i")]
    for n, d in enumerate(spatial):
        macs *= _taps(lhs[lhs_l.index(d)], kernel[kernel_l.index(d)], out[out_l.index(d)],
                      *(window[key][n] for key in ("pad", "stride", "lhs_dilate", "rhs_dilate")))
    return macs


def _window(attributes: str, dims: int) -> dict:
    """A convolution's window={size=.. pad=lo_hi.. stride=.. lhs_dilate=.. rhs_dilate=..} per spatial dim
    (defaults: pad 0, stride and dilations 1)."""
    text = re.search(r"window=\{([^}]*)\}", attributes)
    fields = dict(re.findall(r"(\w+)=([\dx_]+)", text.group(1))) if text else {}
    read = lambda key, default: [int(v.split("_")[0]) for v in fields[key].split("x")] if key in fields else \
        [default] * dims
    return {"pad": read("pad", 0), "stride": read("stride", 1), "lhs_dilate": read("lhs_dilate", 1),
            "rhs_dilate": read("rhs_dilate", 1)}


def _taps(size: int, window: int, outputs: int, pad_low: int, stride: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dim that read an input element (not padding or a
    dilation hole)."""
    extent = (size - 1) * lhs_dilate + 1
    if outputs * window > 1 << 22:  # a real, large convolution: every tap, edges ignored
        return outputs * min(window, size)
    return sum(1 for o in range(outputs) for k in range(window)
               if 0 <= (p := o * stride + k * rhs_dilate - pad_low) < extent and p % lhs_dilate == 0)


def _kernel_flops(i: Instruction) -> float:
    """The FLOPs a Mosaic kernel's custom call declares (its backend_config's cost estimate), else 0."""
    flops = re.search(r'"cost_estimate"\s*:\s*\{[^}]*"flops"\s*:\s*"?(\d+)', i.attributes)
    return float(flops.group(1)) if flops else 0.0

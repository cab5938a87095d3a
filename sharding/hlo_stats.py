"""What a compiled program communicates: collectives, while loops and matmul FLOPs read from its HLO text.

    compiled = jax.jit(f).lower(*args).compile()
    collectives(compiled)        → [Collective]: every all-gather / all-reduce / reduce-scatter / all-to-all /
                                   collective-permute (an async -start/-done pair counted once, at its -start)
    collective_totals(compiled)  → {kind: {"count", "executions", "bytes", "bytes_per_step", "wire_bytes_per_step"}}
    all_gathers(compiled)        → the all-gathers, largest result first (`largest_all_gather`: the first or None)
    while_loops(compiled)        → [WhileLoop]: trip count (when XLA knows it) and the dynamic slices of its body
    dot_flops(compiled)          → matmul FLOPs per device per step from the dots, × known loop trip counts

The text is the per-device program after SPMD partitioning, so every shape is what ONE device holds, and byte counts
are per device. Trip counts come from XLA's own `known_trip_count` annotation (or, failing that, a `compare` against
one integer constant in the loop condition with `known_init_step`); loops with traced bounds (the blockwise
attention's kv loop) have none, and anything inside them has `executions=None`. What the text cannot say: which
logical array (activation or weight) a shape is — tests decide that from shapes; how XLA:TPU would combine, split or
overlap the same collectives (this is XLA:CPU's schedule); and values of dynamic-slice offsets (only sizes)."""
from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_SHAPE_LEAF = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of a (possibly tuple) HLO shape: element type (`f32`, `bf16`, `s32`, `pred`, …) and dims."""
    dtype: str
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def bytes(self) -> int:
        return -(-self.elements * _bits(self.dtype) // 8)

    def __str__(self):
        return f"{self.dtype}[{','.join(map(str, self.shape))}]"


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    arrays: tuple[Array, ...]  # the result shape's leaves (one for an array, several for a tuple)
    operands: tuple[str, ...]  # operand instruction names
    attributes: str            # the raw text after the operand list
    computation: str


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


@dataclasses.dataclass
class Module:
    """A parsed HLO module: computations (name → instructions, in order), the entry's name, num_partitions."""
    computations: dict[str, list[Instruction]]
    entry: str
    num_partitions: int
    by_name: dict[str, Instruction]


def _bits(dtype: str) -> int:
    if dtype == "pred":
        return 8
    match = re.match(r"[a-z]+(\d+)", dtype)
    return int(match.group(1)) if match else 0  # token[], opaque: no data


def parse_arrays(shape: str) -> tuple[Array, ...]:
    """'(f32[8,128]{1,0}, (s32[], bf16[<=4,2]))' → (Array('f32', (8, 128)), Array('s32', ()), Array('bf16', (4, 2)))."""
    return tuple(Array(dtype, tuple(int(d.strip().lstrip("<=")) for d in dims.split(",") if d.strip()))
                 for dtype, dims in _SHAPE_LEAF.findall(shape))


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] ('(', '[' or '{')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    closing = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            closing.append(pairs[c])
        elif closing and c == closing[-1]:
            closing.pop()
            if not closing:
                return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets."""
    parts, depth, current = [], 0, []
    for c in text:
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    if "".join(current).strip():
        parts.append("".join(current))
    return parts


def _instruction(line: str, computation: str) -> Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    name, rest = match.group(1), match.group(2).strip()
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        shape = re.match(r"[a-z][a-z0-9]*\[[^\]]*\](\{[^}]*\})?", rest)
        if not shape:
            return None
        end = shape.end()
    arrays, rest = parse_arrays(rest[:end]), rest[end:].strip()
    opcode = re.match(r"([\w\-]+)\(", rest)
    if not opcode:
        return None
    close = _balanced(rest, opcode.end() - 1)
    operands = tuple(m.group(1) for part in _split_top(rest[opcode.end():close - 1])
                     if (m := re.search(r"%?([\w.\-]+)\s*$", part.strip())))
    return Instruction(name, opcode.group(1), arrays, operands, rest[close:], computation)


def parse_hlo(text: str) -> Module:
    """Parse HLO text (`compiled.as_text()`) into computations of instructions; unknown lines are skipped."""
    text = re.sub(r"/\*.*?\*/", "", text)
    partitions = re.search(r"num_partitions=(\d+)", text)
    computations, by_name, entry, current = {}, {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None and (instruction := _instruction(line, current)):
            computations[current].append(instruction)
            by_name[instruction.name] = instruction
    if entry is None and computations:
        entry = list(computations)[-1]
    return Module(computations, entry, int(partitions.group(1)) if partitions else 1, by_name)


def _module(program) -> Module:
    if isinstance(program, Module):
        return program
    return parse_hlo(program if isinstance(program, str) else program.as_text())


def _called(instruction: Instruction) -> list[tuple[str, str]]:
    """(role, computation) pairs an instruction calls: body/condition of a while, fusion calls, to_apply, …"""
    out = [(role, name) for role, name in _CALLED.findall(instruction.attributes)]
    for role, names in _CALLED_LIST.findall(instruction.attributes):
        out += [(role, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
    return out


def trip_count(module: Module, instruction: Instruction) -> int | None:
    """A while instruction's trip count: XLA's known_trip_count, else (condition constant − init) / step."""
    known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', instruction.attributes)
    if known:
        return int(known.group(1))
    init_step = re.search(r'"known_init_step"\s*:\s*\{\s*"init"\s*:\s*"?(-?\d+)"?\s*,\s*"step"\s*:\s*"?(-?\d+)',
                          instruction.attributes)
    condition = dict(_called(instruction)).get("condition")
    if not init_step or condition not in module.computations:
        return None
    names = [condition] + [c for i in module.computations[condition] for _, c in _called(i)]
    body = [i for n in names for i in module.computations.get(n, [])]
    constants = [int(i.operands[0]) for i in body if i.opcode == "constant" and len(i.arrays) == 1
                 and i.arrays[0].shape == () and i.arrays[0].dtype[0] in "su" and i.operands
                 and re.fullmatch(r"-?\d+", i.operands[0])]
    compares = [i for i in body if i.opcode == "compare" and "direction=LT" in i.attributes]
    init, step = int(init_step.group(1)), int(init_step.group(2))
    if len(constants) != 1 or len(compares) != 1 or step <= 0:
        return None
    return max(0, -(-(constants[0] - init) // step))


def _executions(module: Module) -> dict[str, int | None]:
    """How many times one run of the entry runs each computation (summed over call sites; None: unknown)."""
    runs: dict[str, int | None] = {}

    def visit(name: str, times: int | None, stack: tuple):
        if name not in module.computations or name in stack:
            return
        previous = runs.get(name, 0)
        runs[name] = None if previous is None or times is None else previous + times
        for instruction in module.computations[name]:
            trips = trip_count(module, instruction) if instruction.opcode == "while" else 1
            for role, callee in _called(instruction):
                inner = times if role not in ("body", "condition") else (
                    None if times is None or trips is None else times * (trips + (role == "condition")))
                visit(callee, inner, stack + (name,))

    visit(module.entry, 1, ())
    return runs


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
    """Every collective of a compiled program (or its HLO text), in program order; see `Collective`."""
    module = _module(program)
    runs = _executions(module)
    done_of = {i.operands[0]: i for c in module.computations.values() for i in c
               if i.opcode.endswith("-done") and i.operands}
    out = []
    for name, instructions in module.computations.items():
        for i in instructions:
            kind = i.opcode[:-6] if i.opcode.endswith("-start") else i.opcode
            if kind not in COLLECTIVES:
                continue
            arrays = i.arrays
            if i.opcode.endswith("-start"):
                done = done_of.get(i.name)
                arrays = done.arrays if done else arrays[len(arrays) // 2:]
            operand_bytes = sum(a.bytes for o in i.operands if o in module.by_name for a in module.by_name[o].arrays)
            total = sum(a.bytes for a in arrays)
            out.append(Collective(kind, i.name, name, arrays, total, operand_bytes,
                                  _group_size(i.attributes, module.num_partitions), runs.get(name, 0),
                                  i.opcode.endswith("-start"),
                                  (re.search(r'op_name="([^"]*)"', i.attributes) or re.match("()", "")).group(1)))
    return out


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
    runs = _executions(module)
    loops = []
    for name, instructions in module.computations.items():
        for i in instructions:
            if i.opcode == "while":
                called = dict(_called(i))
                loops.append((i, called.get("body"), called.get("condition")))

    caller = {}  # computation → the computation that calls it (a while body: the loop's computation)
    for name, instructions in module.computations.items():
        for i in instructions:
            for _, callee in _called(i):
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
                todo += [callee for role, callee in _called(j) if role not in ("body", "condition")]
                if j.opcode in ("dynamic-slice", "dynamic-update-slice", "gather") and j.operands:
                    buffer = module.by_name.get(j.operands[0])
                    piece = module.by_name.get(j.operands[1]) if j.opcode == "dynamic-update-slice" else j
                    if buffer and piece and buffer.arrays and piece.arrays:
                        slices.append((j.opcode, buffer.arrays[0], piece.arrays[0]))
        out.append(WhileLoop(i.name, i.computation, body, condition, trip_count(module, i), runs.get(i.computation, 0),
                             depth(i.computation), tuple(slices)))
    return out


def dot_flops(program) -> dict:
    """Matmul FLOPs per device per step: 2 · result elements · contracted size for every dot, × the known trip
    counts around it → {"flops": ..., "flops_in_unknown_loops": ... (those dots counted once)}. Convolutions and
    custom calls (e.g. a TPU kernel) are not counted."""
    module = _module(program)
    runs = _executions(module)
    known, unknown = 0.0, 0.0
    for name, instructions in module.computations.items():
        for i in instructions:
            if i.opcode != "dot" or not i.arrays or not i.operands or i.operands[0] not in module.by_name:
                continue
            lhs = module.by_name[i.operands[0]].arrays[0].shape
            dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attributes)
            contracted = math.prod(lhs[int(d)] for d in dims.group(1).split(",") if d) if dims else 1
            flops = 2.0 * i.arrays[0].elements * contracted
            if runs.get(name) is None:
                unknown += flops
            else:
                known += flops * runs[name]
    return {"flops": known, "flops_in_unknown_loops": unknown}

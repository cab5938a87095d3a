"""HLO text (`compiled.as_text()`) → computations of instructions, the call graph, loop trip counts and how often
one run of the program runs each computation. sharding/hlo_stats.py reads its statistics from these.

Both compilers' dialects: XLA:CPU (plain instructions, `known_trip_count` on loops) and XLA:TPU (most work inside
`fusion` computations, layouts with tiling `{1,0:T(8,128)(2,1)S(1)}`, loops without trip-count annotations whose
counter is `copy(constant)` in, `add(counter, constant)` around and `compare(counter, constant)` in the condition;
async collectives as fusions around `AsyncCollectiveStart`/`-Done` custom calls)."""
from __future__ import annotations

import dataclasses
import math
import re

_SHAPE_LEAF = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLED_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
_PASS_THROUGH = ("copy", "bitcast", "convert", "reshape")  # ops that keep a scalar loop counter's value
_NOT_RUN = ("async-update", "async-done")  # they name the computation async-start runs; it runs once


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
    operands: tuple[str, ...]  # operand instruction names (a constant's: its literal)
    attributes: str            # the raw text after the operand list
    computation: str
    root: bool = False         # the computation's ROOT


@dataclasses.dataclass
class Module:
    """A parsed HLO module: computations (name → instructions, in order), the entry's name, num_partitions, every
    instruction by name, and callers (computation → the instructions that call it, in program order)."""
    computations: dict[str, list[Instruction]]
    entry: str
    num_partitions: int
    by_name: dict[str, Instruction]
    callers: dict[str, list[Instruction]] = dataclasses.field(default_factory=dict)

    def root(self, computation: str) -> Instruction | None:
        instructions = self.computations.get(computation, [])
        return next((i for i in instructions if i.root), instructions[-1] if instructions else None)

    def home(self, computation: str) -> str:
        """The computation a fused computation's work is scheduled in: up through `fusion` callers (itself if it is
        not fused). Async start/continuation/done fusions of one collective share their home."""
        seen = set()
        while computation not in seen and (callers := self.callers.get(computation)) \
                and callers[0].opcode == "fusion":
            seen.add(computation)
            computation = callers[0].computation
        return computation


def _bits(dtype: str) -> int:
    if dtype == "pred":
        return 8
    match = re.match(r"[a-z]+(\d+)", dtype)
    return int(match.group(1)) if match else 0  # token[], opaque: no data


def parse_arrays(shape: str) -> tuple[Array, ...]:
    """'(f32[8,128]{1,0}, (s32[], bf16[<=4,2]))' →
    (Array('f32', (8, 128)), Array('s32', ()), Array('bf16', (4, 2)))."""
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
    root, name, rest = bool(match.group(1)), match.group(2), match.group(3).strip()
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
    return Instruction(name, opcode.group(1), arrays, operands, rest[close:], computation, root)


def parse_hlo(text: str) -> Module:
    """Parse HLO text (`compiled.as_text()`) into computations of instructions; unknown lines are skipped. An
    instruction may span lines (a Mosaic kernel's multi-line frontend attributes): lines that start no instruction
    continue the one before."""
    text = re.sub(r"/\*.*?\*/", "", text)
    partitions = re.search(r"num_partitions=(\d+)", text)
    computations, by_name, entry, current, pending = {}, {}, None, None, []

    def flush():
        if current is not None and pending and (instruction := _instruction(" ".join(pending), current)):
            computations[current].append(instruction)
            by_name[instruction.name] = instruction
        pending.clear()

    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            flush()
            current = header.group(2)
            computations[current] = []
            entry = current if header.group(1) else entry
        elif line.rstrip() == "}":
            flush()
            current = None
        elif current is not None and _INSTRUCTION.match(line):
            flush()
            pending.append(line)
        elif current is not None and pending:
            pending.append(line.strip())
    flush()
    if entry is None and computations:
        entry = list(computations)[-1]
    module = Module(computations, entry, int(partitions.group(1)) if partitions else 1, by_name)
    for instructions in computations.values():
        for i in instructions:
            for _, callee in called(i):
                module.callers.setdefault(callee, []).append(i)
    return module


def called(instruction: Instruction) -> list[tuple[str, str]]:
    """(role, computation) pairs an instruction calls: body/condition of a while, fusion calls, to_apply, …"""
    out = [(role, name) for role, name in _CALLED.findall(instruction.attributes)]
    for role, names in _CALLED_LIST.findall(instruction.attributes):
        out += [(role, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
    return out


def _int_constant(instruction: Instruction | None) -> int | None:
    if (instruction is not None and instruction.opcode == "constant" and len(instruction.arrays) == 1
            and instruction.arrays[0].shape == () and instruction.arrays[0].dtype[0] in "su" and instruction.operands
            and re.fullmatch(r"-?\d+", instruction.operands[0])):
        return int(instruction.operands[0])
    return None


def _trace(module: Module, name: str, depth: int = 0) -> tuple[str, int] | None:
    """What a scalar loop-counter value is: ("constant", value) or ("element", tuple index of the computation's
    parameter), through copies/converts, get-tuple-element of a parameter, and fusion parameters (to the fusion's
    operand). None otherwise."""
    i = module.by_name.get(name)
    if i is None or depth > 32:
        return None
    if (value := _int_constant(i)) is not None:
        return "constant", value
    if i.opcode in _PASS_THROUGH and i.operands:
        return _trace(module, i.operands[0], depth + 1)
    if i.opcode == "get-tuple-element" and i.operands:
        source = module.by_name.get(i.operands[0])
        index = re.search(r"index=(\d+)", i.attributes)
        fused = (callers := module.callers.get(i.computation)) and callers[0].opcode == "fusion"
        if source is not None and source.opcode == "parameter" and index and not fused:
            return "element", int(index.group(1))
    if i.opcode == "parameter" and (callers := module.callers.get(i.computation)) and callers[0].opcode == "fusion":
        number = int(i.operands[0]) if i.operands and i.operands[0].isdigit() else -1
        if 0 <= number < len(callers[0].operands):
            return _trace(module, callers[0].operands[number], depth + 1)
    if i.opcode == "fusion" and (root := module.root(dict(called(i)).get("calls", ""))) is not None:
        return _trace(module, root.name, depth + 1)
    return None


def _counter_from_condition(module: Module, condition: str) -> tuple[int, int] | None:
    """(tuple index of the loop counter, bound) from a condition `counter < constant` (or `constant > counter`)."""
    root = module.root(condition)
    if root is not None and root.opcode == "fusion":
        root = module.root(dict(called(root)).get("calls", ""))
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    a, b = (_trace(module, o) for o in root.operands)
    direction = re.search(r"direction=(\w+)", root.attributes)
    direction = direction.group(1) if direction else ""
    if direction == "GT":
        a, b, direction = b, a, "LT"
    if direction == "LT" and a and b and a[0] == "element" and b[0] == "constant":
        return a[1], b[1]
    return None


def _counter_step(module: Module, body: str, index: int) -> int | None:
    """The constant a loop body adds to tuple element `index` (the root tuple's operand: add(counter, constant))."""
    root = module.root(body)
    if root is None or root.opcode != "tuple" or index >= len(root.operands):
        return None
    add = module.by_name.get(root.operands[index])
    while add is not None and add.opcode in _PASS_THROUGH and add.operands:
        add = module.by_name.get(add.operands[0])
    if add is None or add.opcode != "add" or len(add.operands) != 2:
        return None
    traced = sorted((_trace(module, o) or ("", 0)) for o in add.operands)
    if traced[0][0] == "constant" and traced[1] == ("element", index):
        return traced[0][1]
    return None


def _counter_init(module: Module, instruction: Instruction, index: int) -> int | None:
    """The initial value of tuple element `index` of a while's operand (a tuple of constants or their copies)."""
    operand = module.by_name.get(instruction.operands[0]) if instruction.operands else None
    if operand is None or operand.opcode != "tuple" or index >= len(operand.operands):
        return None
    traced = _trace(module, operand.operands[index])
    return traced[1] if traced and traced[0] == "constant" else None


def trip_count(module: Module, instruction: Instruction) -> int | None:
    """A while instruction's trip count: XLA's known_trip_count; else (bound − init) / step with init and step
    from XLA's known_init_step or, as XLA:TPU leaves them, from the loop's own counter (see the module docstring)."""
    known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', instruction.attributes)
    if known:
        return int(known.group(1))
    roles = dict(called(instruction))
    counter = _counter_from_condition(module, roles.get("condition", ""))
    if counter is None:
        return None
    index, bound = counter
    init_step = re.search(r'"known_init_step"\s*:\s*\{\s*"init"\s*:\s*"?(-?\d+)"?\s*,\s*"step"\s*:\s*"?(-?\d+)',
                          instruction.attributes)
    if init_step:
        init, step = int(init_step.group(1)), int(init_step.group(2))
    else:
        init, step = _counter_init(module, instruction, index), _counter_step(module, roles.get("body", ""), index)
    if init is None or step is None or step <= 0:
        return None
    return max(0, -(-(bound - init) // step))


def executions(module: Module) -> dict[str, int | None]:
    """How many times one run of the entry runs each computation (summed over call sites; None: unknown;
    computations never reached are absent)."""
    runs: dict[str, int | None] = {}

    def visit(name: str, times: int | None, stack: tuple):
        if name not in module.computations or name in stack:
            return
        previous = runs.get(name, 0)
        runs[name] = None if previous is None or times is None else previous + times
        for instruction in module.computations[name]:
            if instruction.opcode in _NOT_RUN:
                continue
            trips = trip_count(module, instruction) if instruction.opcode == "while" else 1
            for role, callee in called(instruction):
                inner = times if role not in ("body", "condition") else (
                    None if times is None or trips is None else times * (trips + (role == "condition")))
                visit(callee, inner, stack + (name,))

    visit(module.entry, 1, ())
    return runs

"""Reading optimised HLO text (``compiled.as_text()``): computations, instructions, and how often each
computation runs.

:func:`parse_module` splits the module into computations of instructions (result arrays with their
memory space, operands, attributes; an instruction may span lines). :func:`multiplicities` gives each
computation's number of executions per call of the program: the entry runs once, a ``while`` body
as many times as its trip count (``known_trip_count``, or the constant its condition compares the
induction variable with), anything else as often as its callers.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
    "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e3m4": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1, "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$", re.DOTALL)
_HEADER = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%([^\s,)}]+)")
_CALLEE_LIST = re.compile(r"\b(branch_computations|called_computations)=\{([^}]*)\}")
@dataclasses.dataclass(frozen=True)
class Array:
    dtype: str
    dims: tuple[int, ...]
    memory_space: int = 0

    @property
    def bytes(self) -> float:
        return DTYPE_BYTES.get(self.dtype, 4) * math.prod(self.dims)


@dataclasses.dataclass
class Instruction:
    name: str
    opcode: str
    arrays: list[Array]  # the result (several for a tuple)
    operands: list[str]
    args: str  # the text between the opcode's parentheses (a constant's literal)
    attrs: str

    @property
    def out_bytes(self) -> float:
        return sum(a.bytes for a in self.arrays)


@dataclasses.dataclass
class Computation:
    name: str
    is_entry: bool
    instructions: list[Instruction]
    symbols: dict[str, Instruction]


def _parse_arrays(text: str) -> list[Array]:
    out = []
    for dtype, dims, layout in _ARRAY.findall(text):
        if dtype not in DTYPE_BYTES:
            continue
        space = re.search(r"S\((\d+)\)", layout or "")
        out.append(Array(dtype, tuple(int(d) for d in dims.split(",") if d), int(space.group(1)) if space else 0))
    return out


def _matching(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def _parse_instruction(line: str) -> Instruction | None:
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    name, rest = match.groups()
    if rest.startswith("("):  # tuple-shaped result
        end = _matching(rest, 0)
        shape, rest = rest[: end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    paren = rest.find("(")
    if paren < 0:
        return None
    opcode = rest[:paren].strip()
    end = _matching(rest, paren)
    args = rest[paren + 1: end]
    return Instruction(name, opcode, _parse_arrays(shape), re.findall(r"%([^\s,)]+)", args), args, rest[end + 1:])


def parse_module(text: str) -> dict[str, Computation]:
    """The computations of an HLO module's text, by name (an instruction may span several lines:
    custom calls carry multi-line backend configs)."""
    computations: dict[str, Computation] = {}
    current, pending = None, None

    def flush():
        if pending is not None:
            instruction = _parse_instruction(pending)
            if instruction is not None:
                current.instructions.append(instruction)
                current.symbols[instruction.name] = instruction

    for line in text.splitlines():
        if current is None:
            header = _HEADER.match(line)
            if header and line.rstrip().endswith("{"):
                current, pending = Computation(header.group(2), bool(header.group(1)), [], {}), None
            continue
        if line.rstrip() == "}":
            flush()
            computations[current.name] = current
            current, pending = None, None
        elif _INSTRUCTION.match(line):
            flush()
            pending = line
        elif pending is not None:
            pending += "\n" + line
    return computations


def callees(instruction: Instruction) -> list[tuple[str, str]]:
    found = [(kind, name) for kind, name in _CALLEE.findall(instruction.attrs)]
    for kind, names in _CALLEE_LIST.findall(instruction.attrs):
        found += [(kind, n.strip().lstrip("%")) for n in names.split(",") if n.strip()]
    return found


def trip_count(instruction: Instruction, computations: dict[str, Computation]) -> int | None:
    known = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', instruction.attrs)
    if known:
        return int(known.group(1))
    condition = dict(callees(instruction)).get("condition")
    comp = computations.get(condition or "")
    if comp is None or not comp.instructions:
        return None
    root = comp.instructions[-1]
    if root.opcode != "compare":
        return None
    direction = re.search(r"direction=(\w+)", root.attrs)
    for operand in root.operands:
        source = comp.symbols.get(operand)
        if source is not None and source.opcode == "constant" and re.fullmatch(r"-?\d+", source.args.strip()):
            n = int(source.args)
            return n + 1 if direction and direction.group(1) == "LE" else n
    return None


def multiplicities(computations: dict[str, Computation]) -> tuple[dict[str, float], set[str], list[int], int]:
    """``(multiplicity per computation, names of computations whose instructions run one by one
    (entry, loop bodies, called computations; not fusion bodies or reducers), trip counts, unknown)``."""
    entry = next((c for c in computations.values() if c.is_entry), None)
    if entry is None:
        raise ValueError("the HLO text has no ENTRY computation")
    edges: dict[str, list[tuple[str, float, bool]]] = collections.defaultdict(list)
    trips, unknown = [], 0
    for comp in computations.values():
        for inst in comp.instructions:
            trip = None
            if inst.opcode == "while":
                trip = trip_count(inst, computations)
                if trip is None:
                    unknown += 1
                else:
                    trips.append(trip)
            for kind, callee in callees(inst):
                if callee not in computations:
                    continue
                factor = float(trip if trip is not None else 1) if kind in ("body", "condition") else 1.0
                sequential = kind in ("body", "condition", "branch_computations") or inst.opcode in ("call", "async-start")
                edges[comp.name].append((callee, factor, sequential))
    order, seen = [], set()

    def visit(name):  # post-order DFS from the entry
        seen.add(name)
        for callee, _, _ in edges.get(name, ()):
            if callee not in seen:
                visit(callee)
        order.append(name)

    visit(entry.name)
    mult = collections.defaultdict(float)
    mult[entry.name] = 1.0
    sequential = {entry.name}
    for name in reversed(order):  # callers before callees
        for callee, factor, seq in edges.get(name, ()):
            mult[callee] += mult[name] * factor
            if seq and name in sequential:
                sequential.add(callee)
    return dict(mult), sequential, trips, unknown



__all__ = ["Array", "Computation", "DTYPE_BYTES", "Instruction", "callees", "multiplicities", "parse_module", "trip_count"]

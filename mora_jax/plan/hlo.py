"""What a compiled step does, read from its optimised HLO text (``compiled.as_text()``).

XLA's ``cost_analysis()`` counts the body of a ``while`` loop once, so the FLOPs and bytes of a
model whose layers run under ``nn.scan`` (or whose micro-batches run under ``lax.scan``) come out
per-layer undercounts. :func:`analyze` reads the HLO module instead and weighs every instruction
by how often it runs (:func:`mora_jax.plan.hlo_parse.multiplicities`: a loop body by its trip
count). From that it counts, per device:

* matmul FLOPs: ``dot`` and ``convolution`` (what TPU HLO turns dots into), ``2 × output elements ×
  contracted size``;
* HBM traffic: operands and results of the instructions that run at the top level of a loop or the
  entry (each fusion reads its operands and writes its result once), leaving out buffers in on-chip
  memory (layouts in memory space ``S(1)``) and instructions that move nothing (``bitcast``,
  ``get-tuple-element``, ...);
* where that traffic goes: the bytes grouped by the JAX operation each instruction comes from
  (its ``op_name`` metadata, :func:`op_label`: forward, backward or recomputed, and the last
  module path and primitive), the largest groups kept (``hbm_bytes_by_op``);
* dequantization of a quantized base: the elements converted from integer codes (``s4``, ``u4``,
  ``s8``, ``u8``) to floats (``dequant_elements``) and the HBM bytes read of such codes
  (``code_hbm_bytes``: the int8 / 4-bit weight reads, part of ``hbm_bytes``);
* custom kernels (Pallas ``tpu_custom_call``s, e.g. flash attention) by name: their FLOPs are
  inside the kernel, invisible here (the planner adds them from the FLOP model);
* collectives by kind (``all-gather``, ``reduce-scatter``, ``all-reduce``, ``all-to-all``,
  ``collective-permute``): count, bytes, the group size and the bytes a chip sends in a ring
  algorithm (``wire_bytes``). TPU HLO runs a collective as several "async collective fusions" that
  share its channel id and each name its whole result; they count once, as often as the least
  repeated of them runs.

:func:`kernel_gradient_dots` finds backward dots whose result has a kernel's shape: the weight
gradients a frozen kernel must never get.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Iterable, Sequence

from mora_jax.plan.hlo_parse import Array, Computation, Instruction, callees, multiplicities, parse_module

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
# Instructions that read or write no HBM of their own (aliases, control flow, bookkeeping).
_NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
    "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "iota",
}


@dataclasses.dataclass
class HloStats:
    """Per-device totals of one compiled program, loops weighed by their trip counts."""

    matmul_flops: float
    hbm_bytes: float
    collectives: dict[str, dict]
    loop_trip_counts: list[int]
    unknown_trip_counts: int
    num_partitions: int
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)  # custom kernels (Pallas) run, by name
    hbm_bytes_by_op: dict[str, float] = dataclasses.field(default_factory=dict)  # largest groups, see op_label
    dequant_elements: float = 0.0  # integer codes converted to floats (dequantization), loops weighed
    code_hbm_bytes: float = 0.0  # HBM bytes read of integer-code arrays (a quantized base's weights)

    @property
    def wire_bytes(self) -> float:
        return sum(c["wire_bytes"] for c in self.collectives.values())


# op_name path pieces that say how JAX got there, not what runs
_PATH_NOISE = ("jit(", "jvp(", "transpose(", "closed_call", "while", "body", "checkpoint", "rematted_computation",
               "cond", "branch_")
TOP_OPS = 15


def op_label(inst: Instruction) -> str:
    """``"forward: mlp/down_proj/reduce_sum"``: the pass (forward, backward, or recomputed for the
    backward by remat) and the last three pieces of the instruction's JAX ``op_name``; instructions
    without one (XLA's own copies and collectives) by opcode."""
    meta = re.search(r'op_name="([^"]*)"', inst.attrs)
    if meta is None:
        return f"xla: {inst.opcode}"
    parts = meta.group(1).split("/")
    where = ("recomputed" if "rematted_computation" in parts
             else "backward" if any(p.startswith("transpose(") for p in parts) else "forward")
    path = [p for i, p in enumerate(parts) if p and not p.startswith(_PATH_NOISE) and p != parts[i - 1]]
    return f"{where}: {'/'.join(path[-3:]) or inst.opcode}"


def _group_size(attrs: str, num_partitions: int) -> int:
    mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if mesh:
        sizes = dict((k.strip().strip("'\""), int(v)) for k, v in re.findall(r"([^,=]+)=(\d+)", mesh.group(1)))
        axes = [a.strip().strip("'\"") for a in mesh.group(2).split(",") if a.strip()]
        return math.prod(sizes.get(a, 1) for a in axes) if axes else num_partitions
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)
    if iota:
        return int(iota.group(2))
    explicit = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if explicit:
        return len([x for x in explicit.group(1).split(",") if x.strip()])
    return num_partitions


def _collective_kind(opcode: str) -> str | None:
    base = opcode[:-6] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES else None


def _operand_bytes(inst: Instruction, comp: Computation) -> float:
    return sum(sum(a.bytes for a in source.arrays) for name in inst.operands
               if (source := comp.symbols.get(name)) is not None)


def _hbm(arrays: Sequence[Array]) -> float:
    return sum(a.bytes for a in arrays if a.memory_space == 0)


_SLICING = ("dynamic-slice", "slice", "gather")


# Integer dtypes a quantized base stores its codes in (converted to floats to dequantize).
CODE_DTYPES = ("s4", "u4", "s8", "u8", "s2", "u2")


def _hbm_traffic(inst: Instruction, comp: Computation, computations: dict[str, Computation]) -> float:
    """HBM bytes an instruction that runs on its own reads and writes: its operands and result in
    HBM, except that slicing reads only the slice and an in-place ``dynamic-update-slice`` (alone or
    as a fusion's root) writes only the update."""
    reads, write = _hbm_reads_writes(inst, comp, computations)
    return sum(reads) + write


def _code_reads(inst: Instruction, comp: Computation, computations: dict[str, Computation]) -> float:
    """The part of :func:`_hbm_traffic` that reads integer-code arrays."""
    reads, _ = _hbm_reads_writes(inst, comp, computations)
    total = 0.0
    for read, name in zip(reads, inst.operands):
        source = comp.symbols.get(name)
        if source is not None and source.arrays and all(a.dtype in CODE_DTYPES for a in source.arrays):
            total += read
    return total


def _hbm_reads_writes(inst: Instruction, comp: Computation,
                      computations: dict[str, Computation]) -> tuple[list[float], float]:
    operands = [comp.symbols.get(n) for n in inst.operands]
    reads = [_hbm(o.arrays) if o is not None else 0.0 for o in operands]
    write = _hbm(inst.arrays)
    if inst.opcode in ("slice-start", "copy-start", "dynamic-slice-start") and len(inst.arrays) >= 2:
        # asynchronous copy or slice: its result tuple is (operand, result, context); it reads the
        # result's worth of the operand and writes the result (into on-chip memory: nothing in HBM)
        result = inst.arrays[1]
        read = (result.bytes if inst.opcode != "copy-start" else sum(reads)) * (operands[0] is not None)
        return [read] + [0.0] * (len(reads) - 1), (result.bytes if result.memory_space == 0 else 0.0)
    if inst.opcode in _SLICING and reads:
        reads[0] = min(reads[0], write)
    elif inst.opcode == "dynamic-update-slice" and len(reads) > 1:
        reads[0], write = 0.0, reads[1]
    elif inst.opcode == "fusion":
        fused = computations.get(dict(callees(inst)).get("calls", ""))
        if fused is not None:
            reads, write = _fusion_traffic(fused, reads, write, computations)
    return reads, write


def _is_copy_fusion(inst: Instruction, computations: dict[str, Computation] | None) -> bool:
    """A nested fusion that only copies (relayouts) its operand: TPU HLO slices one layer of a stacked
    weight through such a copy of the whole stack, computing the slice's elements only."""
    if inst.opcode != "fusion" or computations is None:
        return False
    body = computations.get(dict(callees(inst)).get("calls", ""))
    return body is not None and all(i.opcode in ("parameter", "copy", "bitcast") for i in body.instructions)


def _is_slice_fusion(inst: Instruction, computations: dict[str, Computation] | None) -> bool:
    """A nested fusion that only slices its operand (and bitcasts or copies the slice): TPU HLO puts
    the slice a matmul reads through inside the matmul's fusion this way; it reads the slice only."""
    if inst.opcode != "fusion" or computations is None:
        return False
    body = computations.get(dict(callees(inst)).get("calls", ""))
    return (body is not None and any(i.opcode in _SLICING for i in body.instructions)
            and all(i.opcode in ("parameter", "copy", "bitcast", *_SLICING) for i in body.instructions))


def _fusion_traffic(fused: Computation, reads: list[float], write: float,
                    computations: dict[str, Computation] | None = None) -> tuple[list[float], float]:
    """A fusion's HBM traffic from its body: a parameter read only through slices (directly, or
    through bitcasts and nested copy fusions) reads the slices;
    one passed straight to the output, or only to a collective (the pieces of an asynchronous
    collective carry its buffers through), costs nothing here (its transfer is the collective's);
    an in-place ``dynamic-update-slice`` root writes only its update."""
    params, users = {}, collections.defaultdict(list)
    for inst in fused.instructions:
        if inst.opcode == "parameter" and inst.args.strip().isdigit():
            params[inst.name] = int(inst.args)
        for operand in inst.operands:
            users[operand].append(inst)
    root = fused.instructions[-1] if fused.instructions else None
    if root is None:
        return reads, write

    def source_param(name):  # a parameter seen through bitcasts
        inst = fused.symbols.get(name)
        while inst is not None and inst.opcode == "bitcast" and inst.operands:
            inst = fused.symbols.get(inst.operands[0])
        return params.get(inst.name) if inst is not None else None

    def sliced_bytes(name, depth=0):  # bytes of the slices ``name`` is read through, None if read otherwise
        uses = users.get(name, [])
        if not uses or depth > 4:
            return None
        total = 0.0
        for u in uses:
            if (u.opcode in _SLICING or _is_slice_fusion(u, computations)) and u.operands[:1] == [name]:
                total += sum(a.bytes for a in u.arrays)
            elif u.opcode in ("bitcast", "copy") or _is_copy_fusion(u, computations):
                inner = sliced_bytes(u.name, depth + 1)
                if inner is None:
                    return None
                total += inner
            else:
                return None
        return total

    reads = list(reads)
    for name, index in params.items():
        if index >= len(reads):
            continue
        uses = users.get(name, [])
        sliced = sliced_bytes(name)
        if sliced is not None:
            reads[index] = min(reads[index], sliced)
        elif uses and all(u is root and root.opcode == "tuple" or _collective_kind(u.opcode) for u in uses):
            reads[index] = 0.0
    if root.opcode == "tuple":
        outputs = [fused.symbols.get(n) for n in root.operands]
        write = sum(_hbm(o.arrays) for o in outputs
                    if o is not None and o.opcode != "parameter" and not _collective_kind(o.opcode))
    else:
        outputs = [root]
    for dus in (o for o in outputs if o is not None and o.opcode == "dynamic-update-slice" and len(o.operands) > 1):
        index = source_param(dus.operands[0])
        update = fused.symbols.get(dus.operands[1])
        if index is not None and index < len(reads) and update is not None:
            reads[index] = 0.0
            write -= max(sum(a.bytes for a in dus.arrays) - sum(a.bytes for a in update.arrays), 0.0)
    return reads, max(write, 0.0)


def _contracted_size(inst: Instruction, comp: Computation) -> float:
    operands = [comp.symbols.get(n) for n in inst.operands[:2]]
    if any(o is None or not o.arrays for o in operands):
        return 0.0
    lhs, rhs = operands[0].arrays[0], operands[1].arrays[0]
    if inst.opcode == "dot":
        dims = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", inst.attrs)
        idx = [int(d) for d in dims.group(1).split(",") if d] if dims else []
        return float(math.prod(lhs.dims[i] for i in idx if i < len(lhs.dims)))
    labels = re.search(r"dim_labels=([^_]*)_([^-]*)->(\w+)", inst.attrs)
    if not labels or inst.opcode != "convolution":
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    if "i" not in rhs_labels or len(rhs_labels) != len(rhs.dims) or len(lhs_labels) != len(lhs.dims):
        return 0.0
    out = inst.arrays[0]
    window = _window(inst.attrs)
    taps = 1.0
    for label in (c for c in rhs_labels if c.isdigit()):
        d = int(label)  # the window's attributes are listed by spatial dimension number, not label order
        size = rhs.dims[rhs_labels.index(label)]
        n_in = lhs.dims[lhs_labels.index(label)]
        n_out = out.dims[out_labels.index(label)] if label in out_labels and len(out_labels) == len(out.dims) else 1
        taps *= _valid_taps(n_in, n_out, size, *(window[k][d] if d < len(window[k]) else default
                                                   for k, default in (("stride", 1), ("pad", (0, 0)),
                                                                      ("lhs_dilate", 1), ("rhs_dilate", 1))))
        # taps: (output position, window tap) pairs that land on a real input element, summed
        # over this axis; the output's own size along it is divided back out below.
        taps /= max(n_out, 1)
    return float(rhs.dims[rhs_labels.index("i")]) * taps


def _window(attrs: str) -> dict[str, list]:
    """``window={size=AxB stride=.. pad=lo_hi x .. lhs_dilate=.. rhs_dilate=..}`` as lists per axis."""
    match = re.search(r"window=\{([^}]*)\}", attrs)
    out: dict[str, list] = {"stride": [], "pad": [], "lhs_dilate": [], "rhs_dilate": []}
    for key, value in re.findall(r"(\w+)=(\S+)", match.group(1) if match else ""):
        if key == "pad":
            out["pad"] = [tuple(int(v) for v in p.split("_")) for p in value.split("x")]
        elif key in out:
            out[key] = [int(v) for v in value.split("x")]
    return out


def _valid_taps(n_in: int, n_out: int, size: int, stride: int, pad: tuple[int, int], lhs_dilate: int,
                rhs_dilate: int) -> float:
    """Along one spatial axis of a convolution: the number of (output position, window tap) pairs
    that read an input element (not padding, not a hole of the input dilation). TPU HLO writes batched
    dots as convolutions whose batch axes are such dilated windows: one tap per output there."""
    span = (n_in - 1) * lhs_dilate + 1
    if n_out * size > 1 << 22:  # huge windows (not dots): every tap counts
        return float(n_out * size)
    count = 0
    for o in range(n_out):
        for k in range(size):
            pos = o * stride + k * rhs_dilate - pad[0]
            if 0 <= pos < span and pos % lhs_dilate == 0:
                count += 1
    return float(count)


def analyze(text: str) -> HloStats:
    """Matmul FLOPs, HBM bytes and collectives per device of one compiled program (see the module
    docstring)."""
    computations = parse_module(text)
    partitions = re.search(r"num_partitions=(\d+)", text)
    num_partitions = int(partitions.group(1)) if partitions else 1
    mult, sequential, trips, unknown = multiplicities(computations)
    flops = hbm = dequant = code_bytes = 0.0
    collectives: dict[str, dict] = {}
    kernels: dict[str, int] = collections.Counter()
    by_op: dict[str, float] = collections.Counter()
    pieces: dict[tuple[str, str], list[tuple[float, float, int]]] = {}
    for comp in computations.values():
        m = mult.get(comp.name, 0.0)
        if not m:
            continue
        for inst in comp.instructions:
            if inst.opcode in ("dot", "convolution") and inst.arrays:
                flops += m * 2.0 * math.prod(inst.arrays[0].dims) * _contracted_size(inst, comp)
            elif inst.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in inst.attrs:
                kernels[re.sub(r"\.\d+$", "", inst.name)] += int(round(m))
            elif inst.opcode == "convert" and inst.arrays and inst.arrays[0].dtype not in CODE_DTYPES:
                source = comp.symbols.get(inst.operands[0]) if inst.operands else None
                if source is not None and source.arrays and source.arrays[0].dtype in CODE_DTYPES:
                    dequant += m * math.prod(inst.arrays[0].dims)
            kind = _collective_kind(inst.opcode)
            if kind is not None:
                operand_bytes = _operand_bytes(inst, comp)
                out = inst.out_bytes - (operand_bytes if inst.opcode.endswith("-start") else 0.0)
                channel = re.search(r"channel_id=(\d+)", inst.attrs)
                key = (kind, channel.group(1) if channel else f"{comp.name}/{inst.name}")
                pieces.setdefault(key, []).append((m, max(operand_bytes, out), _group_size(inst.attrs, num_partitions)))
            if comp.name in sequential and inst.opcode not in _NO_TRAFFIC and not inst.opcode.endswith("-done"):
                traffic = m * _hbm_traffic(inst, comp, computations)
                hbm += traffic
                by_op[op_label(inst)] += traffic
                if traffic:
                    code_bytes += m * _code_reads(inst, comp, computations)
    for (kind, _), group in pieces.items():
        # TPU HLO splits a collective into "async collective fusions" that share its channel id and
        # each name the whole result; a loop body holding such pieces progresses one collective
        # over its iterations. So a channel runs as often as its least repeated piece.
        runs = min(m for m, _, _ in group)
        size = max(b for _, b, _ in group)
        g = max(g for _, _, g in group)
        share = (g - 1) / g if g > 1 else 0.0
        wire = size * {"all-reduce": 2 * share, "collective-permute": 1.0}.get(kind, share)
        entry = collectives.setdefault(kind, {"count": 0, "bytes": 0.0, "wire_bytes": 0.0, "group_sizes": set()})
        entry["count"] += int(round(runs))
        entry["bytes"] += runs * size
        entry["wire_bytes"] += runs * wire
        entry["group_sizes"].add(g)
    for entry in collectives.values():
        entry["group_sizes"] = sorted(entry["group_sizes"])
    return HloStats(matmul_flops=flops, hbm_bytes=hbm, collectives=collectives, loop_trip_counts=sorted(trips),
                    unknown_trip_counts=unknown, num_partitions=num_partitions, kernels=dict(kernels),
                    hbm_bytes_by_op={k: v for k, v in by_op.most_common(TOP_OPS) if v > 0},
                    dequant_elements=dequant, code_hbm_bytes=code_bytes)


def kernel_gradient_dots(text: str, kernel_shapes: Iterable[Sequence[int]], *, max_shards: int | None = None) -> list[str]:
    """Names of the backward dots (``transpose(...)`` in their op name) whose result is shaped like
    one of ``kernel_shapes`` ``(in, out)``, whole or split into at most ``max_shards`` shards along
    its two axes (size-1 axes ignored): the weight gradients of those kernels."""
    computations = parse_module(text)
    partitions = re.search(r"num_partitions=(\d+)", text)
    max_shards = max_shards or (int(partitions.group(1)) if partitions else 1)
    wanted = set()
    for k, d in kernel_shapes:
        for a in range(1, max_shards + 1):
            for b in range(1, max_shards // a + 1):
                if k % a == 0 and d % b == 0:
                    wanted.add((k // a, d // b))
                    wanted.add((d // b, k // a))
    found = []
    for comp in computations.values():
        for inst in comp.instructions:
            if inst.opcode not in ("dot", "convolution") or not inst.arrays:
                continue
            dims = tuple(x for x in inst.arrays[0].dims if x != 1)
            if dims in wanted and "transpose(" in inst.attrs:
                found.append(inst.name)
    return found


__all__ = ["COLLECTIVES", "HloStats", "analyze", "kernel_gradient_dots"]

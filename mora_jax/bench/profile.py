"""Where a compiled training step spends its time: a ``jax.profiler`` trace joined with the HLO.

XLA:CPU records one trace event per executed fusion; the compiled HLO says what each fusion
computes. :func:`profile_step` runs a :class:`mora_jax.bench.runners.StepRunner` under the profiler and
returns one row per fusion group (kind, output shape, the op it came from, forward or backward),
with its time per step and, for fusions that contain dots, the FLOPs and the rate they ran at.
``python -m train.profile_step`` prints the table; ``docs/benchmarks.md`` quotes it.
"""

from __future__ import annotations

import collections
import gzip
import json
import math
import pathlib
import re
import tempfile

import jax

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \([^\n]*\{\n(.*?)\n\}", re.S | re.M)
_FUSION = re.compile(r"\s*%?([\w.\-]+) = (\S+) fusion\(.*?calls=%?([\w.\-]+)(?:.*?op_name=\"([^\"]*)\")?")
_DOT = re.compile(r"= (\S+) dot\(([^)]*)\).*?lhs_contracting_dims=\{([\d,]*)\}")
_SHAPE = re.compile(r"%([\w.\-]+) = (\w+\[[\d,]*\])")


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def _dot_flops(dot, shapes: dict) -> int:
    """FLOPs of one ``_DOT`` match, ``2·|output|·|contracted|`` (0 when the lhs shape is unknown)."""
    out_shape, operands, contracted = dot.group(1), dot.group(2), dot.group(3)
    lhs = _dims(shapes.get(operands.split(",")[0].strip().lstrip("%"), ""))
    return 2 * math.prod(_dims(out_shape)) * math.prod(lhs[int(i)] for i in contracted.split(",") if i) if lhs else 0


def _entry(shape: str, op_name: str | None, flops: int) -> dict:
    op_name = op_name or "(no op_name)"
    return {"shape": shape.split("{")[0], "op": "/".join(op_name.split("/")[-2:]),
            "backward": "transpose(" in op_name, "flops": flops}


def fusion_table(hlo_text: str) -> dict[str, dict]:
    """``{fusion or dot name: {"shape", "op", "backward", "flops"}}`` from compiled HLO text;
    ``flops`` counts the dots inside a fusion, or the dot itself for one XLA left unfused (those
    run, and are traced, under their own names)."""
    bodies = {m.group(1): m.group(2) for m in _COMPUTATION.finditer(hlo_text)}
    shapes_of = {name: dict(_SHAPE.findall(body)) for name, body in bodies.items()}
    table = {}
    for name, body in bodies.items():
        for line in body.splitlines():
            dot = _DOT.search(line)
            if dot:
                instr = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) =", line).group(1)
                op_name = re.search(r'op_name="([^"]*)"', line)
                table[instr] = _entry(dot.group(1), op_name and op_name.group(1), _dot_flops(dot, shapes_of[name]))
    for line in hlo_text.splitlines():
        m = _FUSION.match(line)
        if m:
            name, shape, called, op_name = m.groups()
            flops = sum(_dot_flops(dot, shapes_of.get(called, {})) for dot in _DOT.finditer(bodies.get(called, "")))
            table[name] = _entry(shape, op_name, flops)
    return table


def _trace_events(log_dir: pathlib.Path) -> list[dict]:
    files = sorted(log_dir.glob("**/*.trace.json.gz"))
    if not files:
        raise RuntimeError(f"jax.profiler wrote no perfetto trace under {log_dir}")
    data = json.loads(gzip.decompress(files[-1].read_bytes()))
    return data["traceEvents"] if isinstance(data, dict) else data


def profile_step(runner, steps: int = 3) -> dict:
    """Profile ``steps`` calls of ``runner.step()`` (already compiled and warmed up).

    Returns ``{"step_s", "rows": [{"kind", "shape", "op", "backward", "count", "ms_per_step",
    "gflop_per_step", "gflops"}], "dot_ms", "dot_gflop", "other_ms"}``, rows by time; ``dot_*``
    sum the fusions that contain dots, ``other_ms`` the rest (element-wise, transposes, reductions).
    Times are summed over threads, so they can exceed the wall time of a step.
    """
    table = fusion_table(runner.compiled.as_text())
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        walls = [runner.step(record=False) for _ in range(steps)]
        jax.profiler.stop_trace()
        events = _trace_events(pathlib.Path(tmp))
    groups: dict[tuple, list] = collections.defaultdict(lambda: [0.0, 0, 0])
    for event in events:
        info = table.get(event.get("name", "")) if event.get("ph") == "X" else None
        if info is None:
            continue
        key = (re.sub(r"\.\d+$", "", event["name"]), info["shape"], info["op"], info["backward"])
        groups[key][0] += event.get("dur", 0) / 1e3 / steps  # µs -> ms per step
        groups[key][1] += 1
        groups[key][2] += info["flops"] / steps
    rows = [{"kind": k[0], "shape": k[1], "op": k[2], "backward": k[3], "count": n // steps,
             "ms_per_step": ms, "gflop_per_step": fl / 1e9, "gflops": (fl / 1e9) / (ms / 1e3) if fl and ms else None}
            for k, (ms, n, fl) in groups.items()]
    rows.sort(key=lambda r: -r["ms_per_step"])
    dot_ms = sum(r["ms_per_step"] for r in rows if r["gflop_per_step"])
    return {"step_s": sorted(walls)[len(walls) // 2], "rows": rows, "dot_ms": dot_ms,
            "dot_gflop": sum(r["gflop_per_step"] for r in rows),
            "other_ms": sum(r["ms_per_step"] for r in rows if not r["gflop_per_step"])}


def profile_markdown(profile: dict, top: int = 15) -> str:
    lines = [f"step {profile['step_s'] * 1e3:.0f} ms; fusions with dots {profile['dot_ms']:.0f} ms "
             f"({profile['dot_gflop']:.1f} GFLOP, {profile['dot_gflop'] / max(profile['dot_ms'], 1e-9) * 1e3:.0f} GFLOP/s), "
             f"other fusions {profile['other_ms']:.0f} ms (thread time per step)", "",
             "| fusion | output | from | pass | n | ms/step | GFLOP/s |", "|---|---|---|---|---|---|---|"]
    for r in profile["rows"][:top]:
        rate = "-" if r["gflops"] is None else f"{r['gflops']:.0f}"
        lines.append(f"| {r['kind']} | {r['shape']} | {r['op']} | {'bwd' if r['backward'] else 'fwd'} | "
                     f"{r['count']} | {r['ms_per_step']:.1f} | {rate} |")
    return "\n".join(lines)


__all__ = ["fusion_table", "profile_markdown", "profile_step"]

"""``--quantized``: the same adapter steps on the frozen base stored in each format of
``benchmark.quant_formats`` (``model.quantize``, :mod:`mora_jax.quant`), side by side in one rotation.

For every format it reports the base's bytes (all of it, and the quantized kernels alone, codes at
their bit width plus scales), the step's static peak memory (XLA's buffer assignment: arguments,
outputs and temporaries) and the step time of LoRA and MoRA at ``r_small``, all against the float
base of the same run. Bytes and peak memory are properties of the compiled programs, the same on
every run; step times are medians of interleaved steps (ratios only).
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from typing import Callable

import jax

from mora_jax import adapters as adapters_lib
from mora_jax.bench.config import BenchConfig
from mora_jax.bench.methods import MethodSpec, make_batch, model_name
from mora_jax.bench.runners import (MatmulRunner, StepRunner, assemble, device_description, peak_memory_bytes,
                                    run_interleaved)
from mora_jax.quant.config import QuantConfig
from mora_jax.quant.transform import frozen_bytes, quantized_paths

GOAL_4BIT = 0.35  # a 4-bit base at most this fraction of the float32 frozen bytes, scales included


def run_quantized(config, *, log: Callable[[str], None] = print) -> dict:
    """One rotation of LoRA and MoRA steps on the base in each format; the table's rows."""
    bench = BenchConfig.from_config(config)
    run = bench.run
    specs = [MethodSpec("lora", bench.r_small), *(MethodSpec("mora", bench.r_small, t) for t in bench.mora_types)]
    runners, rows = [], []
    batch = None
    for fmt in bench.quant_formats:
        quant = dataclasses.replace(QuantConfig.from_value(run.model.quantize), format=fmt)
        variant = dataclasses.replace(run, model=dataclasses.replace(run.model, quantize=quant))
        base = assemble(variant)
        params = base.load_params()
        if batch is None:  # the first format's: the formats' check makes it "none", the float base
            batch = make_batch(base.model_config, run.train.batch_size, run.train.seq_len, run.seed)
            float_params = params
        paths = quantized_paths(params)
        row = {"format": fmt, "block_size": quant.block_size if fmt in ("int4", "nf4") else None,
               "frozen_bytes": frozen_bytes(params), "quantized_kernels": len(paths),
               "target_bytes": _target_bytes(params, quant, float_params), "steps": []}
        for spec in specs:
            runner = StepRunner(spec, base, params, batch)
            runner.row, runner.fmt = row, fmt
            runners.append(runner)
            log(f"compiled {spec.label:<12} on a {fmt} base in {runner.compile_s:6.1f} s")
        rows.append(row)
    matmul = MatmulRunner(run.model.dtype, size=bench.matmul_size, chain=bench.matmul_chain)
    run_interleaved([*runners, matmul], bench.steps, bench.warmup, bench.interleave)
    for runner in runners:
        runner.row["steps"].append({"label": runner.spec.label, "method": runner.spec.method, "r": runner.spec.r,
                                    "mora_type": runner.spec.mora_type,
                                    "step_s": statistics.median(runner.times), "step_s_min": min(runner.times),
                                    "peak_mem_bytes": peak_memory_bytes(runner.compiled),
                                    "loss": float(runner.last_loss)})
        runner.release()
    matmul.release()
    return {"device": device_description(), "model": model_name(run), "dtype": run.model.dtype,
            "batch": run.train.batch_size, "seq_len": run.train.seq_len, "steps": bench.steps,
            "jax": jax.__version__, "rows": rows}


def _target_bytes(params, quant: QuantConfig, float_params) -> dict:
    """Bytes of the kernels ``quant.targets`` selects in ``params`` and in the float base (same paths)."""
    flat, ref = adapters_lib.flatten(params), adapters_lib.flatten(float_params)
    names = [k for k in ref if re.fullmatch(quant.targets, "/".join(k))]
    return {"bytes": frozen_bytes({"/".join(k): flat[k] for k in names}),
            "float_bytes": frozen_bytes({"/".join(k): ref[k] for k in names})}


def markdown(result: dict) -> str:
    """The table: base bytes and peak memory against the float base, step time against it; the goal."""
    rows = result["rows"]
    ref = next((r for r in rows if r["format"] == "none"), rows[0])
    ref_steps = {s["label"]: s for s in ref["steps"]}
    labels = [s["label"] for s in ref["steps"]]
    head = (f"**{result['model']}**, batch {result['batch']} x seq {result['seq_len']}, {result['dtype']}, on "
            f"{result['device']}; median of {result['steps']} interleaved steps (times: ratios to the "
            f"{ref['format']} base only).")
    header = ["base", "base MiB", "vs float", "projections MiB", "vs float"] + [
        x for label in labels for x in (f"{label} peak MiB", "vs float", f"{label} step vs float")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    for row in rows:
        name = row["format"] + (f" (blocks of {row['block_size']})" if row["block_size"] else "")
        t = row["target_bytes"]
        cells = [name, mib(row["frozen_bytes"]), f"{row['frozen_bytes'] / ref['frozen_bytes']:.2f}x",
                 mib(t["bytes"]), f"{t['bytes'] / t['float_bytes']:.2f}x"]
        for s in row["steps"]:
            r = ref_steps[s["label"]]
            cells += [mib(s["peak_mem_bytes"] or 0),
                      f"{(s['peak_mem_bytes'] or 0) / max(r['peak_mem_bytes'] or 1, 1):.2f}x",
                      f"{s['step_s'] / r['step_s']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    goals = []
    for row in rows:
        if row["format"] in ("int4", "nf4") and ref["format"] == "none":
            ratio = row["target_bytes"]["bytes"] / row["target_bytes"]["float_bytes"]
            whole = row["frozen_bytes"] / ref["frozen_bytes"]
            goals.append(f"- {row['format']}: the quantized projections are {ratio:.3f}x their float bytes "
                         f"(goal <= {GOAL_4BIT}: {'met' if ratio <= GOAL_4BIT else 'NOT met'}); the whole base, "
                         f"embeddings and head unquantized, {whole:.3f}x")
    return "\n".join([head, "", *lines, "", *goals])


__all__ = ["GOAL_4BIT", "markdown", "run_quantized"]

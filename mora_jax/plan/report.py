"""The planner's tables (plain text, also valid markdown) and the run variants it compares."""

from __future__ import annotations

import dataclasses

from mora_jax.plan.chips import GiB
from mora_jax.methods import METHODS
from mora_jax.run_config import RunConfig, adapter_config

ESTIMATE_NOTE = "times and MFU are roofline estimates of the compiled steps, not measurements"


def compare_methods(method: str, requested) -> list[str]:
    """The methods ``--compare`` names (``all`` = the two others), without ``method`` itself."""
    names = [m.strip().lower() for m in requested if m.strip()]
    if names == ["all"]:
        names = [m for m in ("mora", "lora", "full") if m != method]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"--compare: unknown method(s) {unknown}; choose from {sorted(METHODS)} or 'all'")
    return [m for m in dict.fromkeys(names) if m != method]


def with_method(config: RunConfig, method: str) -> RunConfig:
    """``config`` with another method: the same targets, rank, dropout and unfrozen parameters
    (LoRA takes its default alpha; full fine-tuning has no merges)."""
    section = {f.name: getattr(config.adapter, f.name) for f in dataclasses.fields(config.adapter)}
    return dataclasses.replace(config, adapter=adapter_config(method, section))


def _gib(n) -> str:
    if n is None:
        return "?"
    return f"{n / GiB:.2f}" if n >= 0.1 * GiB else f"{n / GiB:.2g}"


def _seconds(s) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def _collectives(step: dict) -> str:
    parts = [f"{kind} {c['count']}× {c['bytes'] / GiB:.2f} GiB" for kind, c in (step.get("collectives") or {}).items()]
    return ", ".join(parts) or "none"


def table(plan: dict) -> str:
    """The plan as a short table with its verdict and, when it does not fit, what to change."""
    run = plan["run"]
    mesh = " × ".join(f"{k}={v}" for k, v in plan["mesh"].items())
    method = run["method"] + (f" r={run['r']}" if run.get("r") else "") + (
        f" type {run['mora_type']}" if run.get("mora_type") else "")
    lines = [
        f"TPU plan for {plan['topology']}: {plan['chips']} chips ({plan['device_kind']}, "
        f"{plan['hbm_bytes_per_chip'] / GiB:.0f} GiB HBM each), {plan['hosts']} host(s), mesh {mesh}",
        f"{run['model']} ({run['layers']} layers, d={run['hidden_size']}), {method}, batch {run['batch_size']} × "
        f"{run['seq_len']} in {run['grad_accum']} micro-batch(es) ({run['per_chip_micro_batch']:g} rows per chip each), "
        f"{run['dtype']} / weights {run['param_dtype']}, remat {run['remat_policy']}"
        + (f", ReMoRA merges every {run['remora_every']} steps" if run.get("remora_every") else ""),
        "",
        "| step | GiB/chip | args / temp GiB | fits | compile | est. step | bound | collectives per step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, step in plan["steps"].items():
        if step is None:
            why = "no data.eval_source: not run" if name == "eval" else "no ReMoRA merges"
            lines.append(f"| {name} | - | - | - | - | - | - | ({why}) |")
            continue
        memory = step["bytes_per_chip"]
        total = _gib(memory["total"]) + (f" ({_gib(memory['after_first_merge'])} after 1st merge)"
                                          if memory.get("after_first_merge") else "")
        lines.append(f"| {name} | {total} | {_gib(memory['arguments'])} / {_gib(memory['temp'])} | "
                     f"{'yes' if step['fits'] else 'NO'} | {step['compile_s']:.0f} s | {_seconds(step['estimated_step_s'])} | "
                     f"{step['bound'] or '-'} | {_collectives(step)} |")
    train = plan["steps"].get("train")
    if train and train.get("estimated_mfu") is not None:
        lines += ["", f"model FLOPs per step {train['model_flops_per_step']:.3g}; estimated "
                      f"{train['estimated_tokens_per_s']:,.0f} tokens/s, MFU {100 * train['estimated_mfu']:.1f}% "
                      f"({ESTIMATE_NOTE})"]
    by_dtype = plan.get("state_bytes_per_chip", {}).get("frozen_by_dtype")
    if by_dtype:
        lines += ["", "frozen weights per chip: " + ", ".join(f"{_gib(n)} GiB {d}" for d, n in by_dtype.items())]
    dequantize = (train or {}).get("dequantize")
    if dequantize:
        lines.append(f"dequantization: {dequantize['elements']:.3g} weight elements per step, "
                     f"{dequantize['code_hbm_bytes'] / GiB:.2f} GiB of integer codes read from HBM")
    if train and train.get("not_compiled"):
        lines.append(f"train step not compiled: {train['not_compiled']}")
    if plan.get("compare"):
        lines += ["", compare_table(plan)]
    lines += ["", "fits" if plan["fits"] else "DOES NOT FIT"]
    if plan.get("headroom_note"):
        lines.append(plan["headroom_note"])
    if plan.get("advice"):
        lines += [plan["advice"][0] + "; change one of:"] + [f"  {a}" for a in plan["advice"][1:]]
    return "\n".join(lines)


def compare_table(plan: dict) -> str:
    """The train step of each compared method beside the plan's own."""
    rows = [(plan["run"]["method"], plan)] + list((plan.get("compare") or {}).items())
    base = plan["steps"]["train"]
    lines = ["| method | GiB/chip | vs this | est. step | vs this | est. MFU | fits |", "|---|---|---|---|---|---|---|"]
    for method, p in rows:
        t = p["steps"]["train"]
        mem, base_mem = t["bytes_per_chip"]["total"], base["bytes_per_chip"]["total"]
        ratio_mem = f"{mem / base_mem:.2f}×" if mem and base_mem else "-"
        ratio_t = (f"{t['estimated_step_s'] / base['estimated_step_s']:.2f}×"
                   if t.get("estimated_step_s") and base.get("estimated_step_s") else "-")
        mfu = f"{100 * t['estimated_mfu']:.1f}%" if t.get("estimated_mfu") is not None else "-"
        lines.append(f"| {method} | {_gib(mem)} | {ratio_mem} | {_seconds(t['estimated_step_s'])} | {ratio_t} | {mfu} | "
                     f"{'yes' if t['fits'] else 'NO'} |")
    return "\n".join(lines)


def search_table(found: list[dict]) -> str:
    if not found:
        return "search: no candidate could be compiled"
    lines = ["| mesh | remat | micro-batches | GiB/chip | fits | est. step | est. tokens/s | est. MFU | bound |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
        tokens = f"{r['estimated_tokens_per_s']:,.0f}" if r.get("estimated_tokens_per_s") else "-"
        mfu = f"{100 * r['estimated_mfu']:.1f}%" if r.get("estimated_mfu") is not None else "-"
        lines.append(f"| {mesh} | {r['remat_policy']} | {r['grad_accum']} | {_gib(r['bytes_per_chip'])} | "
                     f"{'yes' if r['fits'] else 'no'} | {_seconds(r['estimated_step_s'])} | {tokens} | {mfu} | "
                     f"{r['bound'] or '-'} |")
    return "\n".join(lines)


__all__ = ["ESTIMATE_NOTE", "compare_methods", "compare_table", "search_table", "table", "with_method"]

"""The benchmark's methods planned for a TPU slice (``train.benchmark --topology=v5e:2x2``): estimates
beside the CPU measurements.

Each method of the CPU table (full fine-tuning, LoRA and MoRA at each rank and type) becomes a run
config of the same model, compiled by the TPU planner (:mod:`mora_jax.plan`) for the slice: the
same train step, in bfloat16 (the TPU's matmul type), with ``batch`` sequences per chip (the CPU
run's whole batch on each chip, ``batch × chips`` in all) of ``seq_len`` tokens, the weights sharded
over every chip (``fsdp``). Memory per chip is the compiler's; step time and MFU are the planner's
roofline estimates, never measurements.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

from mora_jax.bench import methods as methods_lib
from mora_jax.mesh import MeshConfig
from mora_jax.plan import chips as chips_lib
from mora_jax.plan import planner
from mora_jax.run_config import RunConfig

ESTIMATE_LABEL = "TPU estimate (compiled for the slice, roofline time; not measured)"


def run_config(run: RunConfig, spec: methods_lib.MethodSpec, chips: int) -> RunConfig:
    """``spec``'s run on the benchmark's run (``run``), as planned for ``chips`` chips: bfloat16,
    ``run``'s batch on each chip, the weights sharded over every chip."""
    method = spec.run_config(run)
    return dataclasses.replace(
        method, model=dataclasses.replace(run.model, dtype="bfloat16", param_dtype="bfloat16"),
        optim=dataclasses.replace(run.optim, warmup_steps=0, decay="constant"),
        train=dataclasses.replace(run.train, batch_size=run.train.batch_size * chips),
        mesh=MeshConfig(axis_sizes=(1, -1, 1)))


def plan_methods(run: RunConfig, topology: str, rows, *, log: Callable[[str], None] = print) -> dict:
    """The TPU plan of every method in ``rows`` (the CPU results' ``method``/``r``/``mora_type``) on the
    benchmark's run ``run``."""
    slice_ = chips_lib.parse_topology(topology)
    devices = chips_lib.topology_devices(slice_)
    out = []
    for row in rows:
        spec = methods_lib.MethodSpec(row["method"], row.get("r"), row.get("mora_type"))
        log(f"TPU plan {topology}: {spec.label} ...")
        plan = planner.plan(run_config(run, spec, slice_.chips), slice_, steps=("train",), devices=devices)
        train = plan["steps"]["train"]
        out.append({"method": spec.method, "r": spec.r, "mora_type": spec.mora_type, "label": spec.label,
                    "fits": train["fits"], "bytes_per_chip": train["bytes_per_chip"]["total"],
                    "estimated_step_s": train["estimated_step_s"], "estimated_tokens_per_s": train.get("estimated_tokens_per_s"),
                    "estimated_mfu": train.get("estimated_mfu"), "bound": train["bound"], "compile_s": train["compile_s"]})
    return {"label": ESTIMATE_LABEL, "topology": slice_.name, "chips": slice_.chips, "device_kind": slice_.chip.device_kind,
            "hbm_bytes_per_chip": slice_.chip.hbm_bytes, "dtype": "bfloat16", "batch": run.train.batch_size * slice_.chips,
            "seq_len": run.train.seq_len, "mesh": {"data": 1, "fsdp": slice_.chips, "tensor": 1}, "results": out}


def side_by_side(result: Mapping) -> str:
    """Markdown: each method's CPU measurement beside its TPU estimate."""
    tpu = result["tpu_plan"]
    cpu = {(r["method"], r.get("r"), r.get("mora_type")): r for r in result["results"]}
    lines = [f"{ESTIMATE_LABEL}: {tpu['topology']} ({tpu['chips']} × {tpu['device_kind']}), batch {tpu['batch']} × "
             f"{tpu['seq_len']}, {tpu['dtype']}, fsdp over all chips. CPU: measured on this machine.", "",
             "| method | CPU step (measured) | CPU MFU | TPU GiB/chip | TPU step (est.) | TPU tokens/s (est.) | TPU MFU (est.) | bound |",
             "|---|---|---|---|---|---|---|---|"]
    for row in tpu["results"]:
        c = cpu.get((row["method"], row["r"], row["mora_type"]), {})
        step = f"{c['step_s'] * 1e3:.1f} ms" if c.get("step_s") else "-"
        mfu = f"{100 * c['mfu']:.1f}%" if c.get("mfu") is not None else "-"
        est = f"{row['estimated_step_s'] * 1e3:.2f} ms" if row["estimated_step_s"] else "-"
        tokens = f"{row['estimated_tokens_per_s']:,.0f}" if row.get("estimated_tokens_per_s") else "-"
        est_mfu = f"{100 * row['estimated_mfu']:.1f}%" if row.get("estimated_mfu") is not None else "-"
        gib = f"{row['bytes_per_chip'] / 2 ** 30:.2f}" + ("" if row["fits"] else " (does not fit)")
        lines.append(f"| {row['label']} | {step} | {mfu} | {gib} | {est} | {tokens} | {est_mfu} | {row['bound'] or '-'} |")
    return "\n".join(lines)


__all__ = ["ESTIMATE_LABEL", "plan_methods", "run_config", "side_by_side"]

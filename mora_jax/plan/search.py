"""``--search``: try mesh shapes, remat policies and micro-batch counts for a slice; rank those that fit.

Every candidate is the run's own train step compiled for the slice (:func:`mora_jax.plan.planner.plan`
with only the train step; eval and merge need less), so a search costs one TPU compile per candidate.
Candidates are tried in an order that reaches a fitting, fast one early: per mesh shape (weights
sharded over all chips first, then more data parallelism, tensor parallelism last) and remat policy
(none first), the micro-batch count climbs from the config's until the step fits; a step that fits
with fewer micro-batches is tried next. ``budget`` caps the compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

from mora_jax.mesh import MeshConfig
from mora_jax.plan import chips as chips_lib
from mora_jax.plan import planner
from mora_jax.plan.advice import REMAT_LADDER
from mora_jax.plan.chips import PlanError
from mora_jax.run_config import RunConfig


def mesh_shapes(chips: int, llama_config, batch_size: int, max_tensor: int = 8) -> list[dict]:
    """``{data, fsdp, tensor}`` shapes over ``chips`` that the model and batch split evenly over, in
    the order tried: tensor parallelism last, then fsdp before data (weights sharded over all chips)."""
    kv_heads, mlp = llama_config.resolved_kv_heads, llama_config.intermediate_size
    shapes = []
    for tensor in (t for t in range(1, min(chips, max_tensor) + 1) if chips % t == 0):
        if kv_heads % tensor or mlp % tensor:
            continue
        rest = chips // tensor
        for data in (d for d in range(1, rest + 1) if rest % d == 0):
            fsdp = rest // data
            if batch_size % (data * fsdp):
                continue
            shapes.append({"data": data, "fsdp": fsdp, "tensor": tensor})
    return sorted(shapes, key=lambda s: (s["tensor"], s["data"]))


def with_choice(config: RunConfig, mesh: dict, remat: str, grad_accum: int) -> RunConfig:
    """``config`` with this mesh, remat policy and number of micro-batches."""
    return dataclasses.replace(
        config, mesh=MeshConfig(axis_names=tuple(mesh), axis_sizes=tuple(mesh.values())),
        model=dataclasses.replace(config.model, remat_policy=remat),
        train=dataclasses.replace(config.train, grad_accum=grad_accum))


def _summary(plan: dict, remat: str, grad_accum: int) -> dict:
    train = plan["steps"]["train"]
    return {"mesh": plan["mesh"], "remat_policy": remat, "grad_accum": grad_accum, "fits": train["fits"],
            "bytes_per_chip": train["bytes_per_chip"]["total"], "estimated_step_s": train["estimated_step_s"],
            "estimated_tokens_per_s": train.get("estimated_tokens_per_s"), "estimated_mfu": train.get("estimated_mfu"),
            "bound": train["bound"], "compile_s": train["compile_s"]}


def search(config: RunConfig, topology: chips_lib.Topology | str, *, budget: int = 12,
           remat_policies: tuple[str, ...] = REMAT_LADDER, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Candidates tried (at most ``budget`` compiles), those that fit first, best estimated throughput
    first; each ``{"mesh", "remat_policy", "grad_accum", "fits", "bytes_per_chip", "estimated_step_s",
    "estimated_tokens_per_s", "estimated_mfu", "bound", "compile_s"}``."""
    topology = chips_lib.parse_topology(topology) if isinstance(topology, str) else topology
    devices = chips_lib.topology_devices(topology)
    llama_config = planner.model_config(config)
    say = progress or (lambda message: None)
    shapes = mesh_shapes(topology.chips, llama_config, config.train.batch_size)
    if not shapes:
        raise PlanError(f"no mesh over {topology.chips} chips splits train.batch_size={config.train.batch_size} "
                        f"and the model's heads evenly: use a batch size that is a multiple of {topology.chips}")
    results: list[dict] = []
    tried: set = set()

    def attempt(mesh, remat, accum) -> dict | None:
        key = (tuple(mesh.values()), remat, accum)
        if key in tried or len(tried) >= budget:
            return None
        tried.add(key)
        rows_per_shard = config.train.batch_size // (mesh["data"] * mesh["fsdp"])
        if rows_per_shard % accum:
            return None
        say(f"[{len(tried)}/{budget}] mesh {mesh}, remat {remat}, {accum} micro-batches ...")
        try:
            result = planner.plan(with_choice(config, mesh, remat, accum), topology, steps=("train",), devices=devices)
        except PlanError as e:
            say(f"  skipped: {e}")
            return None
        row = _summary(result, remat, accum)
        say(f"  {'fits' if row['fits'] else 'does not fit'}: {row['bytes_per_chip'] / chips_lib.GiB:.3g} GiB/chip"
            + (f", est. {row['estimated_step_s']:.3g} s/step" if row["estimated_step_s"] else ""))
        results.append(row)
        return row

    for mesh in shapes:
        rows_per_shard = config.train.batch_size // (mesh["data"] * mesh["fsdp"])
        for remat in remat_policies:
            accum = min(config.train.grad_accum, rows_per_shard)
            row = attempt(mesh, remat, accum)
            if row is not None and row["fits"]:
                while accum > 1:  # fewer micro-batches are faster (fewer weight gathers): do they fit?
                    lower = attempt(mesh, remat, accum // 2)
                    if lower is None or not lower["fits"]:
                        break
                    accum //= 2
            else:
                while accum * 2 <= rows_per_shard and len(tried) < budget:  # more: fewer activations at once
                    accum *= 2
                    row = attempt(mesh, remat, accum)
                    if row is not None and row["fits"]:
                        break
            if any(r["fits"] and r["mesh"] == mesh for r in results):
                break  # a cheaper remat policy fits this mesh: costlier ones are slower
        if len(tried) >= budget:
            break
    return rank(results)


def rank(results: list[dict]) -> list[dict]:
    """Fitting candidates first, by estimated step time; then the others, by memory."""
    fits = sorted((r for r in results if r["fits"]), key=lambda r: r["estimated_step_s"] or math.inf)
    rest = sorted((r for r in results if not r["fits"]), key=lambda r: r["bytes_per_chip"] or math.inf)
    return fits + rest


__all__ = ["mesh_shapes", "rank", "search", "with_choice"]

"""What to change when a plan does not fit: concrete config overrides, read from where the memory goes.

A step's memory per chip is its arguments (frozen weights, trainables, optimizer state, batch: what
sharding spreads over ``fsdp``), its temporaries (activations kept for the backward pass, gradients:
what the per-chip micro-batch, ``grad_accum`` and the remat policy set) and its outputs. Each
suggestion is a ``--config.FIELD=VALUE`` override with the reason.
"""

from __future__ import annotations

from mora_jax.plan.chips import GiB
from mora_jax.run_config import RunConfig

REMAT_LADDER = ("none", "dots_with_no_batch_dims_saveable", "projections", "full")


def _gib(n) -> str:
    return f"{n / GiB:.1f} GiB"


def _mesh_override(mesh: dict) -> str:
    return " ".join(f"--config.mesh.{k}={v}" for k, v in mesh.items())


def suggestions(plan: dict, config: RunConfig) -> list[str]:
    """Overrides that shrink the steps that do not fit, most effective first (empty when all fit)."""
    hbm = plan["hbm_bytes_per_chip"]
    failing = {name: step for name, step in plan["steps"].items() if step is not None and not step["fits"]}
    if not failing:
        return []
    out = []
    train, t = plan["steps"].get("train"), config.train
    mesh = dict(plan["mesh"])
    shards = mesh.get("data", 1) * mesh.get("fsdp", 1)
    used = max((s["bytes_per_chip"].get("after_first_merge") or s["bytes_per_chip"]["total"] or 0)
               for s in failing.values())
    out.append(f"needs {_gib(used)} per chip of {_gib(hbm)} ({', '.join(sorted(failing))} step)")
    memory = (train or {}).get("bytes_per_chip") or {}
    activations_heavy = memory.get("temp") is None or memory["temp"] >= (memory.get("arguments") or 0)
    micro = t.batch_size // t.grad_accum
    if train is not None and not train["fits"] and activations_heavy and "not_compiled" not in train:
        if micro % (2 * shards) == 0:
            out.append(f"--config.train.grad_accum={2 * t.grad_accum}: half the rows per micro-batch "
                       f"({micro // shards} -> {micro // shards // 2} per chip), roughly half the activations")
        rung = REMAT_LADDER.index(config.model.remat_policy) if config.model.remat_policy in REMAT_LADDER else -1
        if rung + 1 < len(REMAT_LADDER):
            out.append(f"--config.model.remat_policy={REMAT_LADDER[rung + 1]}: recompute activations in the "
                       "backward pass instead of keeping them")
        if not config.model.scan_layers:
            out.append("--config.model.scan_layers=True: one layer's temporaries live at a time in the scanned body")
        if t.batch_size % 2 == 0 and (t.batch_size // 2) % (t.grad_accum * shards) == 0:
            out.append(f"--config.train.batch_size={t.batch_size // 2}: a smaller global batch")
    if train is not None and not train["fits"] and not t.loss_chunk and "not_compiled" not in train:
        logits = plan["run"]["per_chip_micro_batch"] * t.seq_len * plan["run"]["vocab_size"] * 4
        chunk = next((c for c in (512, 1024, 256, 128) if t.seq_len % c == 0 and c < t.seq_len), 0)
        if chunk and logits >= 0.05 * hbm:
            out.append(f"--config.train.loss_chunk={chunk}: the loss {chunk} positions at a time, without the "
                       f"micro-batch's float32 logits ({_gib(logits)} per chip, and as much for their gradient)")
    checkpoints = layer_checkpoint_bytes(plan, config)
    if train is not None and not train["fits"] and checkpoints >= 0.05 * hbm:
        out[0] = (out[0][:-1] + f"; about {_gib(checkpoints)} of it the layers' remat checkpoints, "
                  f"{plan['run']['layers']} layers × {plan['run']['per_chip_micro_batch']:g} row(s) × {t.seq_len} "
                  f"tokens × d={plan['run']['hidden_size']} in {config.model.dtype}, an estimate)")
    quantize = getattr(config.model, "quantize", None)
    by_dtype = plan["state_bytes_per_chip"].get("frozen_by_dtype", {})
    if (quantize is not None and getattr(quantize, "scale_dtype", None) == "float32" and "float32" in by_dtype
            and getattr(quantize, "format", "none") in ("int4", "nf4")):
        out.append(f"--config.model.quantize.scale_dtype=bfloat16: half the scales' {_gib(by_dtype['float32'])} "
                   "per chip")
    frozen = plan["state_bytes_per_chip"]["frozen"]
    if quantize is not None and getattr(quantize, "format", "none") == "none" and frozen >= 0.25 * used:
        out.append(f"--config.model.quantize.format=int8 (or nf4): the frozen projections stored in 8 (4) bits, "
                   f"about half (a quarter) of their bf16 bytes; now {_gib(frozen)} of frozen weights per chip")
    if "eval" in failing:
        out.append(f"the eval step runs a whole global batch at once ({t.batch_size} rows, no micro-batches): "
                   f"evaluate with a smaller --config.train.batch_size, or leave --config.data.eval_source empty")
    if mesh.get("data", 1) > 1:
        fsdp = mesh.get("fsdp", 1) * mesh["data"]
        out.append(f"{_mesh_override({**mesh, 'data': 1, 'fsdp': fsdp})}: shard weights, gradients and optimizer "
                   f"state over all {plan['chips']} chips (now {plan['state_bytes_per_chip']['frozen'] / GiB:.1f} "
                   "GiB of frozen weights per chip)")
    if config.model.param_dtype == "float32":
        out.append("--config.model.param_dtype=bfloat16: frozen weights in bf16, half their memory")
    out.append(f"a larger slice than {plan['topology']} (more chips share the weights and the batch)")
    return out


def layer_checkpoint_bytes(plan: dict, config: RunConfig) -> float:
    """Bytes per chip of the layer inputs a scanned model keeps for the backward pass under remat
    ``full`` (one ``(rows, T, d)`` activation per layer and micro-batch row on the chip); 0 for other
    policies, whose saved activations are not modelled here."""
    run = plan["run"]
    if config.model.remat_policy != "full" or not config.model.scan_layers:
        return 0.0
    itemsize = 2 if config.model.dtype in ("bfloat16", "float16") else 4
    return run["layers"] * run["per_chip_micro_batch"] * config.train.seq_len * run["hidden_size"] * itemsize


def headroom_note(plan: dict) -> str | None:
    """A warning when a plan fits with less than 5% of HBM to spare (the runtime and fragmentation need some)."""
    hbm = plan["hbm_bytes_per_chip"]
    worst = max(((s["bytes_per_chip"].get("after_first_merge") or s["bytes_per_chip"]["total"] or 0)
                 for s in plan["steps"].values() if s is not None), default=0)
    if plan.get("fits") and worst > 0.95 * hbm:
        return f"fits with {100 * (1 - worst / hbm):.1f}% of HBM to spare: little room for the runtime's own buffers"
    return None


__all__ = ["REMAT_LADDER", "headroom_note", "layer_checkpoint_bytes", "suggestions"]

"""ReMoRA / ReLoRA: merge the adapters into the weights every ``T`` steps and start fresh ones.

After the update of step ``s`` with ``s % T == 0`` (``s > 0``): every adapted kernel becomes
``K + ΔK`` (float32 accumulate, cast back, inside ``jax.jit`` on the sharded, donated weights),
MoRA's ``m`` restarts at zero with the next operator type of the cycle (reference: 1→2→3→4→1),
LoRA's ``a`` is re-initialised and ``b`` zeroed (DoRA's magnitude restarts at the merged kernel's column
norms; HiRA's next update multiplies the merged kernel; PiSSA runs its SVD again on the merged kernel and freezes the new residual), and the adapters get a fresh optimizer state
(moments and step count) while fully trained parameters keep theirs. The learning-rate restart is
part of the schedule (``mora_jax.schedules``).

On a quantized base (:mod:`mora_jax.quant`) the merged kernel is dequantized, merged and quantized
again in its format (``adapters.merge``); the error this adds per merge is measured in
``docs/quantization.md``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from mora_jax import dora, hira, ops, pissa
from mora_jax.adapters import LoRAAdapter, MoRAAdapter, flatten, merge, unflatten
from mora_jax.dora import DoRAAdapter
from mora_jax.hira import HiRAAdapter
from mora_jax.pissa import PiSSAAdapter
from mora_jax.quant.formats import as_float
from mora_jax.training import TrainState

REFERENCE_CYCLE = (1, 2, 3, 4)  # the reference's remora_types=4; (1, 2) is its alternative


@dataclasses.dataclass(frozen=True)
class RemoraConfig:
    """Attributes:
      every: merge period T in optimizer steps (0 = never merge).
      type_cycle: MoRA operator types used in turn, one per merge period; the first is the initial type.
      reset_optimizer: give the adapters fresh optimizer state at each merge (the reference does).
      diagnostics: log at each merge the norm of the merged ΔW per layer type and the rank of the
        change accumulated since the start for a few kernels (``mora_jax.remora_diagnostics``).
    """

    every: int = 0
    type_cycle: tuple[int, ...] = REFERENCE_CYCLE
    reset_optimizer: bool = True
    diagnostics: bool = True

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"ReMoRA merge period must be >= 0, got {self.every}")
        cycle = tuple(self.type_cycle)
        if not cycle:
            raise ValueError("type_cycle is empty: give at least one MoRA type, e.g. (1, 2, 3, 4)")
        for t in cycle:
            ops._check_type(t)
        if 6 in cycle and len(set(cycle)) > 1:
            raise ValueError(
                f"type_cycle {cycle} mixes type 6 with other types: type 6 needs an even r̂, so m's shape could "
                "change at a merge; use (6,) alone or a cycle of types 1-4"
            )
        object.__setattr__(self, "type_cycle", cycle)

    def is_merge_step(self, completed_steps: int) -> bool:
        return bool(self.every) and completed_steps > 0 and completed_steps % self.every == 0

    def type_at(self, completed_steps: int) -> int:
        """The operator type in use while training after ``completed_steps`` updates."""
        if not self.every:
            return self.type_cycle[0]
        return self.type_cycle[(completed_steps // self.every) % len(self.type_cycle)]


def fresh_adapters(adapters, rng, mora_type: int | None = None, merged_params=None):
    """New adapters of the same shapes: MoRA ``m = 0`` (optionally another type), LoRA ``a`` re-initialised
    (kaiming-uniform) and ``b = 0``; DoRA as LoRA with ``magnitude`` the column norms of the merged
    kernels in ``merged_params`` (needed for DoRA and MoRA with a magnitude), so the model is unchanged by the restart."""
    flat = flatten(adapters)
    flat_params = flatten(merged_params) if merged_params is not None else {}
    out = {}
    for i, (path, adapter) in enumerate(sorted(flat.items())):
        if isinstance(adapter, MoRAAdapter):
            new_type = adapter.mora_type if mora_type is None else mora_type
            if new_type != adapter.mora_type and (new_type == 6) != (adapter.mora_type == 6):
                raise ValueError(f"cannot switch {'/'.join(path)} between type 6 and types 1-4 at a merge")
            out[path] = adapter.replace(m=jnp.zeros_like(adapter.m), mora_type=new_type)
            if adapter.magnitude is not None:  # restarts at the merged kernel's column norms, as DoRA's
                if path not in flat_params:
                    raise ValueError(f"restarting the MoRA adapter with a magnitude at {'/'.join(path)} needs its "
                                     "merged kernel: pass merged_params to fresh_adapters")
                merged = as_float(flat_params[path]).reshape(*adapter.m.shape[:-2], adapter.in_features,
                                                             adapter.out_features)
                out[path] = out[path].replace(magnitude=dora.column_norms(merged).astype(adapter.magnitude.dtype))
        elif isinstance(adapter, PiSSAAdapter):
            raise ValueError(f"the PiSSA adapter at {'/'.join(path)} restarts with its base kernel (a new SVD): use "
                             "merge_and_reset, or mora_jax.pissa.restart")
        elif isinstance(adapter, LoRAAdapter):
            bound = 1.0 / math.sqrt(adapter.in_features)
            a = jax.random.uniform(jax.random.fold_in(rng, i), adapter.a.shape, adapter.a.dtype, -bound, bound)
            out[path] = adapter.replace(a=a, b=jnp.zeros_like(adapter.b))
        elif isinstance(adapter, DoRAAdapter):
            if path not in flat_params:
                raise ValueError(f"restarting the DoRA adapter at {'/'.join(path)} needs its merged kernel: "
                                 "pass merged_params to fresh_adapters")
            out[path] = dora.fresh(adapter, as_float(flat_params[path]), jax.random.fold_in(rng, i))
        elif isinstance(adapter, HiRAAdapter):
            out[path] = hira.fresh(adapter, jax.random.fold_in(rng, i))
        else:
            raise TypeError(f"not an adapter at {'/'.join(path)}: {type(adapter).__name__}")
    return unflatten(out)


def merge_and_reset(state: TrainState, *, tx: optax.GradientTransformation, next_type: int | None,
                    reset_optimizer: bool = True) -> TrainState:
    """Fold the adapters into the frozen kernels and start fresh adapters (pure; jit with donation).

    ``next_type`` (static) is the MoRA type for the next period (None keeps the current one).
    """
    adapters = state.trainables["adapters"]
    frozen = merge(state.frozen, adapters)
    rng, init_rng = jax.random.split(state.rng)
    frozen, restarted = _restart_pissa(frozen, adapters, jax.random.fold_in(init_rng, 1))
    others = unflatten({p: a for p, a in flatten(adapters).items() if p not in restarted})
    new_adapters = unflatten({**flatten(fresh_adapters(others, init_rng, next_type, merged_params=frozen)),
                              **restarted})
    trainables = dict(state.trainables, adapters=new_adapters)
    opt_state = dict(state.opt_state)
    if reset_optimizer:
        opt_state["adapters"] = tx.init(new_adapters)
    else:  # keep the moments, re-labelled for the new adapter tree (same shapes)
        opt_state["adapters"] = _retarget(opt_state["adapters"], adapters, new_adapters)
    return state.replace(frozen=frozen, trainables=trainables, opt_state=opt_state, rng=rng)


def _restart_pissa(frozen, adapters, rng):
    """PiSSA adapters restart by a new SVD of the merged kernel: ``(frozen with residuals, {path: adapter})``."""
    flat_frozen, restarted = flatten(frozen), {}
    for i, (path, adapter) in enumerate(sorted(flatten(adapters).items())):
        if isinstance(adapter, PiSSAAdapter):
            flat_frozen[path], restarted[path] = pissa.restart(adapter, flat_frozen[path], jax.random.fold_in(rng, i))
    return (unflatten(flat_frozen) if restarted else frozen), restarted


def _retarget(opt_state, old_adapters, new_adapters):
    """Re-wrap optimizer-state subtrees shaped like ``old_adapters`` as ``new_adapters`` (type change)."""
    old_def = jax.tree_util.tree_structure(old_adapters)
    new_def = jax.tree_util.tree_structure(new_adapters)

    def is_adapter_tree(x):
        try:
            return jax.tree_util.tree_structure(x) == old_def
        except Exception:  # noqa: BLE001 - arbitrary optax state nodes
            return False

    return jax.tree_util.tree_map(
        lambda x: jax.tree_util.tree_unflatten(new_def, jax.tree_util.tree_leaves(x)) if is_adapter_tree(x) else x,
        opt_state, is_leaf=is_adapter_tree,
    )

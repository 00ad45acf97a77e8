"""ReMoRA / ReLoRA for nnx models: merge, restart the adapters, give them fresh optimizer state.

:func:`merge_and_reset` is the linen ``mora_jax.remora.merge_and_reset`` on a live model: every
adapted kernel becomes ``K + ΔK`` (float32 accumulate, cast back), MoRA's ``M`` restarts at zero
with the next operator type of the cycle (a static change: the next step retraces once per type),
LoRA's ``a`` is re-initialised and ``b`` zeroed, and the optimizer forgets the adapters' history.

The optimizer is one ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``, so "fresh state for ``M``" is
done leaf by leaf on its state: every per-parameter leaf of an adapter variable (Adam's moments,
accumulated gradients, ...) is replaced by ``tx.init``'s value; fully trained parameters
(:class:`TrainedParam`) keep theirs. Step counters that are not per-parameter (Adam's ``count``,
used for bias correction) restart with the adapters only when every trainable is an adapter; with
fully trained parameters alongside they keep counting, since they are shared. Learning-rate clocks
(``optax.inject_hyperparams`` and ``optax.scale_by_schedule`` counts) and ``optimizer.step`` are
never reset: the learning-rate restart is the schedule's job, e.g.
``mora_jax.schedules.make_schedule(ScheduleConfig(..., restart_every=T))`` passed to the optax
optimizer restarts its warm-up after each merge at step ``T, 2T, ...``.

:func:`remora_step` runs it when a :class:`mora_jax.remora.RemoraConfig` says so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mora_jax.nnx import layers as layers_lib
from mora_jax.nnx.attach import adapted_layers, initial_lora_a, initial_magnitude, path_str, principal_start, set_kernel
from mora_jax.nnx.layers import NORM_ATTR, SPEC_ATTR
from mora_jax.nnx.merge import fold, placed_like
from mora_jax.nnx.variables import TrainedParam

if TYPE_CHECKING:
    from mora_jax.remora import RemoraConfig

_SCHEDULE_CLOCKS = (optax.ScaleByScheduleState,)
_INJECTED = tuple(
    t for t in (getattr(optax, "InjectHyperparamsState", None), getattr(optax, "InjectStatefulHyperparamsState", None))
    if t is not None
)


def merge_and_reset(model, optimizer: nnx.Optimizer | None = None, *, next_type: int | None = None,
                    rng: jax.Array | int = 0, reset_optimizer: bool = True):
    """Fold every adapter into its kernel and restart it; reset the adapters' optimizer state. In place.

    Args:
      next_type: MoRA type for the next period (None keeps the current one). Types 1-4 and type 6
        have different ``r̂`` rules, so a switch between them is refused.
      rng: key (or int) for LoRA's new ``a`` (kernel ``i`` in sorted path order uses ``fold_in(rng, i)``).
      reset_optimizer: give the adapters fresh optimizer state (the reference does).
    Returns the model.
    """
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    layers = adapted_layers(model)
    for path, layer in layers.items():
        if getattr(layer, SPEC_ATTR).merged:
            raise ValueError(f"{path_str(path)} is merged (mora_jax.nnx.merge_adapters); unmerge before a ReMoRA step")
    for i, (path, layer) in enumerate(layers.items()):
        spec = getattr(layer, SPEC_ATTR)
        fold(layer, +1.0)
        if hasattr(layer, NORM_ATTR):  # DoRA's merge-time norm: not needed, the layer is not left merged
            delattr(layer, NORM_ATTR)
        first = getattr(layer, spec.names[0])
        if spec.method == "mora":
            new_type = spec.mora_type if next_type is None else int(next_type)
            if new_type != spec.mora_type and (new_type == 6) != (spec.mora_type == 6):
                raise ValueError(f"cannot switch {path_str(path)} between type 6 and types 1-4 at a merge")
            first[...] = jnp.zeros_like(first[...])
            setattr(layer, SPEC_ATTR, spec.replace(mora_type=new_type))
            spec = getattr(layer, SPEC_ATTR)
        elif spec.method == "pissa":  # the SVD runs again on the merged kernel; the residual is frozen
            a, b, residual = principal_start(getattr(layer, spec.kernel)[...], spec, jax.random.fold_in(rng, i))
            set_kernel(layer, spec, residual)
            first[...] = placed_like(a, first[...])
            second = getattr(layer, spec.names[1])
            second[...] = placed_like(b, second[...])
        else:
            a = initial_lora_a(jax.random.fold_in(rng, i), spec)
            first[...] = placed_like(a, first[...])
            second = getattr(layer, spec.names[1])
            second[...] = jnp.zeros_like(second[...])
        if spec.rescaled:  # the magnitude restarts at the merged kernel's column norms (DoRA, MoRA with one)
            magnitude = getattr(layer, spec.names[-1])
            magnitude[...] = placed_like(initial_magnitude(layers_lib.kernel_float(layer, spec), spec), magnitude[...])
    if optimizer is not None and reset_optimizer:
        reset_adapter_state(optimizer, model)
    return model


def remora_step(model, optimizer: nnx.Optimizer | None, remora: "RemoraConfig", completed_steps: int, *,
                rng: jax.Array | int = 0) -> bool:
    """After the update that completed step ``completed_steps``: merge and restart when
    ``remora.is_merge_step(completed_steps)``, with the type ``remora.type_at(completed_steps)``. Returns
    whether it merged. Call it outside ``nnx.jit`` (the type change retraces the step)."""
    if not remora.is_merge_step(completed_steps):
        return False
    has_mora = any(getattr(layer, SPEC_ATTR).method == "mora" for layer in adapted_layers(model).values())
    merge_and_reset(model, optimizer, next_type=remora.type_at(completed_steps) if has_mora else None, rng=rng,
                    reset_optimizer=remora.reset_optimizer)
    return True


# ---------------------------------------------------------------------------------------------
# Optimizer state.
# ---------------------------------------------------------------------------------------------


def _plain(keypath) -> tuple:
    out = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                out.append(getattr(k, attr))
                break
    return tuple(out)


def reset_adapter_state(optimizer: nnx.Optimizer, model) -> None:
    """Replace the adapters' leaves of ``optimizer``'s state by ``tx.init`` values (see the module docstring)."""
    adapter_paths = set()
    for path, layer in adapted_layers(model).items():
        for name in getattr(layer, SPEC_ATTR).names:
            adapter_paths.add((*path, name))
    lengths = sorted({len(p) for p in adapter_paths})
    graph = getattr(optimizer, "graph", None)
    trainables = nnx.state(model, optimizer.wrt, graph=graph) if graph is not None else nnx.state(model, optimizer.wrt)
    only_adapters = not any(isinstance(v, TrainedParam) for v in jax.tree_util.tree_leaves(
        trainables, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    fresh = optimizer.tx.init(nnx.as_pure(trainables))

    def is_adapter(keys) -> bool:
        return any(len(keys) >= n and tuple(keys[-n:]) in adapter_paths for n in lengths)

    def is_stop(x) -> bool:
        return isinstance(x, nnx.Variable) or isinstance(x, _SCHEDULE_CLOCKS + _INJECTED)

    def visit(old, new, prefix):
        def leaf(keypath, o, n):
            keys = prefix + _plain(keypath)
            if isinstance(o, _SCHEDULE_CLOCKS):
                return
            if isinstance(o, _INJECTED):  # keep its count and hyperparameters, visit the wrapped state
                visit(o.inner_state, n.inner_state, keys + ("inner_state",))
                return
            if not isinstance(o, nnx.Variable):
                return
            if is_adapter(keys) or (only_adapters and keys and keys[-1] == "count"):
                o.set_value(placed_like(jnp.asarray(n, dtype=o.get_value().dtype), o.get_value()))

        jax.tree_util.tree_map_with_path(leaf, old, new, is_leaf=is_stop)

    visit(optimizer.opt_state, fresh, ())


__all__ = ["merge_and_reset", "remora_step", "reset_adapter_state"]

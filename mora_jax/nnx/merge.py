"""Folding adapters into an nnx model's kernels, PEFT-style: ``merge_adapters``, ``unmerge``, ``merge_and_unload``.

The adapters live inside the model, so merging is a state of each adapted layer, as in PEFT's
``merge_adapter`` / ``unmerge_adapter``: :func:`merge_adapters` sets ``K ← K + ΔK`` (float32 accumulate, cast
back to ``K``'s dtype, through :func:`mora_jax.ops.merge_into` / ``lora_delta_weight``) and marks the
layer merged, so its forward skips ``Δy`` and the model computes the same function from the merged
kernel alone (e.g. for generation or export); :func:`unmerge` subtracts ``ΔK`` again. While merged,
the adapters get no gradient: unmerge before training on. :func:`merge_and_unload` folds the
adapters in for good and returns a plain model (the original layer classes, no adapter variables,
every parameter an ``nnx.Param``).

``merge`` is the old name of :func:`merge_adapters`, kept as a deprecated alias: it read like
``flax.nnx.merge(graphdef, state)``, which builds a module and has nothing to do with adapters.

Kernels keep their sharding (the new value is placed like the old one).
"""

from __future__ import annotations

import warnings

import jax

from mora_jax.nnx import layers as layers_lib
from mora_jax.nnx.attach import adapted_layers, detach, path_str
from mora_jax.nnx.layers import NORM_ATTR, SPEC_ATTR
from mora_jax.nnx.variables import DoRANorm
from mora_jax.quant.formats import as_float, is_quantized, store_like


def placed_like(new, old):
    sharding = getattr(old, "sharding", None)
    if sharding is None or isinstance(old, jax.core.Tracer) or isinstance(new, jax.core.Tracer):
        return new
    return new if getattr(new, "sharding", None) == sharding else jax.device_put(new, sharding)


def fold(layer, sign: float) -> None:
    """``K ← K + sign·ΔK`` on one adapted layer (its merged flag untouched); DoRA (and MoRA with a
    magnitude): its merge, or its undoing with the norm that the merge kept on the layer."""
    spec = getattr(layer, SPEC_ATTR)
    kernel = getattr(layer, spec.kernel)
    stored = kernel.get_value()
    old = as_float(stored)  # a quantized kernel (mora_jax.nnx.quant) is merged in float, then re-quantized
    arrays = layers_lib.adapter_arrays(layer, spec)
    if spec.rescaled:
        if sign > 0:
            new, norms = _rescaled_fold_jit(old, arrays, spec, None)
            setattr(layer, NORM_ATTR, DoRANorm(norms))
        else:
            new, _ = _rescaled_fold_jit(old, arrays, spec, getattr(layer, NORM_ATTR)[...])
            delattr(layer, NORM_ATTR)
    else:
        new = _fold_jit(old, arrays, spec, sign)
    kernel.set_value(store_like(stored, new) if is_quantized(stored) else placed_like(new, stored))


def _fold(kernel, arrays, spec, sign):
    return layers_lib.folded_kernel(kernel, arrays, spec, sign)


_fold_jit = jax.jit(_fold, static_argnums=(2, 3))
_rescaled_fold_jit = jax.jit(layers_lib.rescaled_folded_kernel, static_argnums=(2,))


def _set_merged(layer, merged: bool) -> None:
    setattr(layer, SPEC_ATTR, getattr(layer, SPEC_ATTR).replace(merged=merged))


def merge_adapters(model):
    """Fold every unmerged adapter into its kernel (``K ← K + ΔK``) and skip it in the forward. Returns the model."""
    for _, layer in adapted_layers(model).items():
        if not getattr(layer, SPEC_ATTR).merged:
            fold(layer, +1.0)
            _set_merged(layer, True)
    return model


_merge_warned = False


def merge(model):
    """Deprecated alias of :func:`merge_adapters` (warns once per process): the name read like
    ``flax.nnx.merge(graphdef, state)``, which does something else."""
    global _merge_warned
    if not _merge_warned:
        _merge_warned = True
        warnings.warn("mora_jax.nnx.merge(model) is deprecated (it reads like flax.nnx.merge(graphdef, state), which "
                      "builds a module): call mora_jax.nnx.merge_adapters(model)", DeprecationWarning, stacklevel=2)
    return merge_adapters(model)


def unmerge(model):
    """Undo :func:`merge_adapters` (``K ← K − ΔK``) and apply the adapters in the forward again. Returns the model."""
    for _, layer in adapted_layers(model).items():
        if getattr(layer, SPEC_ATTR).merged:
            fold(layer, -1.0)
            _set_merged(layer, False)
    return model


def merge_and_unload(model):
    """Fold the adapters into the kernels and remove them: a plain nnx model (original layer classes,
    no adapter variables, fully trained parameters back to ``nnx.Param``). Returns the model."""
    merge_adapters(model)
    for _, layer in adapted_layers(model).items():
        if hasattr(layer, NORM_ATTR):  # nothing left to unmerge
            delattr(layer, NORM_ATTR)
    return detach(model)


def is_merged(model) -> bool:
    """True when every adapter of ``model`` is merged (False when some or none are)."""
    specs = [getattr(layer, SPEC_ATTR) for layer in adapted_layers(model).values()]
    if specs and any(s.merged for s in specs) and not all(s.merged for s in specs):
        merged = [path_str(p) for p, layer in adapted_layers(model).items() if getattr(layer, SPEC_ATTR).merged]
        raise ValueError(f"only some adapters are merged ({merged[:5]}...); call merge or unmerge on the whole model")
    return bool(specs) and all(s.merged for s in specs)


__all__ = ["is_merged", "merge", "merge_adapters", "merge_and_unload", "unmerge"]

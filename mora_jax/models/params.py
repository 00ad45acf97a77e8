"""Parameter-tree helpers that need no model: counting, and moving between the unrolled layout
(``model/layers_{i}``) and the scanned one (``model/layers`` with a leading layer axis).

They work on params and on any tree mirroring them (adapters, gradients, optimizer moments).
``init_params`` / ``abstract_params``, which build the model, live in ``mora_jax.models.llama``.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def stack_layers(tree: Mapping, num_layers: int | None = None) -> dict:
    """Unrolled tree (``model/layers_{i}``) -> scanned tree (``model/layers`` with a layer axis).

    Works on params and on any tree mirroring them (e.g. adapters); other entries are kept.
    """
    model = dict(tree["model"])
    if num_layers is None:
        num_layers = sum(1 for k in model if k.startswith("layers_"))
    layers = [model.pop(f"layers_{i}") for i in range(num_layers)]
    if any(k.startswith("layers_") for k in model):
        raise ValueError(f"found layers beyond num_layers={num_layers}: {sorted(k for k in model if k.startswith('layers_'))}")
    model["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return {**tree, "model": model}


def unstack_layers(tree: Mapping) -> dict:
    """Scanned tree (``model/layers``, leading layer axis) -> unrolled tree (``model/layers_{i}``)."""
    model = dict(tree["model"])
    stacked = model.pop("layers")
    num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        model[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return {**tree, "model": model}


__all__ = ["count_params", "stack_layers", "unstack_layers"]

"""The variable types that decide what trains, as ``flax.nnx`` filters.

Everything trainable is an ``nnx.LoRAParam`` (or a subclass), so the filter that Tunix's
``PeftTrainer``, ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
``nnx.grad(..., argnums=nnx.DiffState(0, nnx.LoRAParam))`` already use selects exactly the
adapters, whatever the method:

* MoRA's square matrix ``M`` is a :class:`MoRAParam`;
* LoRA's ``a`` and ``b`` are plain ``nnx.LoRAParam`` (as ``nnx.LoRA`` and qwix make them);
* base parameters trained in full (``FullConfig.targets`` and every config's ``unfreeze``) are
  re-typed from ``nnx.Param`` to :class:`TrainedParam`. This is the choice a Tunix user needs: with
  any ``LoRAParam`` in the model, ``PeftTrainer`` trains ``wrt=nnx.LoRAParam``, so full fine-tuning
  of the targeted kernels (and nothing else) runs through the same trainer unchanged. The value,
  dtype, sharding and metadata of a re-typed parameter stay as they were.

The frozen base is then ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`` (:data:`FROZEN`).
"""

from __future__ import annotations

from flax import nnx


class MoRAParam(nnx.LoRAParam):
    """MoRA's trainable square matrix ``M`` (``r̂ × r̂``, float32, kernel layout ``z @ M``)."""


class TrainedParam(nnx.LoRAParam):
    """A base parameter trained in full (``FullConfig`` targets, ``unfreeze`` patterns)."""


class DoRANorm(nnx.Variable):
    """DoRA's column norm ``‖K + s·a·b‖_c`` at merge time, kept on a merged layer to undo the merge
    (the merged kernel alone does not determine ``K``; PEFT caches it too). Not a parameter."""


# What the optimizer and nnx.grad should see, and what stays fixed.
TRAINABLE = nnx.LoRAParam
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
# The adapter variables alone (MoRA's M, LoRA's a and b), without fully trained base parameters.
ADAPTERS = nnx.All(nnx.LoRAParam, nnx.Not(TrainedParam))

__all__ = ["ADAPTERS", "DoRANorm", "FROZEN", "MoRAParam", "TRAINABLE", "TrainedParam"]

"""MoRA, LoRA and full fine-tuning for ``flax.nnx`` models (Tunix, qwix-style, MaxText-style, your own).

One line turns an nnx model into a MoRA model; everything that trains ``nnx.LoRAParam`` then trains
``M`` and nothing else::

    import mora_jax, mora_jax.nnx as mnx
    mnx.attach(model, mora_jax.MoRAConfig(r=8, mora_type=6, targets=(r".*/(q|k|v|o)_proj/kernel",)))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)      # or Tunix's PeftTrainer

The pieces, one concern per module:

* ``variables``: :class:`MoRAParam` (``M``), :class:`TrainedParam`, the filters :data:`TRAINABLE`,
  :data:`FROZEN`, :data:`ADAPTERS`;
* ``layers``: which layers adapt (``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Einsum``, registered einsum
  modules) and the adapted forward, through :mod:`mora_jax.ops`;
* ``attach``: :func:`attach` / :func:`detach` by regex over ``'/'``-joined kernel paths, the same configs
  (``MoRAConfig`` / ``LoRAConfig`` / ``FullConfig``) as the linen path;
* ``merge``: :func:`merge_adapters`, :func:`unmerge`, :func:`merge_and_unload` (``merge`` is its deprecated
  old name);
* ``remora``: ReMoRA's :func:`merge_and_reset` / :func:`remora_step` (fresh optimizer state for the adapters);
* ``convert``: :func:`to_linen_adapters` / :func:`load_linen_adapters`, the linen adapter tree both ways;
* ``quant``: :func:`quantize` / :func:`dequantize`, a frozen base stored in int8 / 4-bit / GGUF blocks (QMoRA);
* ``peft``: :func:`save_adapter` / :func:`load_adapter` in PEFT format (the MoRA reference's, or LoRA);
* ``llama``: an nnx LLaMA with the linen model's math and parameter names (import ``mora_jax.nnx.llama``).

The core package never imports this one. It needs flax >= 0.12 (``nnx.List``, the ``out_sharding``
variable metadata, ``nnx.Optimizer.update(model, grads)``).
"""

import flax as _flax

if tuple(int(p) for p in _flax.__version__.split(".")[:2]) < (0, 12):
    raise ImportError(
        f"mora_jax.nnx needs flax >= 0.12 (found {_flax.__version__}); the linen API (mora_jax) works with older flax"
    )

from mora_jax.nnx.attach import adaptable_layers, adapted_layers, attach, detach, summary
from mora_jax.nnx.convert import linen_kernel_shapes, linen_path, load_linen_adapters, to_linen_adapters
from mora_jax.nnx.layers import (
    AdaptedEinsum,
    AdaptedLinear,
    AdaptedLinearGeneral,
    AdapterSpec,
    register_einsum_layer,
)
from mora_jax.nnx.merge import is_merged, merge, merge_adapters, merge_and_unload, unmerge
from mora_jax.nnx.peft import adapter_config, load_adapter, save_adapter
from mora_jax.nnx.quant import QuantizedLinear, dequantize, quantize
from mora_jax.nnx.remora import merge_and_reset, remora_step, reset_adapter_state
from mora_jax.nnx.variables import ADAPTERS, FROZEN, TRAINABLE, DoRANorm, MoRAParam, TrainedParam

__all__ = [
    "ADAPTERS",
    "AdaptedEinsum",
    "AdaptedLinear",
    "AdaptedLinearGeneral",
    "AdapterSpec",
    "DoRANorm",
    "FROZEN",
    "MoRAParam",
    "QuantizedLinear",
    "TRAINABLE",
    "TrainedParam",
    "adaptable_layers",
    "adapted_layers",
    "adapter_config",
    "attach",
    "detach",
    "dequantize",
    "is_merged",
    "linen_kernel_shapes",
    "linen_path",
    "load_adapter",
    "load_linen_adapters",
    "merge",
    "merge_adapters",
    "merge_and_reset",
    "merge_and_unload",
    "quantize",
    "register_einsum_layer",
    "remora_step",
    "reset_adapter_state",
    "save_adapter",
    "summary",
    "to_linen_adapters",
    "unmerge",
]

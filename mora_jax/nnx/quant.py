"""QMoRA on nnx: a model's frozen ``nnx.Linear`` kernels stored quantized, dequantized at each call.

:func:`quantize` turns the kernels that ``config.targets`` matches into
:class:`mora_jax.quant.formats.QuantizedKernel` values (int8, int4, NF4 or GGUF's Q8_0 / Q4_0 / Q4_1
blocks, ``mora_jax.quant.config.QuantConfig``) and swaps each layer's class for a subclass whose call
is ``nn.Dense``'s arithmetic on the dequantized kernel, rematerialized (:func:`mora_jax.quant.matmul.dense`):
the backward pass keeps the integer codes and dequantizes again, so no float copy of the model is
alive at the peak. Weight-only, like the linen path: adapters attached afterwards
(:func:`mora_jax.nnx.attach`, any method but PiSSA) train on exactly the dequantized base. The kernel
keeps its variable type (``nnx.Param``), path and sharding, so ``nnx.LoRAParam`` filters, Tunix's
``PeftTrainer`` and ``nnx.Optimizer`` never see it; merges into it (:func:`mora_jax.nnx.merge_adapters`,
ReMoRA restarts) re-quantize the merged kernel in its format. :func:`dequantize` gives the float model back.

The order is QLoRA's: quantize the base, then attach the adapters. Only ``nnx.Linear`` (stacked by
``nnx.vmap`` too) is quantized here: ``LinearGeneral`` / ``Einsum`` kernels have several in and out
axes and are refused with a message saying so.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.nnx import layers as layers_lib
from mora_jax.nnx.attach import adaptable_layers, path_str
from mora_jax.nnx.variables import TrainedParam
from mora_jax.quant import formats
from mora_jax.quant.config import QuantConfig
from mora_jax.quant.matmul import dense

_QUANTIZED: dict[type, type] = {}


class _QuantizedMixin(nnx.Module):
    """``nnx.Linear``'s call on the dequantized kernel (rematerialized in the backward pass)."""

    def __call__(self, inputs):
        bias = self.bias[...] if self.bias is not None else None
        return dense(inputs, self.kernel.get_value(), bias, dtype=self.dtype, precision=self.precision)


class QuantizedLinear(_QuantizedMixin, nnx.Linear):
    """An ``nnx.Linear`` whose kernel is a :class:`~mora_jax.quant.formats.QuantizedKernel` (made by :func:`quantize`)."""


_QUANTIZED[nnx.Linear] = QuantizedLinear


def is_quantized_layer(layer) -> bool:
    return isinstance(layer, _QuantizedMixin)


def quantized_class(cls: type) -> type:
    """The quantized subclass of an ``nnx.Linear`` class (one per class, so graph definitions compare equal)."""
    return layers_lib.mixed_class(_QUANTIZED, _QuantizedMixin, cls, "Quantized", globals())


def float_class(cls: type) -> type:
    """The float class of a quantized layer class."""
    return layers_lib.unmixed_class(_QUANTIZED, cls)


def quantize(model, config: QuantConfig | dict):
    """Quantize (in place) the kernels of ``model``'s ``nnx.Linear`` layers whose '/'-joined kernel path
    ``config.targets`` matches whole; returns the model. Everything is checked before anything changes:
    a pattern that matches nothing, a matched layer that is not an ``nnx.Linear``, one that already
    carries an adapter (quantize first, then attach), a kernel trained in full, a block size that does not
    divide a kernel's input features: each is one ``ValueError`` naming the layer and the fix."""
    config = QuantConfig.from_value(config)
    if not config.enabled:
        return model
    if config.format == "gguf":
        raise ValueError("model.quantize.format='gguf' keeps a GGUF file's blocks as loaded, which the nnx path does "
                         "not load; quantize the float model here with 'q8_0', 'q4_0' or 'q4_1' (ggml's rounding), "
                         "or use the linen path (mora_jax.gguf.weights.load_gguf(..., keep_quantized=True))")
    chosen = []
    for path, layer in adaptable_layers(model).items():
        name = path_str((*path, layers_lib.kind_of(layer).kernel))
        if not re.fullmatch(config.targets, name) or is_quantized_layer(layer):
            continue
        if not isinstance(layer, nnx.Linear) or isinstance(layer, (nnx.LinearGeneral, nnx.Einsum)):
            raise ValueError(f"{name}: only nnx.Linear kernels are quantized on the nnx path, this layer is "
                             f"{type(layer).__name__}; narrow model.quantize.targets to Linear kernels")
        if layers_lib.is_adapted(layer):
            raise ValueError(f"{name} already carries an adapter: quantize the base first, then attach the adapters "
                             "(mnx.quantize(model, ...); mnx.attach(model, ...)), as QLoRA does")
        if isinstance(layer.kernel, TrainedParam):
            raise ValueError(f"{name} is trained in full (FullConfig or unfreeze): a quantized kernel cannot be "
                             "trained; leave it out of model.quantize.targets")
        k = layer.kernel.shape[-2]
        block = {"int4": config.block_size, "nf4": config.block_size}.get(config.format, 0 if config.format == "int8"
                                                                           else formats.GGUF_BLOCK)
        if block and k % block:
            fix = ("set model.quantize.block_size to a divisor of it" if config.format in ("int4", "nf4") else
                   f"{config.format}'s blocks are GGUF's {block}: use int8, int4 or nf4 for it")
            raise ValueError(f"{name} has {k} input features, which blocks of {block} do not divide; {fix} (or leave "
                             "the kernel out of model.quantize.targets)")
        chosen.append((name, layer))
    if not chosen:
        names = [path_str((*p, layers_lib.kind_of(m).kernel)) for p, m in adaptable_layers(model).items()]
        raise ValueError(f"model.quantize.targets {config.targets!r} matches no nnx.Linear kernel (re.fullmatch over "
                         f"'/'-joined paths); the kernels are: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    for _, layer in chosen:
        kernel = layer.kernel.get_value()
        leaf = _quantize_jit(kernel, config.format, config.block_size, config.scale_dtype)
        layer.kernel.set_value(_placed(leaf, kernel))
        layer.__class__ = quantized_class(type(layer))
    return model


def _quantize(kernel, format, block_size, scale_dtype):
    return formats.quantize_kernel(kernel, format, block_size=block_size, scale_dtype=scale_dtype)


_quantize_jit = jax.jit(_quantize, static_argnums=(1, 2, 3))


def _placed(leaf, like):
    """``leaf``'s arrays placed on ``like``'s devices (the scales follow the kernel's sharding where
    their shape allows it, else they are replicated)."""
    sharding = getattr(like, "sharding", None)
    if sharding is None or isinstance(like, jax.core.Tracer):
        return leaf

    def put(x):
        try:
            return jax.device_put(x, sharding)
        except ValueError:  # a scale (k/block, d) that the kernel's in-axis split does not divide
            return jax.device_put(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())) \
                if isinstance(sharding, jax.sharding.NamedSharding) else x
    return jax.tree_util.tree_map(put, leaf)


def dequantize(model):
    """The float model back (in place; returns it): every quantized kernel dequantized into its original
    dtype and the layers' classes restored (adapters stay attached)."""
    for _, layer in adaptable_layers(model).items():
        if not is_quantized_layer(layer):
            continue
        leaf = layer.kernel.get_value()
        layer.kernel.set_value(formats.dequantize(leaf, jnp.dtype(leaf.dtype)))
        cls = type(layer)
        if layers_lib.is_adapted(layer):  # Adapted(Quantized(Linear)) -> Adapted(Linear)
            layer.__class__ = layers_lib.adapted_class(float_class(layers_lib.base_class(cls)))
        else:
            layer.__class__ = float_class(cls)
    return model


__all__ = ["QuantizedLinear", "dequantize", "is_quantized_layer", "quantize"]

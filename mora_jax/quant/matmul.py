"""A ``nn.Dense`` layer's output on a quantized kernel, computed where the layer is called.

``dense(x, leaf, bias)`` is ``nn.Dense``'s arithmetic (inputs and kernel promoted to the layer's
compute dtype, one ``dot_general`` over the last input axis, then the bias) on
``formats.dequantize(leaf)``: weight-only, so the activations stay in the compute dtype and every
gradient through the layer is the one on the dequantized base.

Merges kept beside the codes (``leaf.residual``, :mod:`mora_jax.quant.residual`) are added in
activation space, ``Σ Δy(x)``, like a live adapter: no dense ``ΔK`` is built in the step.

It runs under ``jax.checkpoint``: the backward pass keeps the layer's input and the quantized leaf
and dequantizes again, so no dequantized kernel is saved between the forward and backward passes
(without it, the float copy of every kernel would be a residual of its matmul: a full-precision model
alive at the peak). Frozen quantized leaves are never differentiated (they are not trainables).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype

from mora_jax.quant.formats import QuantizedKernel, dequantize, dequantize_codes


def float_dense(x, kernel, bias, dtype, precision):
    """``nn.Dense``'s arithmetic on a float kernel ``(in, out)``."""
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


def dense(x, leaf: QuantizedKernel, bias=None, *, dtype=None, precision=None):
    """``x @ dequantize(leaf) + bias`` with ``nn.Dense``'s dtype promotion (``dtype``: the layer's)."""
    if leaf.ndim != 2:
        raise ValueError(f"a quantized Dense kernel must be 2-D (in, out) where it is called, got {leaf.shape}")

    def run(x, leaf, bias):
        y = float_dense(x, dequantize_codes(leaf), bias, dtype, precision)
        if leaf.residual is not None and not leaf.residual.empty:
            y = y + leaf.residual.delta(x.astype(y.dtype)).astype(y.dtype)
        return y

    return jax.checkpoint(run)(x, leaf, bias)


def with_kernel(fn, x, leaf: QuantizedKernel, *args):
    """``fn(x, kernel, *args)`` on the dequantized kernel (for adapters that use the kernel: DoRA,
    HiRA, MoRA with a magnitude), rematerialized like :func:`dense`."""
    return jax.checkpoint(lambda x, leaf, *rest: fn(x, dequantize(leaf), *rest))(x, leaf, *args)


__all__ = ["dense", "float_dense", "with_kernel"]

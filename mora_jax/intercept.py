"""Running any Flax linen model with adapters in effect, without editing the model.

``apply_model`` passes the adapter pytree to ``model.apply`` as an extra variable collection,
``'adapters'``, that mirrors the parameter tree, and intercepts every ``nn.Dense`` /
``nn.DenseGeneral`` call (``flax.linen.intercept_methods``): a layer that finds an adapter under its
own scope returns ``x @ K + Δy(x)``. The adapter's contribution is computed in activation space, so
``ΔK`` is never built in the forward or backward pass, and differentiating with respect to the
adapters alone computes no weight gradient for the frozen kernel.

A kernel stored quantized (:mod:`mora_jax.quant`) is dequantized at its layer's call, inside the
step (:func:`mora_jax.quant.matmul.dense`): the parameter tree stays quantized and no float copy of
the model is ever built.

Because the adapters travel as a variable collection, lifted transforms see them like params: a
model that scans over layers must list ``'adapters'`` in ``nn.scan(variable_axes=...)`` (the
project's LLaMA does).
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax

from mora_jax.quant import matmul as quant_matmul
from mora_jax.quant.formats import is_quantized

ADAPTER_COLLECTION = "adapters"
_DENSE_TYPES = (nn.Dense, nn.DenseGeneral)


def _input_axes(module, x) -> int:
    """Number of trailing input axes of ``x`` that the layer contracts."""
    if isinstance(module, nn.Dense):
        return 1
    if module.batch_dims:
        raise NotImplementedError(
            f"adapters on DenseGeneral with batch_dims ({'/'.join(module.scope.path)}) are not supported"
        )
    axes = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
    axes = sorted(a % x.ndim for a in axes)
    if axes != list(range(x.ndim - len(axes), x.ndim)):
        raise NotImplementedError(
            f"adapters need DenseGeneral to contract trailing input axes; "
            f"{'/'.join(module.scope.path)} contracts axes {module.axis} of a {x.ndim}-d input"
        )
    return len(axes)


def _adapter_delta(module, adapter, x, y):
    n_in = _input_axes(module, x)
    lead = x.shape[: x.ndim - n_in]
    x_BxK = x.reshape(*lead, -1).astype(y.dtype)
    in_features, out_features = x_BxK.shape[-1], math.prod(y.shape[len(lead):])
    if (in_features, out_features) != (adapter.in_features, adapter.out_features):
        raise ValueError(
            f"adapter at {'/'.join(module.scope.path)}/kernel is {adapter.in_features}x{adapter.out_features} "
            f"but the layer maps {in_features} -> {out_features} features. For stacked (nn.scan) or "
            "multi-input-axis kernels pass layout=mora_jax.dense_layout(model, ...) to init_adapters"
        )
    if adapter.dropout > 0.0 and module.scope.has_rng("dropout"):
        keep = 1.0 - adapter.dropout
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x_BxK.shape)
        x_BxK = jax.numpy.where(mask, x_BxK / keep, 0).astype(x_BxK.dtype)
    delta = adapter.delta(x_BxK)
    return delta.reshape(y.shape).astype(y.dtype)


def _quantized_kernel(module):
    """The layer's kernel when it is stored quantized, else None."""
    if not module.has_variable("params", "kernel"):
        return None
    kernel = module.get_variable("params", "kernel")
    if not is_quantized(kernel):
        return None
    if not isinstance(module, nn.Dense):
        raise NotImplementedError(f"{'/'.join(module.scope.path)}: quantized kernels are supported on nn.Dense only")
    return kernel


def _bias(module):
    return module.get_variable("params", "bias") if getattr(module, "use_bias", False) else None


def _adapter_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, _DENSE_TYPES):
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["inputs"]
    quantized = _quantized_kernel(module)
    adapter = module.get_variable(ADAPTER_COLLECTION, "kernel") if module.has_variable(ADAPTER_COLLECTION, "kernel") \
        else None
    if quantized is not None and quantized.residual is not None and adapter is not None and not (
            adapter.dropout > 0.0 and module.scope.has_rng("dropout")):  # a kept merge of the live type: one matmul less
        kept, adapter = quantized.residual.fold_into(adapter)
        quantized = quantized.replace(residual=None if kept.empty else kept)
    if quantized is None:
        base_fn = lambda: next_fun(*args, **kwargs)  # noqa: E731
    else:
        base_fn = lambda: quant_matmul.dense(x, quantized, _bias(module), dtype=module.dtype,  # noqa: E731
                                             precision=module.precision)
    if adapter is None:
        return base_fn()
    if getattr(adapter, "uses_kernel", False):
        if quantized is not None:
            return _quantized_kernel_adapter_output(module, adapter, x, quantized)
        return _kernel_adapter_output(module, adapter, x, base_fn)
    y = base_fn()
    return y + _adapter_delta(module, adapter, x, y)


def _kernel_adapter_output(module, adapter, x, base_fn):
    """The layer's output under an adapter that needs the frozen kernel (DoRA, HiRA): the adapter's
    ``dense_output`` gets the input and kernel as ``(..., k)`` / ``(k, d)``, the frozen layer's output
    as a thunk (it may not need it), the bias, the dropout (None when inactive) and the compute dtype."""
    n_in = _input_axes(module, x)
    lead = x.shape[: x.ndim - n_in]
    kernel = module.get_variable("params", "kernel")
    k, d = adapter.in_features, adapter.out_features
    if math.prod(x.shape[len(lead):]) != k or kernel.size != k * d:
        raise ValueError(
            f"adapter at {'/'.join(module.scope.path)}/kernel is {k}x{d} but the layer's kernel has shape "
            f"{tuple(kernel.shape)}. For stacked (nn.scan) or multi-input-axis kernels pass "
            "layout=mora_jax.dense_layout(model, ...) to init_adapters"
        )
    bias = module.get_variable("params", "bias") if getattr(module, "use_bias", False) else None
    dtype = module.dtype or jax.numpy.result_type(x, kernel)
    out_shape = None

    def base():
        nonlocal out_shape
        y = base_fn()
        out_shape = y.shape
        return y.reshape(*lead, d)

    dropout_fn = None
    if adapter.dropout > 0.0 and module.scope.has_rng("dropout"):
        keep = 1.0 - adapter.dropout

        def dropout_fn(x_BxK):
            mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x_BxK.shape)
            return jax.numpy.where(mask, x_BxK / keep, 0).astype(x_BxK.dtype)

    y = adapter.dense_output(x.reshape(*lead, k).astype(dtype), kernel.reshape(k, d), base_fn=base,
                             bias_D=None if bias is None else bias.reshape(d), dropout_fn=dropout_fn, dtype=dtype,
                             precision=getattr(module, "precision", None))
    features = module.features if isinstance(module.features, (tuple, list)) else (module.features,)
    return y.reshape(out_shape or (*lead, *features))


def _quantized_kernel_adapter_output(module, adapter, x, quantized):
    """:func:`_kernel_adapter_output` on a quantized kernel: the adapter's ``dense_output`` runs on
    the dequantized kernel under ``jax.checkpoint`` (:func:`mora_jax.quant.matmul.with_kernel`), its
    dropout mask drawn outside it."""
    k, d = adapter.in_features, adapter.out_features
    n_in = _input_axes(module, x)
    lead = x.shape[: x.ndim - n_in]
    if math.prod(x.shape[len(lead):]) != k or quantized.size != k * d:
        raise ValueError(f"adapter at {'/'.join(module.scope.path)}/kernel is {k}x{d} but the layer's quantized "
                         f"kernel has shape {quantized.shape}")
    dtype = module.dtype or jax.numpy.result_type(x, quantized.dtype)
    precision = getattr(module, "precision", None)
    key = None
    if adapter.dropout > 0.0 and module.scope.has_rng("dropout"):
        key = module.make_rng("dropout")

    def run(x_BxK, kernel_KxD, adapter, bias):
        dropout_fn = None
        if key is not None:
            keep = 1.0 - adapter.dropout

            def dropout_fn(x_BxK):
                mask = jax.random.bernoulli(key, keep, x_BxK.shape)
                return jax.numpy.where(mask, x_BxK / keep, 0).astype(x_BxK.dtype)

        base = lambda: quant_matmul.float_dense(x_BxK, kernel_KxD, bias, dtype, precision)  # noqa: E731
        return adapter.dense_output(x_BxK, kernel_KxD, base_fn=base, bias_D=bias, dropout_fn=dropout_fn,
                                    dtype=dtype, precision=precision)

    y = quant_matmul.with_kernel(run, x.reshape(*lead, k).astype(dtype), quantized, adapter, _bias(module))
    return y.reshape(*lead, d)


def apply_model(model: nn.Module, params, *args, adapters=None, **kwargs):
    """``model.apply({'params': params}, *args, **kwargs)`` with ``adapters`` in effect.

    Works for any linen model whose adapted layers are ``nn.Dense`` / ``nn.DenseGeneral``; extra
    keyword arguments (``rngs``, ``method``, ``mutable``, model inputs) go to ``model.apply``.
    Adapter dropout is active when a ``'dropout'`` rng is given (``rngs={'dropout': key}``).
    """
    variables = {"params": params}
    if adapters:
        variables[ADAPTER_COLLECTION] = adapters
    with nn.intercept_methods(_adapter_interceptor):
        return model.apply(variables, *args, **kwargs)


@contextlib.contextmanager
def record_dense_calls():
    """Record ``{module path: (kernel ndim per call, number of input axes)}`` of Dense layers called."""
    calls: dict[tuple, tuple[int, int]] = {}

    def recorder(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _DENSE_TYPES):
            x = args[0] if args else kwargs["inputs"]
            n_in = _input_axes(module, x)
            n_out = 1 if isinstance(module, nn.Dense) else len(
                module.features if isinstance(module.features, (tuple, list)) else (module.features,)
            )
            calls[tuple(module.scope.path)] = (n_in + n_out, n_in)
        return y

    with nn.intercept_methods(recorder):
        yield calls

"""``quantize(params, config)``: the frozen kernels ``config.targets`` selects become
:class:`~mora_jax.quant.formats.QuantizedKernel` leaves, the rest of the tree is untouched, like
the adapters a pure transform of the parameter pytree (jit-able, and ``jax.eval_shape`` gives the
abstract quantized tree for planning: ``jax.eval_shape(lambda p: quantize(p, config), abstract)``).

Kernels with a leading layer axis (``nn.scan``) are quantized per layer (blocks along the input
axis, ``-2``). Leaves that are already quantized (a GGUF file's blocks) are kept as they are under
``format="gguf"``.
"""

from __future__ import annotations

import re

import jax
from flax import traverse_util

from mora_jax.errors import ConfigError
from mora_jax.quant.config import QuantConfig
from mora_jax.quant.formats import QuantizedKernel, dequantize, is_quantized, nbytes, quantize_kernel


def _flat(tree) -> dict:
    if hasattr(tree, "unfreeze"):
        tree = tree.unfreeze()
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _name(path) -> str:
    return "/".join(str(p) for p in path)


def quantize(params, config: QuantConfig):
    """``params`` with every kernel matched by ``config.targets`` quantized in ``config.format``
    (``"none"``: ``params`` unchanged). A :class:`~mora_jax.errors.ConfigError` names a pattern
    that matches nothing and a kernel whose input features the block size does not divide."""
    config = QuantConfig.from_value(config)
    if not config.enabled:
        return params
    flat = _flat(params)
    hits = [p for p in flat if re.fullmatch(config.targets, _name(p))]
    if not hits:
        shown = sorted(_name(p) for p in flat)
        raise ConfigError(f"model.quantize.targets {config.targets!r} matches no parameter of the model (patterns "
                          f"match '/'-joined paths whole); fix it, e.g. parameters are {', '.join(shown[:6])}, ...")
    out = dict(flat)
    for path in hits:
        leaf = flat[path]
        if is_quantized(leaf):
            if config.format not in ("gguf", leaf.format):
                raise ConfigError(f"{_name(path)} is already quantized as {leaf.format} (a GGUF file's blocks): set "
                                  "model.quantize.format='gguf' to keep them, or load the model as float to "
                                  f"quantize it to {config.format}")
            continue
        if config.format == "gguf":  # a float tensor of a GGUF file (F16/F32 or a type not kept): stays float
            continue
        if len(leaf.shape) < 2:
            raise ConfigError(f"model.quantize.targets {config.targets!r} matches {_name(path)} of shape "
                              f"{tuple(leaf.shape)}: only kernels (>= 2 dims) are quantized; narrow the pattern "
                              "(end it with '/kernel')")
        k = leaf.shape[-2]
        block = config.block_size if config.format in ("int4", "nf4") else 32 if config.format.startswith("q") else 0
        if block and k % block:
            fix = f"model.quantize.block_size to a divisor of {k}" if config.format in ("int4", "nf4") \
                else "another format (int8, int4, nf4) or narrower model.quantize.targets"
            raise ConfigError(f"{_name(path)} has {k} input features, not a multiple of the block size {block}: set "
                              f"{fix}")
        out[path] = quantize_kernel(leaf, config.format, block_size=config.block_size, scale_dtype=config.scale_dtype)
    return traverse_util.unflatten_dict(out)


def dequantize_params(params, dtype=None):
    """``params`` with every quantized leaf dequantized (to its original dtype, or ``dtype``): the
    float model a quantized base stands for (for export, or as a reference)."""
    return jax.tree_util.tree_map(
        lambda x: dequantize(x, dtype or x.dtype) if is_quantized(x) else x, params, is_leaf=is_quantized)


def quantized_paths(params) -> list[str]:
    """'/'-joined paths of the quantized leaves of ``params``."""
    return sorted(_name(p) for p, leaf in _flat(params).items() if is_quantized(leaf))


def has_quantized(tree) -> bool:
    return any(is_quantized(x) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized))


def check_not_trained(trained) -> None:
    """Full fine-tuning of a quantized kernel is refused: ``trained`` is the tree of base params
    selected for training (``adapter.targets`` of ``method=full``, ``adapter.unfreeze``)."""
    bad = quantized_paths(trained)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(f"{bad[0]}{more} is a quantized frozen kernel and cannot be trained in full: train "
                          "adapters on it (method mora, lora, ...), leave it out of adapter.unfreeze and full "
                          "fine-tuning's targets, or set model.quantize.format='none'")


def frozen_bytes(params) -> int:
    """Device bytes of a parameter tree, quantized leaves at their packed size (abstract or concrete)."""
    return int(sum(nbytes(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_quantized)))


__all__ = ["check_not_trained", "dequantize_params", "frozen_bytes", "has_quantized", "quantize", "quantized_paths"]

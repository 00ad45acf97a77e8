"""Checkpoint storage of quantized leaves: TensorStore (orbax's array store) has no 4-bit dtypes, so
``int4`` / ``uint4`` codes are written widened to ``int8`` / ``uint8`` (lossless: the same values)
and narrowed back on restore. On disk a 4-bit base takes a byte per weight; in memory it stays packed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_WIDE = {jnp.dtype(jnp.int4): jnp.dtype(jnp.int8), jnp.dtype(jnp.uint4): jnp.dtype(jnp.uint8)}


def _wide(dtype):
    return _WIDE.get(jnp.dtype(dtype), jnp.dtype(dtype))


def widen(tree):
    """``tree`` with every 4-bit array (or ``ShapeDtypeStruct``) as its 8-bit counterpart."""
    def one(x):
        if jnp.dtype(x.dtype) not in _WIDE:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, _wide(x.dtype), sharding=getattr(x, "sharding", None))
        return x.astype(_wide(x.dtype))
    return jax.tree_util.tree_map(one, tree)


def narrow_like(tree, like):
    """The inverse of :func:`widen`: each array of ``tree`` cast to the dtype of ``like``'s leaf."""
    return jax.tree_util.tree_map(lambda x, ref: x if x.dtype == ref.dtype else x.astype(ref.dtype), tree, like)


__all__ = ["narrow_like", "widen"]

"""The quantized kernel leaf and its formats (weight-only; all in ``jnp``, so ``jax.eval_shape`` and
``jax.jit`` trace them).

A quantized kernel ``(*stack, k, d)`` (``k`` input features, ``d`` outputs, optional leading layer
axes of an ``nn.scan`` model) is a :class:`QuantizedKernel`: a `qwix <https://github.com/google/qwix>`_
``QArray`` whose ``qvalue`` has the kernel's shape in a sub-byte or byte integer dtype (XLA packs
``int4`` / ``uint4`` two to a byte on CPU, GPU and TPU) and whose ``scale`` has the same rank, one
per block of ``block_size`` input features and output feature (``(*stack, k/bs, d)``; int8:
``(*stack, 1, d)``), plus GGUF Q4_1's per-block minimum. Dequantization is ``qwix.dequantize``
(Q4_1 adds its minimum). The format, block size and the original dtype are static pytree data; the
shape is the ``qvalue``'s (so ``nn.scan`` and ``unstack_layers`` slice a leaf like an array).

=========  ==========================  =========================================================
format     codes                       scale / rounding
=========  ==========================  =========================================================
int8       int8 in [-127, 127]         absmax/127 per output channel, round to nearest
int4       int4 in [-7, 7]             absmax/7 per block, round to nearest
nf4        uint4 NF4 index             absmax per block; the nearest of QLoRA's 16 NF4 levels
q8_0       int8                        GGUF: blocks of 32, float16 ``d = absmax/127``
q4_0       int4 (GGUF's nibble − 8)    GGUF: blocks of 32, float16 ``d = max/−8``
q4_1       uint4 nibble                GGUF: blocks of 32, float16 ``d = (max−min)/15`` and ``m = min``
=========  ==========================  =========================================================

What comes from qwix and what is written here, and why:

* **qwix**: the container (``QArray``: values, same-rank block scales, logical ``qtype``), its
  ``dequantize`` (block-broadcast multiply, NF4 table lookup) and the NF4 levels
  (``qwix._src.core.numerics.get_nf4_buckets``, the table of QLoRA's appendix E).
* **Here**: the rounding. ``qwix.quantize`` picks the scale and rounds in one step, so (a) a
  bfloat16 scale would be rounded after the values were quantized against the float32 one (the
  bound ``|w − ŵ| ≤ scale/2`` would not hold for the stored scale; here values are quantized
  against the stored scale), (b) its NF4 rounding compares every weight with all 16 levels at
  once (a ``(size, 16)`` float temporary: 15 GB for one 70B MLP kernel; here a ``searchsorted`` over
  the 15 midpoints), and (c) GGUF's block rules (Q4_0's signed maximum over −8, Q4_1's minimum,
  ggml's round-half-away) are not qwix's.
* **Not qwix's ``dot_general``**: it multiplies the integer values first and applies each block's
  scale to a ``(..., k/bs, d)`` partial product (an activation-sized temporary per block), and its
  result is not the matmul with the dequantized kernel; the adapters' gradients must be exactly
  those on the dequantized base. :mod:`mora_jax.quant.matmul` dequantizes and multiplies instead.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import qwix
from qwix._src.core.numerics import get_nf4_buckets

GGUF_FORMATS = ("q8_0", "q4_0", "q4_1")
GGUF_BLOCK = 32  # GGUF's Q8_0 / Q4_0 / Q4_1 block (QK8_0 = QK4_0 = QK4_1 = 32)
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4", "q8_0": jnp.int8, "q4_0": jnp.int4, "q4_1": jnp.uint4}
_CODE_DTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": jnp.uint4, "q8_0": jnp.int8, "q4_0": jnp.int4,
                "q4_1": jnp.uint4}


@flax.struct.dataclass
class QuantizedKernel:
    """A frozen kernel ``(*stack, k, d)`` stored quantized (see the module docstring).

    ``q``: the qwix ``QArray`` (``qvalue`` the kernel's shape, ``scale`` ``(*stack, k/block, d)``);
    ``offset``: GGUF Q4_1's block minimum (same shape as the scale), else None;
    ``residual``: merges kept exactly beside the codes (:class:`mora_jax.quant.residual.MergeResidual`),
    else None: the leaf stands for ``dequant(codes) + ΔK_residual``."""

    q: qwix.QArray
    offset: jax.Array | None = None
    residual: object = None
    format: str = flax.struct.field(pytree_node=False, default="int8")
    block_size: int = flax.struct.field(pytree_node=False, default=0)  # 0: one scale per output channel
    dtype: str = flax.struct.field(pytree_node=False, default="float32")  # the float kernel's dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.qvalue.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(self.q.qvalue.size)


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedKernel)


def code_bits(format: str) -> int:
    return jnp.iinfo(_CODE_DTYPES[format]).bits


def nbytes(leaf) -> int:
    """Bytes a leaf holds on a device: codes at their bit width (XLA packs 4-bit values two to a
    byte), scales and offsets at theirs. Works on arrays, ``ShapeDtypeStruct``s and quantized leaves."""
    if isinstance(leaf, QuantizedKernel):
        extra = [leaf.q.scale] + ([leaf.offset] if leaf.offset is not None else [])
        extra += jax.tree_util.tree_leaves(leaf.residual)
        return leaf.size * code_bits(leaf.format) // 8 + sum(nbytes(x) for x in extra)
    size = 1
    for n in leaf.shape:
        size *= int(n)
    return size * jnp.dtype(leaf.dtype).itemsize


# ---- Rounding ----------------------------------------------------------------------------------
def _blocks(w, block: int):
    """``(*stack, k, d)`` -> ``(*stack, k/block, block, d)``; ``block=0``: one block of all ``k``."""
    *stack, k, d = w.shape
    block = block or k
    return w.reshape(*stack, k // block, block, d)


def _safe(scale):
    return jnp.where(scale == 0, jnp.ones_like(scale), scale)


def _round_half_away(x):
    """ggml's ``roundf``: halves away from zero (``jnp.round`` rounds them to even)."""
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def _symmetric(w_blocks, qmax: int, scale_dtype):
    absmax = jnp.max(jnp.abs(w_blocks), axis=-2, keepdims=True)
    scale = (absmax / qmax).astype(scale_dtype)  # the stored scale; the values are rounded against it
    codes = jnp.clip(jnp.round(w_blocks / _safe(scale.astype(jnp.float32))), -qmax, qmax)
    return codes, scale


def _nf4(w_blocks, scale_dtype):
    levels = get_nf4_buckets().astype(jnp.float32)
    scale = jnp.max(jnp.abs(w_blocks), axis=-2, keepdims=True).astype(scale_dtype)
    x = jnp.clip(w_blocks / _safe(scale.astype(jnp.float32)), -1.0, 1.0)
    mids = (levels[1:] + levels[:-1]) / 2  # index = number of midpoints below x: the nearest level
    codes = jnp.searchsorted(mids, x.reshape(-1), side="left").reshape(x.shape)
    return codes, scale


def _gguf(w_blocks, format: str):
    """ggml's Q8_0 / Q4_0 / Q4_1 rounding (``gguf.quants``' ``quantize_blocks``), in jnp:
    ``(codes as stored, float16 scale, float16 minimum or None)``."""
    if format == "q8_0":
        d = jnp.max(jnp.abs(w_blocks), axis=-2, keepdims=True) / 127
        inv = jnp.where(d == 0, 0.0, 1.0 / _safe(d))
        return _round_half_away(w_blocks * inv), d.astype(jnp.float16), None
    if format == "q4_0":
        imax = jnp.argmax(jnp.abs(w_blocks), axis=-2, keepdims=True)
        d = jnp.take_along_axis(w_blocks, imax, axis=-2) / -8
        inv = jnp.where(d == 0, 0.0, 1.0 / _safe(d))
        codes = jnp.clip(jnp.trunc(w_blocks * inv + 8.5), 0, 15) - 8
        return codes, d.astype(jnp.float16), None
    hi = jnp.max(w_blocks, axis=-2, keepdims=True)
    lo = jnp.min(w_blocks, axis=-2, keepdims=True)
    d = (hi - lo) / 15
    inv = jnp.where(d == 0, 0.0, 1.0 / _safe(d))
    codes = jnp.clip(jnp.trunc((w_blocks - lo) * inv + 0.5), 0, 15)
    return codes, d.astype(jnp.float16), lo.astype(jnp.float16)


def quantize_kernel(w, format: str, *, block_size: int = 64, scale_dtype="float32") -> QuantizedKernel:
    """``w`` ``(*stack, k, d)`` (float) as a :class:`QuantizedKernel` of ``format``; blocks run along
    ``k`` (``block_size`` for int4 / nf4, 32 for the GGUF formats, all of ``k`` for int8)."""
    if format not in _QTYPES:
        raise ValueError(f"unknown quantization format {format!r}; choose one of {', '.join(_QTYPES)}")
    if w.ndim < 2:
        raise ValueError(f"only kernels (>= 2 dims) are quantized, got shape {tuple(w.shape)}")
    block = {"int8": 0, "int4": block_size, "nf4": block_size}.get(format, GGUF_BLOCK)
    k = w.shape[-2]
    if block and k % block:
        raise ValueError(f"a kernel with {k} input features cannot be split in blocks of {block}")
    w_blocks = _blocks(w.astype(jnp.float32), block)
    offset = None
    if format == "int8":
        codes, scale = _symmetric(w_blocks, 127, scale_dtype)
    elif format == "int4":
        codes, scale = _symmetric(w_blocks, 7, scale_dtype)
    elif format == "nf4":
        codes, scale = _nf4(w_blocks, scale_dtype)
    else:
        codes, scale, offset = _gguf(w_blocks, format)
    squeeze = lambda a: a.reshape(*a.shape[:-3], a.shape[-3], a.shape[-1])  # (*stack, nb, 1, d) -> (*stack, nb, d)
    codes = codes.reshape(w.shape).astype(_CODE_DTYPES[format])
    qarray = qwix.QArray(qvalue=codes, scale=squeeze(scale), qtype=_QTYPES[format])
    return QuantizedKernel(q=qarray, offset=None if offset is None else squeeze(offset), format=format,
                           block_size=block, dtype=jnp.dtype(w.dtype).name)


def dequantize_codes(leaf: QuantizedKernel, dtype=jnp.float32) -> jax.Array:
    """The codes' kernel, without kept merges (``qwix.dequantize`` with float32 scales, as ggml's
    dequantization computes; Q4_1 adds its block minimum), in ``dtype``."""
    w = qwix.dequantize(leaf.q.astype(jnp.float32))
    if leaf.offset is not None:
        *stack, k, d = w.shape
        nb = leaf.offset.shape[-2]
        w = (w.reshape(*stack, nb, k // nb, d) + leaf.offset.astype(jnp.float32)[..., :, None, :]).reshape(w.shape)
    return w.astype(dtype)


def dequantize(leaf: QuantizedKernel, dtype=jnp.float32) -> jax.Array:
    """The float kernel a quantized leaf stands for: its codes dequantized plus the merges kept
    beside them (if any), in ``dtype``."""
    w = dequantize_codes(leaf)
    if leaf.residual is not None and not leaf.residual.empty:
        w = w + leaf.residual.delta_weight().reshape(w.shape)
    return w.astype(dtype)


def requantize_like(leaf: QuantizedKernel, w) -> QuantizedKernel:
    """``w`` quantized in ``leaf``'s format, block size and scale dtype (a merge into a quantized base);
    kept merges, if ``leaf`` has room for them, start empty (``w`` holds them)."""
    out = quantize_kernel(w.astype(jnp.float32), leaf.format, block_size=leaf.block_size or 64,
                          scale_dtype=leaf.q.scale.dtype).replace(dtype=leaf.dtype)
    return out if leaf.residual is None else out.replace(residual=leaf.residual.cleared())


def as_float(kernel):
    """A kernel as float: a quantized leaf dequantized (float32), any other array as it is. Where a
    kernel's values are needed outside a layer (merges, DoRA's column norms, PiSSA's SVD)."""
    return dequantize(kernel) if is_quantized(kernel) else kernel


def store_like(kernel, new):
    """``new`` (float) stored as ``kernel`` was: re-quantized in its format (a merge into a quantized
    base), or cast to its dtype."""
    return requantize_like(kernel, new) if is_quantized(kernel) else new.astype(kernel.dtype)


__all__ = ["GGUF_BLOCK", "GGUF_FORMATS", "QuantizedKernel", "as_float", "code_bits", "dequantize", "dequantize_codes",
           "is_quantized", "nbytes",
           "quantize_kernel", "requantize_like", "store_like"]

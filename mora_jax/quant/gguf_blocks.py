"""GGUF's Q8_0 / Q4_0 / Q4_1 blocks as :class:`~mora_jax.quant.formats.QuantizedKernel` leaves, kept
as loaded: the codes and float16 scales (and Q4_1's minima) are the file's own bits, only rearranged
from llama.cpp's row-major blocks of one output row to the kernel layout ``(in, out)``; nothing is
dequantized on load. ``formats.dequantize`` of the leaf equals ``gguf.quants.dequantize`` of the
raw blocks (transposed), bit for bit.

Block layouts (ggml, 32 weights of one output row per block):

* Q8_0, 34 bytes: float16 ``d``, 32 int8 codes; ``w = d·q``;
* Q4_0, 18 bytes: float16 ``d``, 16 bytes of nibbles (byte ``j``: weight ``j`` low, ``j+16`` high); ``w = d·(q − 8)``;
* Q4_1, 20 bytes: float16 ``d``, float16 ``m``, 16 bytes of nibbles as Q4_0; ``w = d·q + m``.

Runs at load time on the host (NumPy), on the memory-mapped bytes the ``gguf`` reader gives.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import qwix

from mora_jax.quant.formats import GGUF_BLOCK, QuantizedKernel

BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
KEPT_TYPES = tuple(BLOCK_BYTES)


def split_blocks(raw, type_name: str):
    """Raw GGUF rows ``(rows, row bytes)`` (uint8) -> ``(codes (rows, cols) as stored, d (rows, cols/32)
    float16, m or None)``; Q4_0 codes are the nibbles − 8 (int8 here), Q4_1's the nibbles."""
    if type_name not in BLOCK_BYTES:
        raise ValueError(f"GGUF type {type_name} is not kept quantized; kept: {', '.join(KEPT_TYPES)}")
    raw = np.asarray(raw, np.uint8)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, BLOCK_BYTES[type_name])
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    m = None
    if type_name == "Q8_0":
        codes = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    else:
        start = 2 if type_name == "Q4_0" else 4
        if type_name == "Q4_1":
            m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        nibbles = blocks[..., start:]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
        codes = codes.astype(np.int8) - 8 if type_name == "Q4_0" else codes
    return codes.reshape(rows, -1), d, m


def kernel_from_rows(codes, d, m, type_name: str, dtype: str = "float32") -> QuantizedKernel:
    """A quantized kernel ``(in, out)`` from :func:`split_blocks`' rows (one per output feature)."""
    format = type_name.lower()
    code_dtype = {"q8_0": jnp.int8, "q4_0": jnp.int4, "q4_1": jnp.uint4}[format]
    qarray = qwix.QArray(qvalue=jnp.asarray(np.ascontiguousarray(codes.T), code_dtype),
                         scale=jnp.asarray(np.ascontiguousarray(d.T)), qtype=code_dtype)
    offset = None if m is None else jnp.asarray(np.ascontiguousarray(m.T))
    return QuantizedKernel(q=qarray, offset=offset, format=format, block_size=GGUF_BLOCK, dtype=dtype)


def kernel_from_blocks(raw, type_name: str, dtype: str = "float32") -> QuantizedKernel:
    """A quantized kernel ``(in, out)`` from a GGUF tensor's raw rows ``(out, row bytes)``."""
    return kernel_from_rows(*split_blocks(raw, type_name), type_name, dtype)


__all__ = ["BLOCK_BYTES", "KEPT_TYPES", "kernel_from_blocks", "kernel_from_rows", "split_blocks"]

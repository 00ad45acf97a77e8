"""MoRA and LoRA operators in pure ``jax.numpy`` (no Flax).

Notation follows ``MORA_SPEC.md``: a linear layer ``y = x @ K`` with ``K`` of shape ``(k, d)``
(``k = in_features``, ``d = out_features``), MoRA's square matrix ``m_RxR`` of size ``r̂``, and
its contribution ``Δy = decompress(compress(x) @ m)``. Every function here takes its sizes and
type as static Python ints, so it is jit-compatible and cheap to trace.

The forward path (``apply_mora``) never materialises ``ΔK``; the merge path (``delta_weight``)
builds ``ΔK`` in ``O(k·d)`` time and memory from the transposes of the same operators.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

MORA_TYPES = (1, 2, 3, 4, 6)
# Compression / decompression of the sharing types (type 6 is special-cased).
_COMPRESSION = {1: "sum", 2: "group", 3: "group", 4: "sum"}
_DECOMPRESSION = {1: "tile", 2: "interleave", 3: "tile", 4: "interleave"}


def _check_type(mora_type) -> int:
    if isinstance(mora_type, bool) or not isinstance(mora_type, (int, np.integer)):
        raise TypeError(f"mora_type must be an int in {MORA_TYPES}, got {mora_type!r}")
    if int(mora_type) not in MORA_TYPES:
        raise ValueError(
            f"unknown mora_type {mora_type!r}: MoRA defines types {MORA_TYPES} "
            "(1 = sharing, recommended for large r; 6 = RoPE-based, recommended for small r)"
        )
    return int(mora_type)


def _check_features(in_features, out_features) -> None:
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, (int, np.integer)) or int(value) <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def rank_hat(in_features: int, out_features: int, r: int, mora_type: int) -> int:
    """Size ``r̂`` of MoRA's square matrix for a ``(in_features, out_features)`` layer and LoRA rank ``r``.

    ``r̂ = floor(sqrt((k + d)·r) + 0.5)``, made even for type 6, so that ``r̂²`` matches LoRA's
    ``(k + d)·r`` trainable parameters (the reference's rounding, kept for checkpoint compatibility).
    """
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or int(r) <= 0:
        raise ValueError(f"MoRA rank r must be a positive int (the LoRA rank to match), got {r!r}")
    _check_features(in_features, out_features)
    mora_type = _check_type(mora_type)
    r_hat = int(math.floor(math.sqrt((int(in_features) + int(out_features)) * int(r)) + 0.5))
    if mora_type == 6:
        r_hat = 2 * (r_hat // 2)
    if r_hat < (2 if mora_type == 6 else 1):
        raise ValueError(
            f"r={r} gives r̂={r_hat} for a {in_features}x{out_features} layer, too small for "
            f"type {mora_type}; use a larger r"
        )
    return r_hat


# --------------------------------------------------------------------------------------------
# Building blocks. Each maps the last axis; all are linear and parameter-free.
# --------------------------------------------------------------------------------------------


def _wrap_pad(x_Bxk, length: int):
    """``P(x)_j = x_{j mod k}`` for ``j < length`` (the spec's wrap padding)."""
    k = x_Bxk.shape[-1]
    if length == k:
        return x_Bxk
    reps = -(-length // k)
    if reps > 1:
        x_Bxk = jnp.concatenate([x_Bxk] * reps, axis=-1)
    return x_Bxk[..., :length]


def _compress_sum(x_Bxk, r_hat: int):
    """S: sum of the wrapped chunks of length ``r̂``."""
    k = x_Bxk.shape[-1]
    n = -(-k // r_hat)
    padded = _wrap_pad(x_Bxk, n * r_hat)
    return padded.reshape(*x_Bxk.shape[:-1], n, r_hat).sum(axis=-2)


def _compress_group(x_Bxk, r_hat: int):
    """G: sums of ``r̂`` contiguous groups (the first ``k mod r̂`` one entry longer)."""
    k = x_Bxk.shape[-1]
    lead = x_Bxk.shape[:-1]
    q, rem = divmod(k, r_hat)
    parts = []
    if rem:
        parts.append(x_Bxk[..., : rem * (q + 1)].reshape(*lead, rem, q + 1).sum(axis=-1))
    if q:
        parts.append(x_Bxk[..., rem * (q + 1):].reshape(*lead, r_hat - rem, q).sum(axis=-1))
    else:  # k < r̂: groups past k are empty.
        parts.append(jnp.zeros((*lead, r_hat - rem), x_Bxk.dtype))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _decompress_tile(u_BxR, d: int):
    """T: ``Δy_j = u_{j mod r̂}`` (also type 6's truncate/tile of the concatenated chunks)."""
    return _wrap_pad(u_BxR, d)


def _decompress_interleave(u_BxR, d: int):
    """I: each ``u_i`` repeated in place, the first ``d mod r̂`` once more than the rest."""
    r_hat = u_BxR.shape[-1]
    q, rem = divmod(d, r_hat)
    if q == 0:
        return u_BxR[..., :d]
    head = jnp.repeat(u_BxR[..., :rem], q + 1, axis=-1) if rem else None
    tail = jnp.repeat(u_BxR[..., rem:], q, axis=-1)
    return tail if head is None else jnp.concatenate([head, tail], axis=-1)


def _compress(x_Bxk, r_hat: int, mora_type: int):
    if _COMPRESSION[mora_type] == "sum":
        return _compress_sum(x_Bxk, r_hat)
    return _compress_group(x_Bxk, r_hat)


def _decompress(u_BxR, d: int, mora_type: int):
    if _DECOMPRESSION[mora_type] == "tile":
        return _decompress_tile(u_BxR, d)
    return _decompress_interleave(u_BxR, d)


def rope_cos_sin(r_hat: int, n_chunks: int):
    """Type 6's rotation tables, float32, shape ``(n_chunks, r̂)``: chunk ``c`` rotates by ``c·θ``.

    ``θ_i = 10000^(-2i/r̂)``; angles, cosines and sines in float32 like the reference.
    """
    half = r_hat // 2
    theta_H = 1.0 / (10000.0 ** (np.arange(0, r_hat, 2, dtype=np.float32) / np.float32(r_hat)))
    angles_NxH = np.arange(n_chunks, dtype=np.float32)[:, None] * theta_H[None, :half].astype(np.float32)
    angles_NxR = np.concatenate([angles_NxH, angles_NxH], axis=-1)
    return jnp.asarray(np.cos(angles_NxR)), jnp.asarray(np.sin(angles_NxR))


def _rotate_chunks(chunks_BxNxR):
    """Rotate chunk ``c`` by angles ``c·θ`` ("rotate half" pairing), in float32."""
    n, r_hat = chunks_BxNxR.shape[-2:]
    cos_NxR, sin_NxR = rope_cos_sin(r_hat, n)
    v = chunks_BxNxR.astype(jnp.float32)
    half = r_hat // 2
    rotated_half = jnp.concatenate([-v[..., half:], v[..., :half]], axis=-1)
    return v * cos_NxR + rotated_half * sin_NxR


def _check_m(m, in_features, out_features, mora_type):
    _check_features(in_features, out_features)
    mora_type = _check_type(mora_type)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"MoRA matrix m must be square (r̂, r̂), got shape {tuple(m.shape)}")
    if mora_type == 6 and m.shape[0] % 2:
        raise ValueError(f"type 6 needs an even r̂, got m of shape {tuple(m.shape)}")
    return int(m.shape[0]), mora_type


def apply_mora(x, m, *, in_features: int, out_features: int, mora_type: int):
    """MoRA's contribution ``Δy = decompress(compress(x) @ m)``, shape ``(..., out_features)``.

    ``x`` has shape ``(..., in_features)`` (any number of leading dims); ``m`` is ``(r̂, r̂)`` in
    kernel layout. Computes in ``x``'s dtype (``m`` is cast to it); type 6's rotation is computed
    in float32.
    """
    r_hat, mora_type = _check_m(m, in_features, out_features, mora_type)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features on its last axis, expected in_features={in_features}")
    dtype = x.dtype
    m = m.astype(dtype)
    if mora_type != 6:
        z_BxR = _compress(x, r_hat, mora_type)
        return _decompress(z_BxR @ m, out_features, mora_type)
    n = -(-in_features // r_hat)
    chunks_BxNxR = _wrap_pad(x, n * r_hat).reshape(*x.shape[:-1], n, r_hat)
    u_BxNxR = _rotate_chunks(chunks_BxNxR).astype(dtype) @ m
    return _decompress_tile(u_BxNxR.reshape(*x.shape[:-1], n * r_hat), out_features)


def delta_weight(m, *, in_features: int, out_features: int, mora_type: int):
    """The dense update ``ΔK`` (``(in_features, out_features)``, float32) with ``x @ ΔK == apply_mora(x, m)``.

    Built in ``O(k·d)`` from the transposed compression (types 1–4: ``ΔK = C·M·D``) or from a
    scatter-add of the rotated blocks (type 6), never by pushing an identity through the forward
    path. Works for every shape the forward supports, including type 6 with one chunk.
    """
    r_hat, mora_type = _check_m(m, in_features, out_features, mora_type)
    k, d = in_features, out_features
    m = m.astype(jnp.float32)
    if mora_type != 6:
        # C·M: the adjoint of compression applied to the rows of Mᵀ; then D on each row.
        compress_T = jax.linear_transpose(
            lambda x: _compress(x, r_hat, mora_type), jax.ShapeDtypeStruct((r_hat, k), jnp.float32)
        )
        (cm_RxK,) = compress_T(m.T)
        return _decompress(cm_RxK.T, d, mora_type)
    n = -(-k // r_hat)
    width = min(d, n * r_hat)  # columns of Cp·B that the truncate/tile can reach
    n_blocks = -(-width // r_hat)
    # Block c of B is R_c·M; row s of R_c·M is rot_c(e_s)·M.
    rot_NxRxR = _rotate_chunks(jnp.broadcast_to(jnp.eye(r_hat, dtype=jnp.float32), (n_blocks, r_hat, r_hat)).transpose(1, 0, 2))
    blocks_NxRxR = jnp.einsum("snt,tu->nsu", rot_NxRxR, m)
    # Row p = c·r̂ + s of the padded input is input feature p mod k.
    rows_NxR = (np.arange(n_blocks)[:, None] * r_hat + np.arange(r_hat)[None, :]) % k
    cols_N = np.arange(n_blocks)
    cp_b = jnp.zeros((k, n_blocks, r_hat), jnp.float32)
    cp_b = cp_b.at[rows_NxR, cols_N[:, None]].add(blocks_NxRxR)
    cp_b_KxW = cp_b.reshape(k, n_blocks * r_hat)[:, :width]
    return _wrap_pad(cp_b_KxW, d)


# --------------------------------------------------------------------------------------------
# LoRA, for comparison in the same framework.
# --------------------------------------------------------------------------------------------


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """``α/r`` (or ``α/√r`` for rsLoRA)."""
    return float(alpha) / (math.sqrt(r) if rslora else float(r))


def apply_lora(x, a, b, *, scale: float):
    """LoRA's contribution ``Δy = scale·(x @ a) @ b``, ``a (k, r)``, ``b (r, d)``; computes in ``x``'s dtype."""
    dtype = x.dtype
    return ((x @ a.astype(dtype)) @ b.astype(dtype)) * jnp.asarray(scale, dtype)


def lora_delta_weight(a, b, *, scale: float):
    """``ΔK = scale·a @ b`` in float32."""
    return scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))

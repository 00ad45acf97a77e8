"""MoRA and LoRA operators in pure ``jax.numpy`` (no Flax).

Notation follows ``docs/mora.md``: a linear layer ``y = x @ K`` with ``K`` of shape ``(k, d)``
(``k = in_features``, ``d = out_features``), MoRA's square matrix ``m_RxR`` of size ``r̂``, and
its contribution ``Δy = decompress(compress(x) @ m)``. Every function here takes its sizes and
type as static Python ints, so it is jit-compatible and cheap to trace.

The forward path (``apply_mora``) never materialises ``ΔK``; the merge path (``delta_weight``)
builds ``ΔK`` in ``O(k·d)`` time and memory from the transposes of the same operators.
"""

from __future__ import annotations

import functools
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
    """``P(x)_j = x_{j mod k}`` for ``j < length`` (wrap padding, ``docs/mora.md``)."""
    k = x_Bxk.shape[-1]
    if length == k:
        return x_Bxk
    reps = -(-length // k)
    if reps > 1:
        # A broadcast + reshape, not a concatenate of ``reps`` copies: XLA fuses it into the consumer
        # as index arithmetic (a many-operand concatenate becomes a chain of selects per element on
        # CPU), and its transpose is one reduction instead of ``reps`` slices and adds.
        lead = x_Bxk.shape[:-1]
        x_Bxk = jnp.broadcast_to(x_Bxk[..., None, :], (*lead, reps, k)).reshape(*lead, reps * k)
    return x_Bxk[..., :length]


def _compress_sum(x_Bxk, r_hat: int):
    """S: sum of the wrapped chunks of length ``r̂``.

    Two forms of the same sum, chosen by the platform the program is compiled for. XLA:CPU is
    fastest with the padded input reshaped and reduced. On a TPU that wrote the padded array and a
    broadcast of it for the backward pass, per projection; there, up to four chunks are added slice
    by slice (the padding a concatenate, :func:`_repeat_to`): one fusion reading ``x`` (the 250M
    step moved 8% fewer HBM bytes). Sliced on a CPU, a 250M MoRA r=128 step took 1.28x as long."""
    n = -(-x_Bxk.shape[-1] // r_hat)
    if n == 1 or n > 4:
        return _compress_sum_reshaped(x_Bxk, r_hat)
    return jax.lax.platform_dependent(x_Bxk, cpu=lambda x: _compress_sum_reshaped(x, r_hat),
                                      default=lambda x: _compress_sum_sliced(x, r_hat))


def _compress_sum_reshaped(x_Bxk, r_hat: int):
    n = -(-x_Bxk.shape[-1] // r_hat)
    return _wrap_pad(x_Bxk, n * r_hat).reshape(*x_Bxk.shape[:-1], n, r_hat).sum(axis=-2)


def _compress_sum_sliced(x_Bxk, r_hat: int):
    n = -(-x_Bxk.shape[-1] // r_hat)
    padded = _repeat_to(x_Bxk, n * r_hat)
    out = padded[..., :r_hat]
    for c in range(1, n):
        out = out + padded[..., c * r_hat:(c + 1) * r_hat]
    return out


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
    """T: ``Δy_j = u_{j mod r̂}``: broadcast on a CPU (:func:`_wrap_pad`), a few copies concatenated
    elsewhere (:func:`_repeat_to`; on a TPU it fuses into its consumer, see :func:`_compress_sum`)."""
    if d <= u_BxR.shape[-1]:
        return u_BxR[..., :d]
    return jax.lax.platform_dependent(u_BxR, cpu=lambda u: _wrap_pad(u, d), default=lambda u: _repeat_to(u, d))


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


def rotated_blocks(m_RxR, n_chunks: int):
    """Type 6's ``R_c·M`` for chunks ``c < n_chunks``, float32, ``(n_chunks, r̂, r̂)``: chunk ``c`` of
    the input, rotated by ``c·θ`` and multiplied by ``M``, is the chunk times block ``c``.

    Row ``s`` of ``R_c·M`` is ``rot_c(e_s)·M = cos_s·M[s] ± sin_s·M[s ∓ r̂/2]`` (the "rotate half"
    pairing of ``s`` with ``s ± r̂/2``): ``O(n·r̂²)`` elementwise work, no ``n·r̂³`` matmul with a
    rotation matrix, angles in float32."""
    r_hat = m_RxR.shape[-1]
    cos_NxR, sin_NxR = rope_cos_sin(r_hat, n_chunks)
    m = m_RxR.astype(jnp.float32)
    half = r_hat // 2
    m_swapped = jnp.concatenate([m[half:], -m[:half]], axis=0)
    return cos_NxR[:, :, None] * m[None] + sin_NxR[:, :, None] * m_swapped[None]


def _compress_adjoint_rows(m_RxR, k: int, mora_type: int):
    """``C·M`` of shape ``(k, r̂)``: the adjoint of the compression ``x ↦ compress(x)`` (a ``(k, r̂)``
    matrix ``C``, ``compress(x) = x·C``) applied to the rows of ``M``.

    Sum (types 1, 4): padded input ``j < n·r̂`` is feature ``j mod k`` and lands in slot ``j mod r̂``,
    so row ``i`` sums ``M[j mod r̂]`` over ``j ≡ i (mod k)``: tile ``M``'s rows, fold them mod ``k``.
    Group (types 2, 3): feature ``i`` lands in its group's slot, so ``M``'s rows repeat by group size.
    """
    r_hat = m_RxR.shape[0]
    if _COMPRESSION[mora_type] == "sum":
        n = -(-k // r_hat)
        rows = n * r_hat
        tiled = jnp.broadcast_to(m_RxR[None], (n, r_hat, r_hat)).reshape(rows, r_hat)
        # Fold rows mod k as a sum of row slices (a pad + reshape + reduce gets fused with the
        # decompression by XLA's CPU backend into a padded output plus a copy: ~2x slower).
        out = tiled[:k]
        for start in range(k, rows, k):
            part = tiled[start:start + k]
            out = out + jnp.pad(part, ((0, k - part.shape[0]), (0, 0)))
        return out
    q, rem = divmod(k, r_hat)
    if q == 0:  # k < r̂: feature i alone in group i
        return m_RxR[:k]
    tail = jnp.repeat(m_RxR[rem:], q, axis=0)
    return jnp.concatenate([jnp.repeat(m_RxR[:rem], q + 1, axis=0), tail], axis=0) if rem else tail


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
    kernel layout. Computes in ``x``'s dtype (``m`` is cast to it); type 6's rotations are computed
    in float32 and folded into ``m`` (:func:`rotated_blocks`) before the cast.
    """
    r_hat, mora_type = _check_m(m, in_features, out_features, mora_type)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features on its last axis, expected in_features={in_features}")
    if mora_type != 6:
        z_BxR = _compress(x, r_hat, mora_type)
        return _decompress(z_BxR @ m.astype(x.dtype), out_features, mora_type)
    n = -(-in_features // r_hat)
    # The chunk products are concatenated and truncated/tiled to out_features: when d < n·r̂ only
    # the first ceil(d/r̂) chunks reach the output, so only those are multiplied (e.g. a 2560→768
    # down_proj at r=8 needs 5 of its 16 chunks). Chunk c keeps its angle c·θ.
    n = min(n, -(-out_features // r_hat))
    return _type6_product(x, m, n, out_features)


def _type6_product(x, m, n: int, out_features: int):
    """Type 6's ``tile(concat_c(rot_c(chunk_c) @ M))`` over the first ``n`` chunks, in the form that is
    fastest where the program is compiled (``lax.platform_dependent``; same values up to rounding,
    ``tests/test_ops.py``):

    * on a CPU, :func:`_type6_rotated`: the chunks rotated as activations and multiplied by the one
      ``M`` in a single 2-D matmul, the last chunk only against the columns of ``M`` that reach the
      output;
    * on a TPU, :func:`_type6_windowed`: each chunk read in place, as a lane-aligned window of ``x``,
      by its block ``R_c·M`` padded with zero rows (no relayout of ``x`` into chunks);
    * elsewhere (GPUs, not measured), :func:`_type6_folded`: the rotations folded into ``n`` blocks
      ``R_c·M`` and met by the chunks in one batched matmul."""
    return jax.lax.platform_dependent(x, m, cpu=lambda x, m: _type6_rotated(x, m, n, out_features),
                                      tpu=lambda x, m: _type6_windowed(x, m, n, out_features),
                                      default=lambda x, m: _type6_folded(x, m, n, out_features))


TPU_LANES = 128  # the minor-dimension tile of a TPU array: slices at multiples of it are read in place


def _type6_windowed(x, m, n: int, out_features: int):
    """``concat_c(chunk_c @ (R_c·M))``, tiled, with each chunk read where it lies in ``x``: the smallest
    window of whole :data:`TPU_LANES`-lane tiles around it, times its block ``R_c·M`` (float32, then
    ``x``'s dtype) padded with zero rows to the window. Only the ``W = min(d, n·r̂)`` columns that reach
    the output are computed, and the tile is :func:`_tile_by_sum`.

    The chunked form (:func:`_type6_folded`) reshapes ``x`` into ``(…, n, r̂)``; unless ``r̂`` is a
    multiple of 128 a TPU copies ``x`` into that layout, and back for the gradient, per projection
    (a Llama-3.1-8B MLP block on one v6e chip, 16,384 tokens, r=16, ``r̂`` = 542: 17.1 GB of HBM traffic
    against LoRA's 14.1 GB). Windows read ``x`` in place (12.3 GB) for a few more FLOPs: the zero rows,
    up to 254 per chunk."""
    r_hat, k = m.shape[-1], x.shape[-1]
    x = _row_major(x)
    width = min(out_features, n * r_hat)
    outs = []
    for c, rows in enumerate(_block_rows(rotated_blocks(m, n), k)):
        cols = min(r_hat, width - c * r_hat)
        u = None
        for start, block in rows:
            stop = start + block.shape[0]
            lo = start // TPU_LANES * TPU_LANES
            hi = min(-(-stop // TPU_LANES) * TPU_LANES, k)
            block = jnp.pad(block[:, :cols].astype(x.dtype), ((start - lo, hi - stop), (0, 0)))
            part = x[..., lo:hi] @ block
            u = part if u is None else u + part
        outs.append(u)
    u = _row_major(outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1))
    return _row_major(_tile_by_sum(u, out_features))


def _row_major(v):
    """``v`` in the row-major layout, features minor. A TPU's matmuls over narrow windows prefer the
    tokens minor; left free, the compiler gave ``(batch, seq, features)`` activations that layout
    (features major, so a window is a contiguous block) and copied the projections' outputs into it
    and back: a planned Llama-3.1-8B type-6 step (v6e 2x2, 4 layers) had 7 copies of 3.8 GB each per
    chip. Pinned, a window is a lane-aligned slice read in place."""
    from jax.experimental.layout import Layout, with_layout_constraint

    return with_layout_constraint(v, Layout(tuple(range(v.ndim))))


def _type6_folded(x, m, n: int, out_features: int):
    """``chunk_c @ (R_c·M)``: the rotations folded into ``n`` small ``r̂ × r̂`` blocks
    (:func:`rotated_blocks`, float32, then the input's dtype) and the chunks met in one batched matmul.

    Rotating the activations in float32 and keeping them instead writes a float32 array the size of
    the input per adapted projection, keeps its cast for the backward pass, and reads and writes it
    again there: on a TPU v5e that made a type-6 step of the 250M model take 1.5x LoRA's memory per
    chip and 1.3x its estimated time (``docs/tpu.md``, "Choices the plans informed"). Folded,
    the backward pass keeps the chunks, which are ``x`` itself when ``r̂`` divides ``k``."""
    r_hat = m.shape[-1]
    blocks_NxRxR = rotated_blocks(m, n).astype(x.dtype)
    chunks_BxNxR = _repeat_to(x, n * r_hat).reshape(*x.shape[:-1], n, r_hat)
    u_BxNxR = jnp.einsum("...nr,nrs->...ns", chunks_BxNxR, blocks_NxRxR)
    return _tile_by_sum(u_BxNxR.reshape(*x.shape[:-1], n * r_hat), out_features)


def _tile_by_sum(u, length: int):
    """``_wrap_pad`` as a sum of zero-padded copies of ``u`` at offsets ``0, W, 2W, …`` (``W`` its
    width): element-wise, so a TPU fuses it into the add of the projection's output. The concatenate
    form (:func:`_repeat_to`) was written to HBM and read back, forward and recomputed: in a planned
    Llama-3.1-8B type-6 step (v6e 2x2, 4 layers, r=16, seq 4096, batch 16, remat full) 4.7 GB per
    gate/up projection entry; summed, the step moved 267 GB instead of 286 GB (estimated 163 ms
    instead of 174 ms, ``docs/tpu.md``)."""
    width = u.shape[-1]
    if length <= width:
        return u[..., :length]
    out = None
    for start in range(0, length, width):
        w = min(width, length - start)
        piece = jnp.pad(u[..., :w], [(0, 0)] * (u.ndim - 1) + [(start, length - start - w)])
        out = piece if out is None else out + piece
    return out


def _type6_rotated(x, m, n: int, out_features: int):
    """Type 6 as the reference orders it, rotate then multiply, arranged for XLA:CPU: the wrap-padded
    chunks are rotated (float32, then ``x``'s dtype) in one element-wise pass that XLA fuses with the
    padding, and every full chunk meets the one ``M`` in a single 2-D ``(rows·chunks, r̂) @ (r̂, r̂)``
    matmul. The folded form's batched matmul over chunks runs on XLA:CPU as a transpose, a slow
    batched dot and a transpose back (a 250M type-6 r=8 step: 1.10x LoRA's CPU time, 1.03x this way).

    Only the ``W = min(d, n·r̂)`` columns that reach the output are computed: when ``d`` ends inside
    a chunk, that chunk meets only the first ``d mod r̂`` columns of ``M`` (a 2560→768 down_proj at
    r=128, ``r̂ = 652``, computes 768 columns, not 1304). :func:`mora_jax.flops.adapter_flops_per_token`
    counts the same. The tile to ``d > W`` columns is a broadcast XLA fuses into the output's add."""
    r_hat = m.shape[-1]
    width = min(out_features, n * r_hat)
    u = _rotated_product(x, m.astype(x.dtype), width)
    return _wrap_pad(u, out_features) if out_features > width else u


def _rotated_chunks(x, r_hat: int, width: int):
    """The wrap-padded input's chunks that reach the first ``width`` output columns, rotated (chunk
    ``c`` by ``c·θ``, float32, cast to ``x``'s dtype) and flattened to rows: ``[(rows·full, r̂)]`` for
    the ``full = width // r̂`` whole chunks, then ``(rows, r̂)`` for the partial one, if any."""
    full, cols = divmod(width, r_hat)
    n = full + (cols > 0)
    cos_NxR, sin_NxR = rope_cos_sin(r_hat, n)
    padded = _wrap_pad(x, n * r_hat).reshape(*x.shape[:-1], n, r_hat).astype(jnp.float32)
    half = r_hat // 2

    def rotate(v, cos, sin):
        return (v * cos + jnp.concatenate([-v[..., half:], v[..., :half]], axis=-1) * sin).astype(x.dtype)

    parts = []
    if full:
        parts.append(rotate(padded[..., :full, :], cos_NxR[:full], sin_NxR[:full]).reshape(-1, r_hat))
    if cols:
        parts.append(rotate(padded[..., full, :], cos_NxR[full], sin_NxR[full]).reshape(-1, r_hat))
    return parts


def _split_columns(u, r_hat: int, width: int):
    """``u (..., width)`` as the rows of :func:`_rotated_chunks`' parts: ``(rows·full, r̂)``, ``(rows, cols)``."""
    full, cols = divmod(width, r_hat)
    u = u.reshape(-1, width)
    parts = []
    if full:
        parts.append((u[:, : full * r_hat] if cols else u).reshape(-1, r_hat))
    if cols:
        parts.append(u[:, full * r_hat:])
    return parts


def _chunk_matrices(m, width: int):
    """The right operand of each part of :func:`_rotated_chunks`: ``M`` for the whole chunks, its
    first ``width mod r̂`` columns for the partial one."""
    full, cols = divmod(width, m.shape[-1])
    return [m] * (full > 0) + [m[:, :cols]] * (cols > 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rotated_product(x, m, width: int):
    """The first ``width`` columns of ``concat_c(rot_c(chunk_c) @ M)``: ``(..., width)``, in ``x``'s dtype
    (``m`` already cast to it). Its gradient is written out so that it keeps only ``x`` (the rotated
    chunks are recomputed, element-wise, in the backward pass; ``x`` is often kept anyway, shared by
    the projections that read it) and contracts ``∂M`` over rows without transposing an activation."""
    outs = [part @ mat for part, mat in zip(_rotated_chunks(x, m.shape[-1], width), _chunk_matrices(m, width))]
    outs = [o.reshape(*x.shape[:-1], -1) for o in outs]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)


def _rotated_product_fwd(x, m, width: int):
    return _rotated_product(x, m, width), (x, m)


def _rotated_product_bwd(width: int, residuals, du):
    x, m = residuals
    r_hat = m.shape[-1]
    parts, rotate_vjp = jax.vjp(lambda x: _rotated_chunks(x, r_hat, width), x)
    grads = _split_columns(du, r_hat, width)
    mats = _chunk_matrices(m, width)
    (dx,) = rotate_vjp([g @ mat.T for g, mat in zip(grads, mats)])
    dm = None
    for part, g in zip(parts, grads):  # the partial chunk's ∂M fills the first columns only
        piece = jnp.pad(_contract_leading(part, g).astype(jnp.float32), ((0, 0), (0, r_hat - g.shape[-1])))
        dm = piece if dm is None else dm + piece
    return dx, dm.astype(m.dtype)


_rotated_product.defvjp(_rotated_product_fwd, _rotated_product_bwd)


def _repeat_to(v, length: int):
    """``_wrap_pad`` for a few repeats (type 6's ``n·r̂`` just above ``k``; the output tile, ``d`` a
    small multiple of ``r̂`` or ``n·r̂``): a concatenate of whole copies and a slice. On a TPU it fuses into its
    consumer, where the broadcast form left a materialised ``reps × width`` array (and its adjoint
    a padded one), twice the temporaries of a 4096→11008 projection."""
    width = v.shape[-1]
    reps, rem = divmod(length, width)
    if reps > 4:
        return _wrap_pad(v, length)
    parts = [v] * reps + ([v[..., :rem]] if rem else [])
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def delta_weight(m, *, in_features: int, out_features: int, mora_type: int):
    """The dense update ``ΔK`` (``(in_features, out_features)``, float32) with ``x @ ΔK == apply_mora(x, m)``.

    Built in ``O(k·d)`` from the transposed compression (types 1–4: ``ΔK = C·M·D``) or by placing
    the rotated blocks ``R_c·M`` into a zero output (type 6), never by pushing an identity through the forward
    path. Works for every shape the forward supports, including type 6 with one chunk.
    """
    _, mora_type = _check_m(m, in_features, out_features, mora_type)
    k, d = in_features, out_features
    m = m.astype(jnp.float32)
    if mora_type != 6:
        # C·M (k, r̂), built directly in (k, r̂) layout so that the decompression reads it
        # contiguously (jax.linear_transpose of the compression yields (r̂, k) and a transposed
        # operand makes the output loop a strided gather, ~2x slower); then D on each row.
        return _decompress(_compress_adjoint_rows(m, k, mora_type), d, mora_type)
    out = jnp.zeros((k, d), jnp.float32)
    for row, col, piece in _type6_pieces(m, k, d):
        out = jax.lax.dynamic_update_slice(out, piece, (row, col))
    return out


def _type6_pieces(m_RxR, k: int, d: int):
    """Type 6's ``ΔK`` as non-overlapping blocks ``[(row, col, block)]``; zero elsewhere.

    Block ``c`` of ``B`` is ``R_c·M`` (:func:`rotated_blocks`, the forward pass's blocks). Padded input row ``p = c·r̂ + s`` (input feature
    ``p mod k``) meets block ``c`` in output columns ``c·r̂ + u``, repeated every ``width`` columns
    (the tile).
    """
    r_hat = m_RxR.shape[0]
    n = -(-k // r_hat)
    width = min(d, n * r_hat)  # columns of Cp·B that the truncate/tile can reach
    n_blocks = -(-width // r_hat)
    rows_of_block = _block_rows(rotated_blocks(m_RxR, n_blocks), k)
    pieces = []
    for tile_start in range(0, d, width):
        for c in range(n_blocks):
            col = tile_start + c * r_hat
            n_cols = min(r_hat, width - c * r_hat, d - col)
            if n_cols <= 0:
                break
            pieces += [(row, col, piece[:, :n_cols]) for row, piece in rows_of_block[c]]
    return pieces


def _block_rows(blocks_NxRxR, k: int):
    """Where each block ``R_c·M`` meets the input's ``k`` features: per block, ``[(first feature, rows)]``.
    Padded input row ``p = c·r̂ + s`` is feature ``p mod k``: a block that runs past ``k`` splits in two
    (its last rows meet the first features), and a single chunk longer than the input is folded onto it."""
    r_hat = blocks_NxRxR.shape[-1]
    rows_of_block = []
    for c in range(blocks_NxRxR.shape[0]):
        block = blocks_NxRxR[c]
        start = c * r_hat
        if r_hat > k:  # a single chunk longer than the input wraps onto itself: fold it
            reps = -(-r_hat // k)
            block = jnp.pad(block, ((0, reps * k - r_hat), (0, 0))).reshape(reps, k, r_hat).sum(axis=0)
            rows_of_block.append([(0, block)])
        elif start + r_hat <= k:
            rows_of_block.append([(start, block)])
        else:  # the last chunk's rows wrap to the first input features
            rows_of_block.append([(start, block[: k - start]), (0, block[k - start:])])
    return rows_of_block


def merge_into(kernel_KxD, m, *, in_features: int, out_features: int, mora_type: int, sign: float = 1.0):
    """``kernel + sign·ΔK`` (float32 accumulate, ``kernel``'s dtype out), ``kernel`` ``(k, d)``.

    Types 1-4 add the dense ``ΔK``. Type 6's ``ΔK`` is zero outside its rotated blocks, so only those
    blocks of ``kernel`` are read and rewritten (in place under ``jax.jit(..., donate_argnums=...)``):
    the merge touches ``~n_blocks·r̂²`` entries instead of all ``k·d``."""
    _, mora_type = _check_m(m, in_features, out_features, mora_type)
    if kernel_KxD.shape != (in_features, out_features):
        raise ValueError(f"kernel has shape {tuple(kernel_KxD.shape)}, expected ({in_features}, {out_features})")
    sign = jnp.float32(sign)
    if mora_type != 6:
        delta = delta_weight(m, in_features=in_features, out_features=out_features, mora_type=mora_type)
        return (kernel_KxD.astype(jnp.float32) + sign * delta).astype(kernel_KxD.dtype)
    out = kernel_KxD
    placed = _type6_pieces(m.astype(jnp.float32), in_features, out_features)
    # Materialise the blocks first: fused into each in-place update, XLA:CPU recomputes the
    # rotation per element at a fraction of the speed (4096x11008, r=8: 54 ms this way, 100 ms
    # fused, 85 ms for the dense K + ΔK).
    blocks = jax.lax.optimization_barrier([piece for _, _, piece in placed])
    for (row, col, _), piece in zip(placed, blocks):
        region = jax.lax.dynamic_slice(out, (row, col), piece.shape)
        out = jax.lax.dynamic_update_slice(out, (region.astype(jnp.float32) + sign * piece).astype(out.dtype), (row, col))
    return out


# --------------------------------------------------------------------------------------------
# LoRA, for comparison in the same framework.
# --------------------------------------------------------------------------------------------


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """LoRA's output scale: ``α/r``, or ``α/√r`` for rsLoRA (``Δy = scale·(x·A)·B``).

    The one place the scale is computed: ``LoRAAdapter.scale`` and the CLI's adapter report call
    this rather than recomputing it (``docs/mora.md``, "LoRA, the baseline")."""
    return float(alpha) / (math.sqrt(r) if rslora else float(r))


def _contract_leading(u, v):
    """``uᵀ·v`` over all leading axes of ``u (..., p)`` and ``v (..., q)``: ``(p, q)``. Flattened to
    rows first: contracting two axes at once makes XLA:CPU transpose both operands."""
    u_NxP, v_NxQ = u.reshape(-1, u.shape[-1]), v.reshape(-1, v.shape[-1])
    return jax.lax.dot_general(u_NxP, v_NxQ, (((0,), (0,)), ((), ())))


@jax.custom_vjp
def _low_rank_product(x, a, b):
    """``(x @ a) @ b``. Its gradient is written out so that no activation-sized transpose is
    materialised: autodiff's ``∂b = hᵀ·∂y`` makes XLA:CPU write a transposed copy of every
    ``∂y`` (and its producer fusion) before a skinny dot; ``(∂yᵀ·h)ᵀ`` transposes an ``(r, d)``
    result instead (about 8% of a LoRA step on the 250M model, ``docs/benchmarks.md``)."""
    return (x @ a) @ b


def _low_rank_product_fwd(x, a, b):
    h = x @ a
    return h @ b, (x, a, b, h)


def _low_rank_product_bwd(residuals, dy):
    x, a, b, h = residuals
    dh = dy @ b.T
    da = _contract_leading(x, dh)  # (k, r)
    db = _contract_leading(dy, h).T  # (d, r) -> (r, d)
    return dh @ a.T, da, db


_low_rank_product.defvjp(_low_rank_product_fwd, _low_rank_product_bwd)


def apply_lora(x, a, b, *, scale: float):
    """LoRA's contribution ``Δy = (x @ (scale·a)) @ b``, ``a (k, r)``, ``b (r, d)``; computes in ``x``'s dtype.

    Reverse-mode differentiable (a custom VJP with the same gradients as autodiff); forward-mode
    (``jax.jvp``) is not defined through it."""
    dtype = x.dtype
    return _low_rank_product(x, a.astype(dtype) * jnp.asarray(scale, dtype), b.astype(dtype))


def lora_delta_weight(a, b, *, scale: float):
    """``ΔK = scale·a @ b`` in float32."""
    return scale * (a.astype(jnp.float32) @ b.astype(jnp.float32))

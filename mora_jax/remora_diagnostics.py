"""What a ReMoRA / ReLoRA merge did, in numbers a curve can show.

The argument for ReMoRA is that repeated merges of fresh high-rank updates (with operator types
that change from one period to the next) let the total change of a weight, accumulated since the
start of training, reach a higher rank than one adapter could. Two cheap measurements make that
visible in ``metrics.jsonl`` at every merge:

* :func:`delta_norms`: the Frobenius norm of the ``ΔW`` being merged, per layer type (``q_proj``,
  ``down_proj``, ...; the root of the sum of squares over layers), computed kernel by kernel so at
  most one ``ΔW`` is materialised at a time.
* :func:`accumulated_ranks`: for a few kernels, the singular values of ``W_now − W_start`` (on the
  host, float64): the numerical rank (singular values above ``RANK_RTOL`` of the largest) and the
  effective rank ``exp(H(σ/Σσ))`` (Roy & Vetterli), which needs no threshold.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax.adapters import flatten, path_str
from mora_jax.quant.formats import as_float

RANK_RTOL = 1e-3  # singular values below this fraction of the largest count as numerical noise


@jax.jit
def _frobenius(adapter):
    return jnp.sqrt(jnp.sum(jnp.square(adapter.delta_weight())))


@jax.jit
def _merged_frobenius(adapter, kernel):
    """``‖merge(K) − K‖_F`` in float32: the change the merge writes, for every method (HiRA's
    ``K ⊙ A·B``, DoRA's and a magnitude's rescaling need the kernel; a quantized one is dequantized)."""
    k32 = as_float(kernel).astype(jnp.float32)
    return jnp.sqrt(jnp.sum(jnp.square(adapter.add_to(k32) - k32)))


def delta_norms(adapters, frozen=None) -> dict[str, float]:
    """``{"merge_delta_norm/<layer type>": ‖ΔW‖_F}`` over every adapter of that layer type (the
    module name that owns the kernel, e.g. ``q_proj``). With the frozen weights ``frozen`` (the
    parameter tree the adapters merge into) ``ΔW`` is what the merge writes, ``merge(K) − K``;
    without them, the adapter's own ``delta_weight()`` (exact for MoRA and LoRA, not for methods
    whose update depends on the kernel)."""
    kernels = flatten(frozen) if frozen is not None else {}
    squares: dict[str, float] = {}
    for path, adapter in sorted(flatten(adapters).items()):
        kind = str(path[-2]) if len(path) >= 2 else str(path[-1])
        kernel = kernels.get(path)
        norm = _frobenius(adapter) if kernel is None else _merged_frobenius(adapter, kernel)
        squares[kind] = squares.get(kind, 0.0) + float(norm) ** 2
    return {f"merge_delta_norm/{kind}": float(np.sqrt(total)) for kind, total in squares.items()}


def probe_paths(adapters, count: int = 2) -> list[tuple]:
    """The kernels whose accumulated change is tracked: the first and the last adapted kernel in
    path order (e.g. the first layer's ``q_proj`` and the last layer's ``down_proj``)."""
    paths = sorted(flatten(adapters))
    if len(paths) <= count:
        return paths
    step = (len(paths) - 1) / (count - 1)
    return [paths[round(i * step)] for i in range(count)]


def _host(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float64)


def rank_of(delta: np.ndarray) -> tuple[int, float]:
    """``(numerical rank, effective rank)`` of a matrix, or of each matrix of a stack (the mean)."""
    delta = delta.reshape(-1, *delta.shape[-2:])
    ranks, effective = [], []
    for matrix in delta:
        s = np.linalg.svd(matrix, compute_uv=False)
        if not s.size or s[0] == 0:
            ranks.append(0)
            effective.append(0.0)
            continue
        ranks.append(int(np.sum(s > RANK_RTOL * s[0])))
        p = s / s.sum()
        p = p[p > 0]
        effective.append(float(np.exp(-np.sum(p * np.log(p)))))
    return int(round(np.mean(ranks))), float(np.mean(effective))


def accumulated_ranks(frozen_now, frozen_start, adapters, paths) -> dict[str, float]:
    """``accumulated_rank/<path>`` and ``accumulated_effective_rank/<path>`` of ``W_now − W_start``
    for each of ``paths`` (adapted kernels, seen as ``(in_features, out_features)`` matrices)."""
    now, start, flat_adapters = flatten(frozen_now), flatten(frozen_start), flatten(adapters)
    out: dict[str, float] = {}
    for path in paths:
        adapter = flat_adapters[path]
        delta = _host(as_float(now[path])) - _host(as_float(start[path]))  # a quantized base: its float values
        rank, effective = rank_of(delta.reshape(-1, adapter.in_features, adapter.out_features))
        name = path_str(path)
        out[f"accumulated_rank/{name}"] = rank
        out[f"accumulated_effective_rank/{name}"] = effective
    return out


__all__ = ["RANK_RTOL", "accumulated_ranks", "delta_norms", "probe_paths", "rank_of"]

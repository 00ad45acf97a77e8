"""PiSSA (principal singular values and singular vectors adaptation, arXiv 2404.02948).

PiSSA is LoRA (``Δy = s·(x·A)·B``) with another start: for a kernel ``K (k, d) = U·S·Vᵀ``,

    A₀ = U_r·√(S_r/s),   B₀ = √(S_r/s)·V_rᵀ,   K_res = K − s·A₀·B₀

so ``s·A₀·B₀`` is the best rank-``r`` approximation of ``K`` and the frozen base becomes the residual
``K_res``; the model is unchanged at the start. Runtime, merge and sharding are LoRA's (the adapter
node is a :class:`PiSSAAdapter`, a :class:`~mora_jax.adapters.LoRAAdapter` marked as PiSSA).

``niter=None`` uses the exact SVD; an int uses a randomized SVD (a Gaussian sketch of ``r`` columns
and ``niter`` subspace iterations, as ``torch.svd_lowrank`` that PEFT's ``pissa_niter_<n>`` calls).

Export (:func:`to_lora`): trained ``A``, ``B`` on ``K_res`` are, on the original ``K``, the update
``s·(A·B − A₀·B₀) = s·[A | A₀]·[B ; −B₀]``: a plain rank-``2r`` LoRA with ``α`` doubled (rsLoRA:
``×√2``) so that the scale is unchanged, PEFT's ``path_initial_model_for_weight_conversion``.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp

from mora_jax.adapters import LoRAAdapter, _select, _split_shape, flatten, unflatten
from mora_jax.methods import LoRAConfig, PiSSAConfig
from mora_jax.ops import lora_scale
from mora_jax.quant.formats import as_float, store_like


@flax.struct.dataclass
class PiSSAAdapter(LoRAAdapter):
    """A LoRA adapter started by PiSSA; ``niter`` (static) is how it restarts after a merge."""

    niter: int | None = flax.struct.field(pytree_node=False, default=None)


def _randomized_svd(kernel_KxD, r: int, niter: int, key):
    """``(U_r, S_r, V_rᵀ)`` of ``K`` by a range finder with ``niter`` subspace iterations."""
    q = min(r, *kernel_KxD.shape)
    omega = jax.random.normal(key, (kernel_KxD.shape[1], q), kernel_KxD.dtype)
    basis, _ = jnp.linalg.qr(kernel_KxD @ omega)
    for _ in range(niter):
        z, _ = jnp.linalg.qr(kernel_KxD.T @ basis)
        basis, _ = jnp.linalg.qr(kernel_KxD @ z)
    u_small, s, vt = jnp.linalg.svd(basis.T @ kernel_KxD, full_matrices=False)
    return basis @ u_small, s, vt


def principal_init(kernel_KxD, r: int, scale: float, niter: int | None, key):
    """``(A₀ (k, r), B₀ (r, d), K_res)`` in float32 for one 2-D kernel."""
    k32 = kernel_KxD.astype(jnp.float32)
    if niter is None:
        u, s, vt = jnp.linalg.svd(k32, full_matrices=False)
    else:
        u, s, vt = _randomized_svd(k32, r, niter, key)
    root = jnp.sqrt(s[:r] / scale)
    a = u[:, :r] * root[None, :]
    b = root[:, None] * vt[:r]
    return a, b, k32 - scale * (a @ b)


def _init_stacked(kernel, r, scale, niter, key):
    n_stack = kernel.ndim - 2
    fn = lambda k_, key_: principal_init(k_, r, scale, niter, key_)  # noqa: E731
    keys = key
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    if n_stack:
        keys = jax.random.split(key, math.prod(kernel.shape[:n_stack])).reshape(*kernel.shape[:n_stack])
    return fn(kernel, keys)


def init(params, config: PiSSAConfig, rng, *, layout=None):
    """``(residual params, adapters)``: the targeted kernels become ``K_res`` (in their own dtype) and
    each gets a :class:`PiSSAAdapter` holding ``A₀``, ``B₀`` (float32)."""
    flat = flatten(params)
    out_params, out = dict(flat), {}
    scale = lora_scale(config.r, config.alpha, config.rslora)
    for i, path in enumerate(_select(flat, config.targets, "targets")):
        stored = flat[path]  # a quantized kernel: its residual is quantized again (docs/quantization.md)
        kernel = as_float(stored)
        stack, k, d = _split_shape(path, kernel.shape, layout)
        if config.r > min(k, d):
            raise ValueError(f"PiSSA rank r={config.r} exceeds the rank of {'/'.join(path)} ({k}x{d}); use r <= {min(k, d)}")
        a, b, residual = _init_stacked(kernel.reshape(*stack, k, d), config.r, scale, config.niter,
                                       jax.random.fold_in(rng, i))
        out_params[path] = store_like(stored, residual.reshape(kernel.shape))
        out[path] = PiSSAAdapter(a=a, b=b, in_features=k, out_features=d, alpha=float(config.alpha),
                                 rslora=bool(config.rslora), dropout=config.dropout, niter=config.niter)
    return unflatten(out_params), unflatten(out)


def restart(adapter: PiSSAAdapter, merged_kernel, key):
    """After a ReLoRA-style merge: the SVD runs again on the merged kernel. Returns
    ``(new residual kernel, new adapter)``; the model is unchanged."""
    stack = adapter.a.shape[:-2]
    kernel = as_float(merged_kernel).reshape(*stack, adapter.in_features, adapter.out_features)
    a, b, residual = _init_stacked(kernel, adapter.r, adapter.scale, adapter.niter, key)
    return store_like(merged_kernel, residual.reshape(merged_kernel.shape)), adapter.replace(a=a, b=b)


def to_lora(adapters, initial_adapters, config: PiSSAConfig):
    """``(LoRAConfig, adapters)``: the trained PiSSA adapters as a plain rank-``2r`` LoRA on the
    original (pre-PiSSA) base, ``[A | A₀]``, ``[B ; −B₀]``, ``α`` doubled (rsLoRA ``×√2``) to keep
    the scale. ``initial_adapters`` are the ones :func:`init` returned."""
    flat, flat0 = flatten(adapters), flatten(initial_adapters)
    if set(flat) != set(flat0):
        raise ValueError("initial_adapters do not cover the same kernels as adapters; pass the adapters pissa.init returned")
    alpha = config.alpha * (math.sqrt(2.0) if config.rslora else 2.0)
    out = {}
    for path, node in flat.items():
        node0 = flat0[path]
        out[path] = LoRAAdapter(a=jnp.concatenate([node.a, node0.a], axis=-1),
                                b=jnp.concatenate([node.b, -node0.b], axis=-2), in_features=node.in_features,
                                out_features=node.out_features, alpha=alpha, rslora=node.rslora, dropout=node.dropout)
    lora = LoRAConfig(r=2 * config.r, alpha=alpha, rslora=config.rslora, targets=config.targets,
                      dropout=config.dropout, unfreeze=config.unfreeze)
    return lora, unflatten(out)


__all__ = ["PiSSAAdapter", "init", "principal_init", "restart", "to_lora"]

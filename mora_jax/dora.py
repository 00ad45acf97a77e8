"""DoRA (weight-decomposed low-rank adaptation, arXiv 2402.09353) on one kernel.

Kernel layout ``K (k, d)``, ``y = x·K``. DoRA keeps LoRA's ``s·A·B`` (``A (k, r)``, ``B (r, d)``,
``s = α/r`` or ``α/√r``) and adds a trainable magnitude ``mag (d,)`` per output feature:

    K' = (mag / ‖K + s·A·B‖_c) ⊙ (K + s·A·B)          (column-wise, ‖·‖_c the L2 norm of a column)

The column norm ``n`` is treated as a constant in the backward pass (the paper's section 4.3, as
Hugging Face PEFT does). The layer's output, written as the base output plus a correction, is

    y = x·K + (mag/n − 1) ⊙ (x·K) + (mag/n) ⊙ s·(x·A)·B

so the base matmul is shared with the frozen model and only ``x·A·B`` is new per token. The norm
is computed once per step without a ``(k, d)`` temporary:

    n² = ‖K‖²_c + 2s·Σ_i (Aᵀ·K)_{i,·} ⊙ B_{i,·} + s²·Σ_i B_{i,·} ⊙ ((AᵀA)·B)_{i,·}

(``2·k·d·r`` FLOPs for ``Aᵀ·K``, the same as PEFT's ``B·A``). Merging is exact; unmerging needs the
norm ``n`` at merge time (``K`` cannot be recovered from ``K'`` and the adapter alone), so
:func:`merge_with_norms` returns it and :func:`unmerge_with_norms` takes it, as PEFT caches it.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mora_jax import ops


def column_norms(kernel_KxD):
    """``‖K‖_c`` (float32, ``(..., d)``): the magnitude a fresh DoRA adapter starts from."""
    k32 = kernel_KxD.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(k32 * k32, axis=-2))


def weight_norm(kernel_KxD, a_KxR, b_RxD, scale: float):
    """``‖K + s·A·B‖_c`` (float32, ``(d,)``), by the expansion in the module docstring, without
    gradient (DoRA detaches it)."""
    k32, a, b = (t.astype(jnp.float32) for t in (kernel_KxD, a_KxR, b_RxD))
    at_k_RxD = a.T @ k32
    gram_RxR = a.T @ a
    sq = (jnp.sum(k32 * k32, axis=0) + 2.0 * scale * jnp.sum(at_k_RxD * b, axis=0)
          + scale * scale * jnp.sum(b * (gram_RxR @ b), axis=0))
    return jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(sq, 0.0)))


def rescaled_output(x_BxK, kernel_KxD, *, norm_D, magnitude_D, delta_fn, base_fn, bias_D, dropout_fn, dtype,
                    precision=None):
    """``y = x·K + (mag/n − 1) ⊙ (x·K) + (mag/n) ⊙ Δy`` for a weight-decomposed adapter (DoRA, MoRA with
    ``magnitude``): ``norm_D`` the detached ``n``, ``delta_fn(x)`` the adapter's ``Δy``, ``base_fn()`` the
    frozen layer's output (bias included). With dropout the base term is recomputed on the dropped input,
    as PEFT does in training."""
    y = base_fn()
    if dropout_fn is not None:
        x_BxK = dropout_fn(x_BxK)
        base = jnp.matmul(x_BxK.astype(dtype), kernel_KxD.astype(dtype), precision=precision)
    else:
        base = y if bias_D is None else y - bias_D.astype(y.dtype)
    ratio_D = (magnitude_D.astype(jnp.float32) / norm_D).astype(dtype)
    delta = delta_fn(x_BxK.astype(dtype))
    return y + ((ratio_D - 1) * base + ratio_D * delta).astype(y.dtype)


def _stacked(fn, n_stack: int):
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    return fn


@flax.struct.dataclass
class DoRAAdapter:
    """DoRA on one kernel: ``a (*stack, k, r)``, ``b (*stack, r, d)``, ``magnitude (*stack, d)``, float32."""

    a: jax.Array
    b: jax.Array
    magnitude: jax.Array
    in_features: int = flax.struct.field(pytree_node=False)
    out_features: int = flax.struct.field(pytree_node=False)
    alpha: float = flax.struct.field(pytree_node=False)
    rslora: bool = flax.struct.field(pytree_node=False, default=False)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    # The interceptor gives this adapter the layer's kernel and output (``dense_output``).
    uses_kernel = True
    # Undoing a merge needs the column norm at merge time (``adapters.merge_with_norms``).
    merge_needs_norms = True

    @property
    def r(self) -> int:
        return int(self.a.shape[-1])

    @property
    def scale(self) -> float:
        return ops.lora_scale(self.r, self.alpha, self.rslora)

    def dense_output(self, x_BxK, kernel_KxD, *, base_fn, bias_D, dropout_fn, dtype, precision=None):
        """The adapted layer's output ``(..., d)`` (single layer): ``base_fn()`` is the frozen layer's
        output (bias included); with adapter dropout the base term is recomputed on the dropped
        input, as PEFT does in training."""
        return rescaled_output(
            x_BxK, kernel_KxD, norm_D=self.weight_norm(kernel_KxD), magnitude_D=self.magnitude, delta_fn=self.delta,
            base_fn=base_fn, bias_D=bias_D, dropout_fn=dropout_fn, dtype=dtype, precision=precision)

    def weight_norm(self, kernel_KxD):
        """``‖K + s·A·B‖_c`` (float32, ``(d,)``, single layer), detached: :func:`weight_norm`."""
        return weight_norm(kernel_KxD, self.a, self.b, self.scale)

    def delta(self, x_BxK):
        """``Δy = s·(x·A)·B`` for inputs ``(..., in_features)`` (single layer)."""
        return ops.apply_lora(x_BxK, self.a, self.b, scale=self.scale)

    def merged_kernel(self, kernel_KxD):
        """``(mag/n)·(K + s·A·B)`` and ``n`` (float32), for kernels ``(*stack, k, d)``."""
        def one(k, a, b, mag):
            n = weight_norm(k, a, b, self.scale)
            w = k.astype(jnp.float32) + self.scale * (a @ b)
            return w * (mag / n)[None, :], n

        return _stacked(one, self.a.ndim - 2)(kernel_KxD, self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                                              self.magnitude.astype(jnp.float32))

    def add_to(self, kernel, sign: float = 1.0):
        """The merged kernel (``sign=+1``). Unmerging is refused: it needs the norm at merge time."""
        if sign != 1.0:
            raise ValueError("a DoRA merge cannot be undone from the merged kernel and the adapter alone (the column "
                             "norm at merge time is lost): use mora_jax.adapters.merge_with_norms and unmerge_with_norms")
        return self.merged_kernel(kernel)[0].astype(kernel.dtype)

    def unmerge_kernel(self, merged_KxD, norms):
        """``K = K'·(n/mag) − s·A·B`` for the norms ``n`` that :meth:`merged_kernel` returned."""
        def one(k, a, b, mag, n):
            return k.astype(jnp.float32) * (n / mag)[None, :] - self.scale * (a @ b)

        out = _stacked(one, self.a.ndim - 2)(merged_KxD, self.a.astype(jnp.float32), self.b.astype(jnp.float32),
                                             self.magnitude.astype(jnp.float32), norms)
        return out.astype(merged_KxD.dtype)

    def delta_weight(self):
        """LoRA's direction update ``s·A·B`` (float32); the merged kernel also rescales columns."""
        return self.scale * jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32))


def init_adapter(kernel, stack: tuple, k: int, d: int, config, key) -> DoRAAdapter:
    """A fresh DoRA adapter for ``kernel`` (``(*stack, ...)`` with ``k·d`` trailing entries): LoRA's
    init (``A`` kaiming-uniform, ``B = 0``) and ``mag = ‖K‖_c``, so the adapted layer starts equal
    to the frozen one."""
    bound = 1.0 / (k ** 0.5)
    a = jax.random.uniform(key, (*stack, k, config.r), jnp.float32, -bound, bound)
    return DoRAAdapter(a=a, b=jnp.zeros((*stack, config.r, d), jnp.float32),
                       magnitude=column_norms(kernel.reshape(*stack, k, d)), in_features=k, out_features=d,
                       alpha=float(config.alpha), rslora=bool(config.rslora), dropout=config.dropout)


def fresh(adapter: DoRAAdapter, merged_kernel, key) -> DoRAAdapter:
    """A restart after a ReLoRA-style merge: new ``A``, ``B = 0``, ``mag = ‖K'‖_c`` of the merged kernel."""
    bound = 1.0 / (adapter.in_features ** 0.5)
    a = jax.random.uniform(key, adapter.a.shape, adapter.a.dtype, -bound, bound)
    stack = adapter.a.shape[:-2]
    magnitude = column_norms(merged_kernel.reshape(*stack, adapter.in_features, adapter.out_features))
    return adapter.replace(a=a, b=jnp.zeros_like(adapter.b), magnitude=magnitude.astype(adapter.magnitude.dtype))


__all__ = ["DoRAAdapter", "column_norms", "fresh", "init_adapter", "rescaled_output", "weight_norm"]

"""HiRA (Hadamard high-rank adaptation, Huang et al., ICLR 2025) on one kernel.

Kernel layout ``K (k, d)``, ``y = x·K``. HiRA trains ``A (k, r)``, ``B (r, d)`` like LoRA but applies
them as a Hadamard (elementwise) product with the frozen kernel:

    ΔK = K ⊙ (A·B),        K' = K + ΔK = K ⊙ (1 + A·B)

``rank(K ⊙ A·B) ≤ rank(K)·r``, so the update is high-rank with LoRA's parameter count. There is no
``α/r`` scale (Hugging Face PEFT's ``HiraConfig`` has none). ``A`` starts kaiming-uniform
(``U(-1/√k, 1/√k)``, PEFT's ``kaiming_uniform_(a=√5)`` on its ``(r, k)`` matrix) and ``B`` at zero, so
the adapted layer starts equal to the frozen one.

**Forward.** ``x·ΔK`` has no low-rank form cheaper than the dense product: ``x·(K ⊙ A·B) = Σ_i
B_{i,·} ⊙ ((x ⊙ A_{·,i})·K)`` costs ``r`` matmuls with ``K`` per token. So the layer runs ONE matmul
with the effective kernel ``K' = K ⊙ (1 + A·B)`` (built once per step, ``2·k·r·d`` FLOPs, in the
compute dtype), instead of the frozen layer's ``x·K`` plus a second ``x·ΔK``: the forward and the
input gradient cost what the frozen layer's do. The gradients of ``A`` and ``B`` need
``∂L/∂K' = xᵀ·dy`` (``2·k·d`` FLOPs per token, the weight gradient of full fine-tuning), then
``G = ∂L/∂K' ⊙ K``, ``∇A = G·Bᵀ`` and ``∇B = Aᵀ·G`` (``2·k·r·d`` each, per step). That is HiRA's FLOP
floor (:mod:`mora_jax.flops`). With adapter dropout active the update sees the dropped input, as in
PEFT: ``y = x·K + drop(x)·ΔK`` (two matmuls).

**Merge** writes ``K ⊙ (1 + A·B)`` (float32, cast back); **unmerge** divides by ``1 + A·B``, exact
up to rounding wherever ``1 + A·B ≠ 0`` (where it is zero the merged kernel lost ``K``; PEFT keeps a
copy of the base weight for that reason).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


def _stacked(fn, n_stack: int):
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    return fn


def _factor(a, b):
    """``A·B`` in float32 (the Hadamard factor, PEFT's ``get_delta_weight`` transposed)."""
    return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


@flax.struct.dataclass
class HiRAAdapter:
    """HiRA on one kernel: ``a (*stack, k, r)``, ``b (*stack, r, d)``, float32; ``ΔK = K ⊙ (a·b)``."""

    a: jax.Array
    b: jax.Array
    in_features: int = flax.struct.field(pytree_node=False)
    out_features: int = flax.struct.field(pytree_node=False)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    # The interceptor gives this adapter the layer's kernel and output (``dense_output``).
    uses_kernel = True

    @property
    def r(self) -> int:
        return int(self.a.shape[-1])

    def dense_output(self, x_BxK, kernel_KxD, *, base_fn, bias_D, dropout_fn, dtype, precision=None):
        """The adapted layer's output ``(..., d)`` (single layer). Without dropout one matmul with the
        effective kernel ``K ⊙ (1 + A·B)`` (``base_fn`` is not called); with dropout the frozen
        output plus ``drop(x)·(K ⊙ A·B)``."""
        k32 = kernel_KxD.astype(jnp.float32)
        factor_KxD = _factor(self.a, self.b)
        if dropout_fn is None:
            effective_KxD = (k32 + k32 * factor_KxD).astype(dtype)
            y = jnp.matmul(x_BxK.astype(dtype), effective_KxD, precision=precision)
            return y if bias_D is None else y + bias_D.astype(y.dtype)
        y = base_fn()
        delta = jnp.matmul(dropout_fn(x_BxK).astype(dtype), (k32 * factor_KxD).astype(dtype), precision=precision)
        return y + delta.astype(y.dtype)

    def delta_weight(self):
        """The Hadamard factor ``A·B`` (float32, ``(*stack, k, d)``; PEFT's ``get_delta_weight``): the
        kernel's update is ``K ⊙ A·B``, which :meth:`add_to` applies."""
        return _factor(self.a, self.b)

    def add_to(self, kernel, sign: float = 1.0):
        """``K ⊙ (1 + A·B)`` (``sign=+1``, merge) or ``K / (1 + A·B)`` (``sign=-1``, unmerge), float32
        arithmetic, ``kernel``'s dtype out; ``kernel`` is ``(*stack, k, d)``."""
        factor = 1.0 + _factor(self.a, self.b)
        k32 = kernel.astype(jnp.float32)
        out = k32 * factor if sign == 1.0 else k32 / factor
        return out.astype(kernel.dtype)


def init_adapter(stack: tuple, k: int, d: int, config, key) -> HiRAAdapter:
    """A fresh HiRA adapter: ``A`` kaiming-uniform, ``B = 0`` (the adapted layer equals the frozen one)."""
    bound = 1.0 / (k ** 0.5)
    a = jax.random.uniform(key, (*stack, k, config.r), jnp.float32, -bound, bound)
    return HiRAAdapter(a=a, b=jnp.zeros((*stack, config.r, d), jnp.float32), in_features=k, out_features=d,
                       dropout=config.dropout)


def fresh(adapter: HiRAAdapter, key) -> HiRAAdapter:
    """A restart after a ReLoRA-style merge: new ``A``, ``B = 0``; the next update multiplies the merged kernel."""
    bound = 1.0 / (adapter.in_features ** 0.5)
    a = jax.random.uniform(key, adapter.a.shape, adapter.a.dtype, -bound, bound)
    return adapter.replace(a=a, b=jnp.zeros_like(adapter.b))


__all__ = ["HiRAAdapter", "fresh", "init_adapter"]

"""Next-token cross-entropy without the full float32 ``(B, T, V)`` logits (``train.loss_chunk``).

The plain loss (:func:`mora_jax.training.next_token_loss`) takes the LM head's logits for the whole
batch: ``B·T·V`` float32 values, and as many again for their gradient. At a 128k vocabulary that is
2 GiB per 4,096-token sequence, the largest single buffer of a fine-tuning step on a quantized 70B
base. :func:`chunked_cross_entropy` runs the head on ``chunk`` positions at a time inside a
``lax.scan``: each chunk's logits give its log-partition and target logit and are dropped. The
chunk body is rematerialised (``jax.checkpoint`` saving nothing), so the backward pass recomputes a
chunk's logits from its hidden states instead of keeping all of them: the largest logits buffer is
``B·chunk·V``. Same sum as the plain loss (float rounding aside), same gradients.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def chunked_cross_entropy(head: Callable, h_BxTxD: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array,
                          chunk: int, z_loss: float = 0.0) -> jax.Array:
    """``Σ weights · (logsumexp(logits) - logits[target] [+ z_loss·logsumexp²])`` over all positions,
    where ``logits = head(h_chunk, i)`` (float32 ``(B, chunk, V)``) is computed for chunk ``i`` of
    ``chunk`` positions at a time and never kept. Positions of weight 0 contribute 0 even where
    their logits are not finite (as in the plain loss)."""
    B, T = targets_BxT.shape
    if chunk <= 0 or T % chunk:
        raise ValueError(f"train.loss_chunk={chunk} must divide the sequence length {T}: use a divisor of it "
                         f"(e.g. {_divisor_near(T, chunk)}), or 0 for the plain loss")
    n = T // chunk

    def chunks(x):  # (B, T, ...) -> (n, B, chunk, ...)
        return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint  # saves nothing: the backward pass recomputes this chunk's logits
    def chunk_loss(h_BxCxD, t_BxC, w_BxC, i):
        logits_BxCxV = head(h_BxCxD, i).astype(jnp.float32)
        lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        ce_BxC = lse_BxC - jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
        if z_loss:
            ce_BxC = ce_BxC + z_loss * lse_BxC ** 2
        ce_BxC = jnp.where(w_BxC > 0, ce_BxC, 0.0)
        return jnp.sum(ce_BxC * w_BxC)

    def body(total, xs):
        return total + chunk_loss(*xs), None

    xs = (chunks(h_BxTxD), chunks(targets_BxT), chunks(weights_BxT), jnp.arange(n))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def _divisor_near(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - max(target, 1)), d))


__all__ = ["chunked_cross_entropy"]

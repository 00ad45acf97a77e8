"""Rotary position embeddings (RoPE) as Hugging Face computes them, with the ``rope_scaling`` kinds of
today's LLaMA-family checkpoints.

* ``default``: ``inv_freq[i] = theta ** (-2i / H)``;
* ``linear`` (position interpolation): every frequency divided by ``factor``;
* ``dynamic`` (dynamic NTK): past ``max_position_embeddings`` the base grows with the sequence,
  ``theta · (factor·L/max_pos − (factor − 1)) ** (H / (H − 2))`` where ``L`` is one more than the
  largest position in the call (HF's rule, so a KV-cache step uses the length reached so far);
* ``llama3`` (Llama 3.1 / 3.2): wavelengths longer than ``original_max_position_embeddings /
  low_freq_factor`` are divided by ``factor``, shorter than ``… / high_freq_factor`` kept, and those
  in between interpolated smoothly.

``rope_cos_sin`` returns the ``(cos, sin)`` tables (frequencies repeated twice, rotate-half layout)
and ``apply_rope`` rotates queries or keys with them. All tables are float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_LLAMA3_KEYS = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """A ``rope_scaling`` of kind ``linear``, ``dynamic`` or ``llama3`` (HF field names; hashable).

    ``original_max_position_embeddings`` is the pretraining context (Llama 3: 8192); it is needed by
    ``llama3`` only.
    """

    rope_type: str
    factor: float
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self):
        supported = ROPE_TYPES[1:]
        if self.rope_type not in supported:
            raise ValueError(
                f"rope_scaling rope_type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)} "
                "(default = no scaling)"
            )
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not self.factor >= 1.0:
            raise ValueError(f"rope_scaling factor must be a number >= 1, got {self.factor!r}")
        object.__setattr__(self, "factor", float(self.factor))
        if self.rope_type == "llama3":
            missing = [k for k in _LLAMA3_KEYS if getattr(self, k) is None]
            if missing:
                raise ValueError(f"rope_scaling of rope_type 'llama3' needs {missing} (see the model's config.json)")
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ValueError(
                    f"rope_scaling llama3 needs 0 < low_freq_factor < high_freq_factor, got "
                    f"{self.low_freq_factor} and {self.high_freq_factor}"
                )
            object.__setattr__(self, "low_freq_factor", float(self.low_freq_factor))
            object.__setattr__(self, "high_freq_factor", float(self.high_freq_factor))
            object.__setattr__(self, "original_max_position_embeddings", int(self.original_max_position_embeddings))

    @classmethod
    def from_hf(cls, rope: Mapping[str, Any] | None, *, max_position_embeddings: int | None = None,
                where: str = "rope_scaling") -> "RopeScaling | None":
        """From a HF ``rope_scaling`` / ``rope_parameters`` dict; ``None`` for no scaling (``default``).

        Anything that would change the rotation in a way not implemented here (``yarn``, ``longrope``,
        a partial rotary factor, per-layer-type parameters) is a ``ValueError`` naming what is supported.
        """
        if rope is None:
            return None
        if not isinstance(rope, Mapping):
            raise ValueError(f"{where}={rope!r} is not a dict; expected e.g. {{'rope_type': 'llama3', 'factor': 8.0, ...}}")
        if any(isinstance(v, Mapping) for v in rope.values()):
            raise ValueError(
                f"{where}={dict(rope)!r} has per-layer-type RoPE parameters, which are not supported; supported "
                f"rope types: {', '.join(ROPE_TYPES)}, the same for every layer"
            )
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"{where} rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)} "
                "(Llama 3 / 3.1 / 3.2, linear position interpolation, dynamic NTK, or plain RoPE)"
            )
        partial = rope.get("partial_rotary_factor", 1.0)
        if partial not in (None, 1, 1.0):
            raise ValueError(f"{where} partial_rotary_factor={partial} is not supported (RoPE on the whole head only)")
        if rope_type == "default":
            return None
        if "factor" not in rope:
            raise ValueError(f"{where}={dict(rope)!r} has rope_type {rope_type!r} but no 'factor'")
        kwargs = {k: rope.get(k) for k in _LLAMA3_KEYS}
        if rope_type == "llama3" and kwargs["original_max_position_embeddings"] is None:
            kwargs["original_max_position_embeddings"] = max_position_embeddings  # as transformers does
        if rope_type != "llama3":
            kwargs = {}
        return cls(rope_type=rope_type, factor=rope["factor"], **kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The ``rope_scaling`` dict of a HF ``config.json`` (``rope_type`` and ``type`` both given,
        so that old and new ``transformers`` read it)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update({k: getattr(self, k) for k in _LLAMA3_KEYS})
        return out


def _default_inv_freq(head_dim: int, theta) -> np.ndarray:
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (1.0 / (np.float32(theta) ** exponent)).astype(np.float32)


def _llama3_inv_freq(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
    """transformers' ``_compute_llama3_parameters``, in float32."""
    old_context = np.float32(s.original_max_position_embeddings)
    low_freq_wavelen = old_context / np.float32(s.low_freq_factor)
    high_freq_wavelen = old_context / np.float32(s.high_freq_factor)
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq).astype(np.float32)
    smooth = ((old_context / wavelen - np.float32(s.low_freq_factor))
              / np.float32(s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None, *,
                  seq_len=None, max_position_embeddings: int | None = None):
    """Inverse frequencies ``(H/2,)`` float32. ``dynamic`` scaling needs ``seq_len`` (may be traced)
    and ``max_position_embeddings``; the other kinds are constants (NumPy)."""
    if scaling is None:
        return _default_inv_freq(head_dim, theta)
    if scaling.rope_type == "linear":
        return (_default_inv_freq(head_dim, theta) / np.float32(scaling.factor)).astype(np.float32)
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(_default_inv_freq(head_dim, theta), scaling)
    # dynamic NTK: the base depends on the length reached, max(seq_len, max_position_embeddings)
    if seq_len is None or max_position_embeddings is None:
        raise ValueError("dynamic rope scaling needs seq_len and max_position_embeddings")
    length = jnp.maximum(jnp.asarray(seq_len, jnp.float32), jnp.float32(max_position_embeddings))
    factor = jnp.float32(scaling.factor)
    base = jnp.float32(theta) * (factor * length / max_position_embeddings - (factor - 1)) ** (
        head_dim / (head_dim - 2)
    )
    exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (base**exponent)


def rope_cos_sin(positions_BxT: jax.Array, head_dim: int, theta: float, scaling: RopeScaling | None = None,
                 max_position_embeddings: int | None = None) -> tuple[jax.Array, jax.Array]:
    """HF rotary tables ``(cos, sin)``, each ``(B, T, H)`` float32 (frequencies repeated twice).

    For ``dynamic`` scaling the sequence length is one more than the largest position given (HF's
    rule); pass ``max_position_embeddings`` then.
    """
    seq_len = None
    if scaling is not None and scaling.rope_type == "dynamic":
        seq_len = jnp.max(positions_BxT) + 1
    inv_freq_h = jnp.asarray(
        rope_inv_freq(head_dim, theta, scaling, seq_len=seq_len, max_position_embeddings=max_position_embeddings),
        jnp.float32,
    )
    freqs_BxTxh = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_h
    emb_BxTxH = jnp.concatenate([freqs_BxTxh, freqs_BxTxh], axis=-1)
    return jnp.cos(emb_BxTxH), jnp.sin(emb_BxTxH)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """HF ``apply_rotary_pos_emb`` (rotate-half convention), in ``x``'s dtype."""
    cos = cos_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
    sin = sin_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
    return x_BxTxNxH * cos + _rotate_half(x_BxTxNxH) * sin


__all__ = ["ROPE_TYPES", "RopeScaling", "apply_rope", "rope_cos_sin", "rope_inv_freq"]

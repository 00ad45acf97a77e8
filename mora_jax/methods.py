"""Adapter method configurations: frozen dataclasses, hashable, safe to close over in ``jax.jit``.

All three methods select kernels the same way, by regular expression over ``/``-joined parameter
paths (``re.fullmatch``), so experiments compare MoRA, LoRA and full fine-tuning with one code path.
``unfreeze`` names base parameters trained in full alongside the adapters (e.g. embeddings, LM head
and norms in the reference's pretraining recipe).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Union

from mora_jax.errors import ConfigError
from mora_jax.ops import _check_type

# The seven projections of a LLaMA block, as named by Hugging Face and by mora_jax.models.llama.
LLAMA_TARGETS = r".*/(q|k|v|o|gate|up|down)_proj/kernel"
# Embeddings, LM head and every norm: what the reference's pretraining recipe trains in full.
LLAMA_FULLY_TRAINED = (r".*embed_tokens/.*", r"lm_head/.*", r".*norm/.*")


def _as_patterns(value, field: str) -> tuple[str, ...]:
    patterns = (value,) if isinstance(value, str) else tuple(value)
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{field} must be regular expressions (str), got {p!r}")
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{field}: invalid regular expression {p!r}: {e}") from None
    return patterns


def _check_selection(config) -> None:
    object.__setattr__(config, "targets", _as_patterns(config.targets, "targets"))
    object.__setattr__(config, "unfreeze", _as_patterns(config.unfreeze, "unfreeze"))
    if not config.targets:
        raise ValueError("targets is empty: give at least one pattern, e.g. mora_jax.LLAMA_TARGETS")


def _check_rank(name: str, r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{name}.r must be a positive int (the LoRA rank), got {r!r}")


@dataclasses.dataclass(frozen=True)
class MoRAConfig:
    """MoRA: one trainable square matrix ``m`` (``r̂ × r̂``, ``r̂ ≈ sqrt((k+d)·r)``) per targeted kernel.

    Attributes:
      r: the LoRA rank whose parameter count MoRA matches (the reference's ``r``).
      mora_type: operator pair, one of 1, 2, 3, 4, 6 (1 for large r, 6 for small r).
      targets: regexes over ``/``-joined parameter paths selecting the kernels to adapt.
      dropout: dropout rate on the adapter input (active only when a ``'dropout'`` rng is passed).
      unfreeze: regexes of base parameters trained in full alongside the adapters.
      magnitude: a DoRA-style trainable magnitude per output feature on top of MoRA: the adapted
        kernel is ``(mag/‖K + ΔK‖_c)·(K + ΔK)`` column-wise, the norm detached in the backward pass.
    """

    r: int = 8
    mora_type: int = 6
    targets: tuple[str, ...] = (LLAMA_TARGETS,)
    dropout: float = 0.0
    unfreeze: tuple[str, ...] = ()
    magnitude: bool = False
    method = "mora"

    def __post_init__(self):
        _check_rank("MoRAConfig", self.r)
        if not isinstance(self.magnitude, bool):
            raise ValueError(f"MoRAConfig.magnitude must be True or False, got {self.magnitude!r}")
        _check_type(self.mora_type)
        _check_dropout(self.dropout)
        _check_selection(self)


def _check_lora_like(name: str, config) -> None:
    _check_rank(name, config.r)
    if not config.alpha > 0:
        raise ValueError(f"{name}.alpha must be positive, got {config.alpha!r}")
    _check_dropout(config.dropout)
    _check_selection(config)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA: ``Δy = (α/r)·(x·A)·B`` (rsLoRA: ``α/√r``), ``A`` kaiming-uniform, ``B`` zero."""

    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = (LLAMA_TARGETS,)
    dropout: float = 0.0
    unfreeze: tuple[str, ...] = ()
    method = "lora"

    def __post_init__(self):
        _check_lora_like("LoRAConfig", self)


@dataclasses.dataclass(frozen=True)
class FullConfig:
    """Full fine-tuning of the targeted kernels (no adapters): the baseline in the same code path."""

    targets: tuple[str, ...] = (LLAMA_TARGETS,)
    unfreeze: tuple[str, ...] = ()
    method = "full"

    def __post_init__(self):
        _check_selection(self)


@dataclasses.dataclass(frozen=True)
class DoRAConfig:
    """DoRA (weight-decomposed LoRA): ``K' = (mag/‖K + s·A·B‖_c)·(K + s·A·B)`` per output column,
    ``mag`` trainable (initialised to ``‖K‖_c``), the column norm detached in the backward pass as in
    the DoRA paper and Hugging Face PEFT. ``s`` is LoRA's scale (``α/r``, rsLoRA ``α/√r``)."""

    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = (LLAMA_TARGETS,)
    dropout: float = 0.0
    unfreeze: tuple[str, ...] = ()
    method = "dora"

    def __post_init__(self):
        _check_lora_like("DoRAConfig", self)


@dataclasses.dataclass(frozen=True)
class PiSSAConfig:
    """PiSSA: LoRA whose ``A``, ``B`` start from the ``r`` principal singular triplets of the frozen
    kernel (``s·A·B = U_r·S_r·V_rᵀ``) and whose base becomes the residual ``K − s·A₀·B₀``.

    ``niter``: None for the exact SVD; an int for the randomized SVD with that many subspace
    iterations (PEFT's ``init_lora_weights="pissa_niter_<n>"``)."""

    r: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = (LLAMA_TARGETS,)
    dropout: float = 0.0
    unfreeze: tuple[str, ...] = ()
    niter: int | None = None
    method = "pissa"

    def __post_init__(self):
        _check_lora_like("PiSSAConfig", self)
        if self.niter is not None and (isinstance(self.niter, bool) or not isinstance(self.niter, int)
                                       or self.niter < 0):
            raise ValueError(f"PiSSAConfig.niter must be None (exact SVD) or an int >= 0, got {self.niter!r}")


@dataclasses.dataclass(frozen=True)
class HiRAConfig:
    """HiRA (Hadamard high-rank adaptation): ``K' = K ⊙ (1 + A·B)``, ``A (k, r)``, ``B (r, d)`` trained,
    no scale (as Hugging Face PEFT's ``HiraConfig``); the update ``K ⊙ A·B`` has rank up to ``r·rank(K)``
    with LoRA's parameter count (:mod:`mora_jax.hira`)."""

    r: int = 8
    targets: tuple[str, ...] = (LLAMA_TARGETS,)
    dropout: float = 0.0
    unfreeze: tuple[str, ...] = ()
    method = "hira"

    def __post_init__(self):
        _check_rank("HiRAConfig", self.r)
        _check_dropout(self.dropout)
        _check_selection(self)


AdapterConfig = Union[MoRAConfig, LoRAConfig, DoRAConfig, PiSSAConfig, HiRAConfig, FullConfig]


def _check_dropout(rate) -> None:
    if not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {rate!r}")


# The one registry of methods: name -> config class (each class's ``method`` is its name).
METHODS: dict[str, type] = {c.method: c for c in (MoRAConfig, LoRAConfig, DoRAConfig, PiSSAConfig, HiRAConfig,
                                                    FullConfig)}


def config_class(method: str) -> type:
    """The config class of ``method``; an unknown name is an error listing the known ones."""
    if method not in METHODS:
        raise ConfigError(f"unknown method: method={method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method]


def make_config(method: str, **kwargs) -> AdapterConfig:
    """Build a config by method name (``"mora"``, ``"lora"`` or ``"full"``), e.g. from a CLI flag."""
    cls = config_class(method)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kwargs) - fields
    if unknown:
        raise ValueError(f"{method} config has no field(s) {sorted(unknown)}; valid: {sorted(fields)}")
    return cls(**kwargs)


__all__ = ["METHODS", "AdapterConfig", "DoRAConfig", "FullConfig", "HiRAConfig", "PiSSAConfig", "LLAMA_FULLY_TRAINED", "LLAMA_TARGETS", "LoRAConfig", "MoRAConfig",
           "config_class", "make_config"]

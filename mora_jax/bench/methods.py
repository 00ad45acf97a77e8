"""What the benchmark compares: the methods, the model built from a benchmark config, the batch.

A :class:`MethodSpec` names one method (full fine-tuning of the seven projections of every block,
LoRA at a rank, MoRA of a type at a rank) and gives its adapter config; :func:`method_specs` lists
the methods of a run in the order of its results table. :func:`llama_config_from` reads the model
part of a ``configs/bench_*.py`` config, :func:`make_batch` makes the random token batch every
method is timed on.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mora_jax.methods import LLAMA_TARGETS, FullConfig, LoRAConfig, MoRAConfig
from mora_jax.models.config import LLAMA_CONFIGS, LlamaConfig

LORA_ALPHA = 16.0  # LoRA's alpha in every benchmark (mora-jax and the PyTorch peer): scale alpha / r


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    method: str  # "full", "lora" or "mora"
    r: int | None = None
    mora_type: int | None = None

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        if self.method == "lora":
            return f"lora r={self.r}"
        return f"mora{self.mora_type} r={self.r}"

    def adapter_config(self, alpha: float = LORA_ALPHA):
        if self.method == "full":
            return FullConfig(targets=(LLAMA_TARGETS,))
        if self.method == "lora":
            return LoRAConfig(r=self.r, alpha=alpha, targets=(LLAMA_TARGETS,))
        return MoRAConfig(r=self.r, mora_type=self.mora_type, targets=(LLAMA_TARGETS,))


def method_specs(r_values: Sequence[int], mora_types: Sequence[int], include_full: bool = True) -> list[MethodSpec]:
    """Full fine-tuning first, then for each rank LoRA and MoRA of each type."""
    specs = [MethodSpec("full")] if include_full else []
    for r in r_values:
        specs.append(MethodSpec("lora", r))
        specs += [MethodSpec("mora", r, t) for t in mora_types]
    return specs


def llama_config_from(config) -> tuple[str, LlamaConfig]:
    """``(name, LlamaConfig)`` from a benchmark config: the preset with dtype and overrides applied."""
    name = config.model
    if name not in LLAMA_CONFIGS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(LLAMA_CONFIGS)}")
    overrides = config.get("model_overrides", None) or {}
    overrides = dict(overrides.to_dict() if hasattr(overrides, "to_dict") else overrides)
    if int(config.get("num_layers", 0) or 0):
        overrides["num_hidden_layers"] = int(config.num_layers)
    param_dtype = config.get("param_dtype", "") or config.dtype
    cfg = LLAMA_CONFIGS[name].replace(dtype=config.dtype, param_dtype=param_dtype,
                                      scan_layers=bool(config.get("scan_layers", False)),
                                      remat_policy=config.get("remat_policy", "none"), **overrides)
    if overrides:
        name += "(" + ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) + ")"
    return name, cfg


def make_batch(llama_config: LlamaConfig, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of random tokens, every position in the loss (as the data pipeline yields one)."""
    ids = np.random.default_rng(seed).integers(0, llama_config.vocab_size, (batch, seq_len)).astype(np.int32)
    return {"input_ids": ids, "loss_mask": np.ones_like(ids)}


__all__ = ["LORA_ALPHA", "MethodSpec", "llama_config_from", "make_batch", "method_specs"]

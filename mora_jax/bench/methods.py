"""What the benchmark compares: the methods, the model's name, the batch.

A :class:`MethodSpec` names one method (full fine-tuning of the seven projections of every block,
LoRA at a rank, MoRA of a type at a rank) and gives its adapter config and the run config of that
method on the benchmark's run (:meth:`MethodSpec.run_config`); :func:`method_specs` lists the
methods of a run in the order of its results table. :func:`model_name` names the run's model,
:func:`make_batch` makes the random token batch every method is timed on.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

import numpy as np

from mora_jax.methods import LLAMA_TARGETS, FullConfig, LoRAConfig, MoRAConfig
from mora_jax.models.config import LlamaConfig
from mora_jax.remora import RemoraConfig
from mora_jax.run_config import RunConfig

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

    @classmethod
    def from_label(cls, label: str) -> "MethodSpec":
        """The inverse of :attr:`label`: "full", "lora r=<r>" or "mora<type> r=<r>"."""
        m = re.fullmatch(r"\s*(full|lora r=(\d+)|mora([12346]) r=(\d+))\s*", label)
        if not m:
            raise ValueError(f'method {label!r}: use "full", "lora r=<r>" or "mora<type> r=<r>" (e.g. "mora6 r=8")')
        if m.group(1) == "full":
            return cls("full")
        if m.group(2):
            return cls("lora", int(m.group(2)))
        return cls("mora", int(m.group(4)), int(m.group(3)))

    def adapter_config(self, alpha: float = LORA_ALPHA):
        if self.method == "full":
            return FullConfig(targets=(LLAMA_TARGETS,))
        if self.method == "lora":
            return LoRAConfig(r=self.r, alpha=alpha, targets=(LLAMA_TARGETS,))
        return MoRAConfig(r=self.r, mora_type=self.mora_type, targets=(LLAMA_TARGETS,))

    def run_config(self, run: RunConfig) -> RunConfig:
        """``run`` training this method (no ReMoRA merges: every step is a plain train step)."""
        return dataclasses.replace(run, adapter=self.adapter_config(), remora=RemoraConfig(every=0))


def method_specs(r_values: Sequence[int], mora_types: Sequence[int], include_full: bool = True) -> list[MethodSpec]:
    """Full fine-tuning first, then for each rank LoRA and MoRA of each type."""
    specs = [MethodSpec("full")] if include_full else []
    for r in r_values:
        specs.append(MethodSpec("lora", r))
        specs += [MethodSpec("mora", r, t) for t in mora_types]
    return specs


def model_name(run: RunConfig) -> str:
    """The run's model: its preset or checkpoint directory, with the preset's overrides."""
    m = run.model
    name = m.hf_path or m.preset
    if m.overrides:
        name += "(" + ",".join(f"{k}={v}" for k, v in sorted(m.overrides.items())) + ")"
    return name


def make_batch(llama_config: LlamaConfig, batch: int, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of random tokens, every position in the loss (as the data pipeline yields one)."""
    ids = np.random.default_rng(seed).integers(0, llama_config.vocab_size, (batch, seq_len)).astype(np.int32)
    return {"input_ids": ids, "loss_mask": np.ones_like(ids)}


__all__ = ["LORA_ALPHA", "MethodSpec", "make_batch", "method_specs", "model_name"]

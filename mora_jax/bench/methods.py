"""What the benchmark compares: the methods, the model's name, the batch.

A :class:`MethodSpec` names one method (full fine-tuning of the seven projections of every block,
LoRA at a rank, MoRA of a type at a rank, or one of the PEFT family at a rank: DoRA, PiSSA, HiRA) and gives its adapter config and the run config of that
method on the benchmark's run (:meth:`MethodSpec.run_config`); :func:`method_specs` lists the
methods of a run in the order of its results table. :func:`model_name` names the run's model,
:func:`make_batch` makes the random token batch every method is timed on.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Sequence

import numpy as np

from mora_jax.methods import LLAMA_TARGETS, DoRAConfig, FullConfig, HiRAConfig, LoRAConfig, MoRAConfig, PiSSAConfig
from mora_jax.models.config import LlamaConfig
from mora_jax.remora import RemoraConfig
from mora_jax.run_config import RunConfig

LORA_ALPHA = 16.0  # LoRA's alpha in every benchmark (mora-jax and the PyTorch peer): scale alpha / r
# The PEFT family the benchmark can time beside LoRA (``benchmark.peft_methods``), each at a rank;
# "mora_mag" is MoRA type 6 (the paper's small-rank type) with a DoRA-style magnitude (MoRAConfig(magnitude=True)).
PEFT_METHODS = ("dora", "pissa", "hira", "mora_mag")
MAGNITUDE_TYPE = 6  # the MoRA type "mora_mag" times
# PiSSA's randomized SVD iterations in both frameworks (PEFT's init_lora_weights="pissa_niter_4"):
# the initialisation is not timed, the step is LoRA's either way.
PISSA_NITER = 4


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    method: str  # "full", "lora", "mora" or one of PEFT_METHODS ("mora_mag": MoRA of mora_type with a magnitude)
    r: int | None = None
    mora_type: int | None = None

    @property
    def label(self) -> str:
        if self.method == "full":
            return "full"
        if self.method == "mora":
            return f"mora{self.mora_type} r={self.r}"
        if self.method == "mora_mag":
            return f"mora{self.mora_type}+mag r={self.r}"
        return f"{self.method} r={self.r}"

    @property
    def tag(self) -> str:
        """The method's key in ratio and target names: ``full``, ``lora_r8``, ``mora6_r8``, ``dora_r8``,
        ``mora6mag_r8``."""
        if self.method == "full":
            return "full"
        if self.method == "mora_mag":
            return f"mora{self.mora_type}mag_r{self.r}"
        return f"{self.method}{self.mora_type or ''}_r{self.r}"

    @classmethod
    def from_label(cls, label: str) -> "MethodSpec":
        """The inverse of :attr:`label`: "full", "<method> r=<r>" (lora, dora, pissa, hira), "mora<type> r=<r>"
        or "mora<type>+mag r=<r>"."""
        m = re.fullmatch(r"\s*(full|(lora|dora|pissa|hira) r=(\d+)|mora([12346])(\+mag)? r=(\d+))\s*", label)
        if not m:
            raise ValueError(f'method {label!r}: use "full", "<method> r=<r>" with method lora, dora, pissa or hira, '
                             '"mora<type> r=<r>" (e.g. "mora6 r=8") or "mora<type>+mag r=<r>"')
        if m.group(1) == "full":
            return cls("full")
        if m.group(2):
            return cls(m.group(2), int(m.group(3)))
        return cls("mora_mag" if m.group(5) else "mora", int(m.group(6)), int(m.group(4)))

    @classmethod
    def family(cls, method: str, r: int) -> "MethodSpec":
        """One of :data:`PEFT_METHODS` at rank ``r`` ("mora_mag": of type :data:`MAGNITUDE_TYPE`)."""
        return cls(method, r, MAGNITUDE_TYPE if method == "mora_mag" else None)

    @property
    def flops_method(self) -> str:
        """The method name ``mora_jax.flops`` counts it as: a magnitude adds no matmul (MoRA's FLOPs)."""
        return "mora" if self.method == "mora_mag" else self.method

    def adapter_config(self, alpha: float = LORA_ALPHA):
        """The method's adapter config on the seven projections; LoRA, DoRA and PiSSA with ``alpha``."""
        targets = (LLAMA_TARGETS,)
        if self.method == "full":
            return FullConfig(targets=targets)
        if self.method == "lora":
            return LoRAConfig(r=self.r, alpha=alpha, targets=targets)
        if self.method == "dora":
            return DoRAConfig(r=self.r, alpha=alpha, targets=targets)
        if self.method == "pissa":
            return PiSSAConfig(r=self.r, alpha=alpha, targets=targets, niter=PISSA_NITER)
        if self.method == "hira":
            return HiRAConfig(r=self.r, targets=targets)
        return MoRAConfig(r=self.r, mora_type=self.mora_type, targets=targets, magnitude=self.method == "mora_mag")

    def run_config(self, run: RunConfig) -> RunConfig:
        """``run`` training this method (no ReMoRA merges: every step is a plain train step; MoRA with a
        magnitude without a PEFT adapter export, which has no format for it)."""
        export = dataclasses.replace(run.export, adapter=False) if self.method == "mora_mag" else run.export
        return dataclasses.replace(run, adapter=self.adapter_config(), remora=RemoraConfig(every=0), export=export)


def method_specs(r_values: Sequence[int], mora_types: Sequence[int], include_full: bool = True,
                 peft_methods: Sequence[str] = ()) -> list[MethodSpec]:
    """Full fine-tuning first, then for each rank LoRA and MoRA of each type; the methods of
    ``peft_methods`` (:data:`PEFT_METHODS`) at the first rank, after its LoRA and MoRA."""
    specs = [MethodSpec("full")] if include_full else []
    for i, r in enumerate(r_values):
        specs.append(MethodSpec("lora", r))
        specs += [MethodSpec("mora", r, t) for t in mora_types]
        if i == 0:
            specs += [MethodSpec.family(m, r) for m in peft_methods]
    return specs


def row_spec(row: Mapping) -> MethodSpec:
    """The :class:`MethodSpec` of a results row (``method``, ``r``, ``mora_type``)."""
    return MethodSpec(row["method"], row["r"], row.get("mora_type"))


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


__all__ = ["LORA_ALPHA", "PEFT_METHODS", "PISSA_NITER", "MethodSpec", "make_batch", "method_specs", "model_name",
           "row_spec"]

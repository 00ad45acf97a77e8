"""A benchmark config: a run config plus one ``benchmark`` section.

A ``configs/bench_*.py`` file is a run config (``configs/base.py``'s schema, read by
:meth:`mora_jax.run_config.RunConfig.from_dict`) with one more section, ``benchmark``, for what only
the benchmark has: the ranks and MoRA types timed, timed and warm-up steps, the matmul peak, the
micro-benchmarks, the scaling sweeps, the PyTorch peer and the generation settings. The model, its
dtypes, remat and scan (``model``), the batch and sequence length (``train.batch_size``,
``train.seq_len``), the optimizer (``optim``), the mesh and the seed are the run's: the benchmark
builds models, meshes and steps through :mod:`mora_jax.assembly` like a run. The run's own method and
adapter are not used: each timed method (:class:`mora_jax.bench.methods.MethodSpec`) replaces them.

:meth:`BenchConfig.from_config` splits the section off before ``RunConfig.from_dict`` (which stays
strict) and checks it as strictly: an unknown field is an error naming the valid ones. A run config
without the section is benchmarked with the defaults below (e.g. ``--config
configs/math_finetune.py:chat``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mora_jax.bench.generation import GenerationSettings
from mora_jax.bench.methods import PEFT_METHODS
from mora_jax.run_config import RunConfig

# --quantized: a GGUF file's kept blocks ("gguf") need a GGUF model; every other format quantizes the float base
QUANT_FORMATS = ("none", "int8", "int4", "nf4", "q8_0", "q4_0", "q4_1")


@dataclasses.dataclass(frozen=True)
class DeltaWeightSettings:
    """``delta_weight`` of a ``in_features × out_features`` kernel against writing an output of its size."""

    enabled: bool = True
    in_features: int = 4096
    out_features: int = 11008
    r: int = 8
    mora_types: tuple[int, ...] = (1, 6)
    repeats: int = 5


@dataclasses.dataclass(frozen=True)
class ScalingSettings:
    """``--scaling``: step time vs sequence length, batch and rank, merge time vs kernel size."""

    seq_lens: tuple[int, ...] = (32, 64, 128)
    batches: tuple[int, ...] = (1, 2, 4, 8)
    ranks: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
    kernel_sizes: tuple[tuple[int, int], ...] = ((512, 512), (1024, 1024), (2048, 2048), (2048, 5632),
                                                 (4096, 4096), (4096, 11008))
    merge_r: int = 8
    steps: int = 5
    warmup: int = 1
    repeats: int = 5


@dataclasses.dataclass(frozen=True)
class PeerSettings:
    """``--peer``: the same model in PyTorch (HF transformers + PEFT) on the same CPU, its steps timed
    in the same rotation as mora-jax's (``benchmark.steps`` each)."""

    threads: int = 0  # torch.set_num_threads (0 = all cores)
    attention: str = "sdpa"  # transformers' attention implementation ("sdpa": its default; "eager")
    generation: bool = True  # also time generation in both frameworks (benchmark.generation's settings)

    def __post_init__(self):
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"benchmark.peer.attention={self.attention!r}: choose 'sdpa' or 'eager'")


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """A run config (``run``) and the benchmark section's fields."""

    run: RunConfig = RunConfig()
    r_small: int = 8
    r_large: int = 32
    mora_types: tuple[int, ...] = (1, 6)
    peft_methods: tuple[str, ...] = ()
    quant_formats: tuple[str, ...] = ("none", "int8", "int4", "nf4")  # --quantized: the base in each format
    full: bool = True
    steps: int = 5
    warmup: int = 2
    interleave: bool = True
    xla_tuning_ablation: bool = True
    merge_type: int = 1
    merge_r: int = 0
    matmul_size: int = 2048
    matmul_chain: int = 4
    matmul_repeats: int = 5
    delta_weight: DeltaWeightSettings = DeltaWeightSettings()
    scaling: ScalingSettings = ScalingSettings()
    peer: PeerSettings = PeerSettings()
    generation: GenerationSettings = GenerationSettings()

    def __post_init__(self):
        for name in ("r_small", "r_large", "steps", "matmul_size", "matmul_chain", "matmul_repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"benchmark.{name} must be a positive integer, got {value!r}")
        bad = [t for t in self.mora_types if t not in (1, 2, 3, 4, 6)]
        if bad:
            raise ValueError(f"benchmark.mora_types={self.mora_types!r}: use MoRA types among 1, 2, 3, 4 and 6 "
                             "(or none: () times full fine-tuning and LoRA)")
        if isinstance(self.peft_methods, str) or any(m not in PEFT_METHODS for m in self.peft_methods):
            raise ValueError(f"benchmark.peft_methods={self.peft_methods!r}: give a tuple of methods among "
                             f"{', '.join(repr(m) for m in PEFT_METHODS)}, e.g. ('dora', 'pissa', 'hira')")
        bad = [f for f in self.quant_formats if f not in QUANT_FORMATS]
        if isinstance(self.quant_formats, str) or bad or not self.quant_formats or self.quant_formats[0] != "none":
            raise ValueError(f"benchmark.quant_formats={self.quant_formats!r}: give a tuple that starts with 'none' "
                             f"(the float base every ratio is against), then formats among "
                             f"{', '.join(repr(f) for f in QUANT_FORMATS if f != 'none')}")

    @property
    def ranks(self) -> tuple[int, ...]:
        """``(r_small, r_large)``, once each."""
        return tuple(dict.fromkeys((self.r_small, self.r_large)))

    @classmethod
    def from_config(cls, config) -> "BenchConfig":
        """From an ``ml_collections.ConfigDict`` (or a plain dict, or a ``BenchConfig``): the
        ``benchmark`` section split off, the rest a :class:`RunConfig`."""
        if isinstance(config, BenchConfig):
            return config
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        section = dict(config.pop("benchmark", None) or {})
        run = RunConfig.from_dict(config)
        nested = {"delta_weight": DeltaWeightSettings, "scaling": ScalingSettings, "peer": PeerSettings,
                  "generation": GenerationSettings}
        values = _checked(cls, "benchmark", section, exclude=("run",))
        for name, section_cls in nested.items():
            if name in values:
                values[name] = section_cls(**_checked(section_cls, f"benchmark.{name}", values[name]))
        return cls(run=run, **values)


_TUPLES = ("mora_types", "peft_methods", "quant_formats", "seq_lens", "batches", "ranks", "kernel_sizes")


def _checked(cls, name: str, values: Mapping[str, Any], exclude=()) -> dict:
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    unknown = set(values) - fields
    if unknown:
        raise ValueError(f"config.{name} has no field(s) {sorted(unknown)}; valid: {sorted(fields)}")
    for key in _TUPLES:
        if key in values:
            values[key] = tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in values[key])
    return values


__all__ = ["BenchConfig", "DeltaWeightSettings", "PeerSettings", "ScalingSettings"]

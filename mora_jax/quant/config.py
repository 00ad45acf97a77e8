"""``model.quantize``: which frozen kernels are stored quantized, and how."""

from __future__ import annotations

import dataclasses
import re

from mora_jax.errors import ConfigError
from mora_jax.methods import LLAMA_TARGETS, LoRAConfig, MoRAConfig

FORMATS = ("none", "int8", "int4", "nf4", "gguf", "q8_0", "q4_0", "q4_1")
SCALE_DTYPES = ("float32", "bfloat16")
FOUR_BIT = ("int4", "nf4", "q4_0", "q4_1")
MERGES = ("auto", "residual", "requantize")
PROJECTION_TARGETS = LLAMA_TARGETS  # the seven projections of a block (not the embeddings, norms or lm_head)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """Attributes:
      format: "none" (float base), "int8" (one scale per output channel, symmetric), "int4" / "nf4"
        (one scale per block of ``block_size`` input features), "gguf" (a GGUF file's Q8_0 / Q4_0 / Q4_1
        blocks kept as loaded, ``mora_jax.gguf.weights.load_gguf(..., keep_quantized=True)``), or one of
        GGUF's block formats "q8_0" / "q4_0" / "q4_1" applied to float weights (blocks of 32, ggml's rounding).
      block_size: input features per scale for int4 / nf4 (must divide each target's input features).
      scale_dtype: "float32" or "bfloat16" scales (GGUF formats keep their float16 ones).
      targets: a regular expression matched whole (``re.fullmatch``) against '/'-joined parameter
        paths; default the seven projections.
      merge: what a ReMoRA / ReLoRA merge does to a quantized kernel: "residual" keeps the merged
        update exactly beside the codes (``mora_jax.quant.residual``; LoRA and MoRA without a magnitude),
        "requantize" dequantizes, merges and quantizes again (rounds away most of an update on a 4-bit
        base), "auto" (default, from the measurements in docs/quantization.md) keeps merges on 4-bit
        formats where the method allows it and re-quantizes otherwise (int8 keeps an update whole).
    """

    format: str = "none"
    block_size: int = 64
    scale_dtype: str = "float32"
    targets: str = PROJECTION_TARGETS
    merge: str = "auto"

    def __post_init__(self):
        if self.merge not in MERGES:
            raise ConfigError(f"model.quantize.merge={self.merge!r}: choose one of {', '.join(MERGES)}")
        if self.format not in FORMATS:
            raise ConfigError(f"model.quantize.format={self.format!r}: choose one of {', '.join(FORMATS)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2 \
                or self.block_size % 2:
            raise ConfigError(f"model.quantize.block_size={self.block_size!r}: use an even integer >= 2 that divides "
                              "the targets' input features (e.g. 32, 64 or 128)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(f"model.quantize.scale_dtype={self.scale_dtype!r}: choose one of {', '.join(SCALE_DTYPES)}")
        if not isinstance(self.targets, str) or not self.targets:
            raise ConfigError(f"model.quantize.targets={self.targets!r}: give one regular expression over parameter "
                              f"paths, e.g. {PROJECTION_TARGETS!r}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ConfigError(f"model.quantize.targets={self.targets!r} is not a regular expression ({e}); fix it, "
                              f"e.g. {PROJECTION_TARGETS!r}") from None

    @property
    def enabled(self) -> bool:
        return self.format != "none"

    def keeps_merges(self, adapter_config) -> bool:
        """Whether merges of ``adapter_config``'s adapters are kept beside the quantized codes."""
        if not self.enabled or self.merge == "requantize":
            return False
        allowed = type(adapter_config) is LoRAConfig or (type(adapter_config) is MoRAConfig
                                                          and not adapter_config.magnitude)
        if self.merge == "residual" and not allowed:
            raise ConfigError(f"model.quantize.merge='residual' keeps LoRA and MoRA (without a magnitude) merges, not "
                              f"{adapter_config.method}'s: set model.quantize.merge='requantize' (or 'auto')")
        return allowed and (self.merge == "residual" or self.format in FOUR_BIT)

    def merge_warning(self, merge_every: int, adapter_config=None) -> str | None:
        """A line for runs whose merges re-quantize a 4-bit base (measured in ``docs/quantization.md``), else None."""
        if not merge_every or self.format not in FOUR_BIT:
            return None
        if adapter_config is not None and self.keeps_merges(adapter_config):
            return None
        return (f"model.quantize.format={self.format!r} with merges every {merge_every} steps: re-quantizing a merged "
                "kernel to 4 bits rounds away most of an update smaller than ~10% of the kernel (docs/quantization.md); "
                "with LoRA or MoRA (no magnitude) model.quantize.merge='residual' keeps merges exactly; else consider "
                "remora.every=0 or model.quantize.format='int8'")

    @classmethod
    def from_value(cls, value) -> "QuantConfig":
        """A ``QuantConfig`` from itself, a mapping (a config section) or None (no quantization)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        values = dict(value)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ConfigError(f"model.quantize has no field(s) {unknown}; valid: {sorted(fields)}")
        return cls(**values)


__all__ = ["FOUR_BIT", "FORMATS", "MERGES", "PROJECTION_TARGETS", "SCALE_DTYPES", "QuantConfig"]

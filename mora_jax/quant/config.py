"""``model.quantize``: which frozen kernels are stored quantized, and how."""

from __future__ import annotations

import dataclasses
import re

from mora_jax.errors import ConfigError
from mora_jax.methods import LLAMA_TARGETS

FORMATS = ("none", "int8", "int4", "nf4", "gguf", "q8_0", "q4_0", "q4_1")
SCALE_DTYPES = ("float32", "bfloat16")
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
    """

    format: str = "none"
    block_size: int = 64
    scale_dtype: str = "float32"
    targets: str = PROJECTION_TARGETS

    def __post_init__(self):
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


__all__ = ["FORMATS", "PROJECTION_TARGETS", "SCALE_DTYPES", "QuantConfig"]

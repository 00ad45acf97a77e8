"""The FLOP model of the benchmark: :mod:`mora_jax.flops`, re-exported.

It lives in the core package because the TPU planner (:mod:`mora_jax.plan`) reports the same MFU
from it, and the core never imports :mod:`mora_jax.bench`.
"""

from mora_jax.flops import (  # noqa: F401 (re-exported)
    adapter_flops_per_token,
    flop_breakdown,
    llama_kernel_shapes,
    model_flops_per_step,
    mora_chunks_used,
)

__all__ = ["adapter_flops_per_token", "flop_breakdown", "llama_kernel_shapes", "model_flops_per_step", "mora_chunks_used"]

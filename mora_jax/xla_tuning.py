"""XLA compiler options for the training step, per backend.

On XLA:CPU (jaxlib 0.10), the YNNPACK "reduce" library fusions swallow a MoRA layer's backward
input-gradient dots together with the adjoint of its compression/decompression (a sum over chunks),
and those fused kernels run at about half the plain matmul rate. Restricting YNNPACK to individual
dots keeps the dots on the fast path: the MoRA training step of the 250M model gets 3-15% faster
(interleaved in one process: 0.85x at 4 layers, 0.93-0.97x at 24), LoRA and full fine-tuning are
unchanged within noise (``docs/benchmarks.md``, "Profiling"). Other backends get no options.

The options are applied per compile (``jax.jit(..., compiler_options=...)``), so they never touch
the user's other programs. They are skipped when ``XLA_FLAGS`` already sets the same option (the
user's choice wins), when ``MORA_JAX_XLA_TUNING=0``, or when this jaxlib does not know the option.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

CPU_TRAIN_STEP_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
DISABLE_ENV = "MORA_JAX_XLA_TUNING"


@functools.cache
def _supported(items: tuple) -> bool:
    """Whether this jaxlib's CPU compiler accepts these options (a one-off scalar compile)."""
    try:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        arg = jax.ShapeDtypeStruct((), jnp.float32, sharding=cpu)
        jax.jit(lambda x: x + 1, compiler_options=dict(items)).lower(arg).compile()
    except Exception:  # unknown option or enum value in this jaxlib: compile without it
        return False
    return True


def train_step_compiler_options(platform: str | None = None) -> dict | None:
    """Compiler options for a training step compiled for ``platform`` (default: JAX's default
    backend), or ``None`` when there are none to apply."""
    platform = platform or jax.default_backend()
    if platform != "cpu" or os.environ.get(DISABLE_ENV, "1").strip() == "0":
        return None
    flags = os.environ.get("XLA_FLAGS", "")
    options = {k: v for k, v in CPU_TRAIN_STEP_OPTIONS.items() if f"--{k}" not in flags}
    if not options or not _supported(tuple(sorted(options.items()))):
        return None
    return options


def mesh_platform(mesh) -> str:
    """The platform of a mesh's devices (``'cpu'``, ``'gpu'``, ``'tpu'``)."""
    return mesh.devices.flat[0].platform


__all__ = ["CPU_TRAIN_STEP_OPTIONS", "DISABLE_ENV", "mesh_platform", "train_step_compiler_options"]

"""Multi-process (multi-host) start-up and per-process batch slicing.

Every process runs the same program (SPMD, multi-controller): call :func:`initialize` first,
before anything touches a JAX device, then build the mesh over ``jax.devices()`` (all processes'
devices), and feed each process only its own rows of the global batch::

    mora_jax.distributed.initialize()                     # TPU pods / SLURM: auto-detected
    mesh = mora_jax.sharding.make_mesh(MeshConfig(...))
    rows = process_batch_slice(global_batch_size, mora_jax.sharding.batch_sharding(mesh))
    batch = mora_jax.sharding.shard_batch({k: v[rows] for k, v in global_batch_np.items()}, mesh)

On CPU (tests, debugging) several processes on one machine talk through gloo collectives:
``initialize('127.0.0.1:PORT', num_processes=2, process_id=i)`` in each process.
"""

from __future__ import annotations

import logging
import os
from typing import Sequence

import jax

logger = logging.getLogger(__name__)


def _cpu_only() -> bool:
    """Whether this process will run on CPU only (decided before any backend starts)."""
    platforms = os.environ.get("JAX_PLATFORMS") or (getattr(jax.config, "jax_platforms", None) or "")
    names = {p.strip().lower() for p in str(platforms).split(",") if p.strip()}
    return names == {"cpu"}


def _enable_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend need an implementation (gloo).

    jax >= 0.4.36 defaults ``jax_cpu_collectives_implementation`` to ``'gloo'``; older versions
    default to none, and then multi-process CPU computations fail at the first collective.
    """
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:  # very old jax: no CPU collectives flag at all
        logger.warning("this jax has no jax_cpu_collectives_implementation flag; multi-process CPU runs may fail")
        return
    if current in (None, "none", ""):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               *, initialization_timeout: int = 300) -> None:
    """Start JAX's distributed runtime (a thin wrapper around ``jax.distributed.initialize``).

    Must run in every process before any JAX computation or device query. With all arguments
    None, JAX detects the cluster (Cloud TPU pods, SLURM, Open MPI, Kubernetes; or the
    ``JAX_COORDINATOR_ADDRESS`` environment variable) and fails with its own error outside one.
    On a CPU-only run (``JAX_PLATFORMS=cpu``) gloo cross-process collectives are switched on.
    Calling it again after a successful start is a no-op.

    Args:
      coordinator_address: ``host:port`` of process 0, reachable by every process.
      num_processes: total number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: the local devices this process uses (GPUs; default all).
      initialization_timeout: seconds to wait for all processes to connect.
    """
    if _is_initialized():
        logger.info("jax.distributed is already initialised (process %d of %d)", jax.process_index(), jax.process_count())
        return
    if _cpu_only():
        _enable_cpu_collectives()
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=initialization_timeout,
    )
    logger.info("jax.distributed initialised: process %d of %d, %d local / %d global devices",
                jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def _is_initialized() -> bool:
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    if is_initialized is not None:
        return bool(is_initialized())
    from jax._src import distributed as _distributed  # jax < 0.4.33 has no public check

    return _distributed.global_state.client is not None


def shutdown() -> None:
    """Stop the distributed runtime (optional; JAX does it at exit)."""
    jax.distributed.shutdown()


def process_batch_slice(global_batch_size: int, sharding: jax.sharding.Sharding | None = None) -> slice:
    """The rows of a ``(global_batch_size, ...)`` batch that this process feeds.

    With ``sharding`` (e.g. :func:`mora_jax.sharding.batch_sharding`), the rows held by this
    process's devices, which is what ``jax.make_array_from_process_local_data`` expects from it;
    without, an even split in process order. Raises if the rows are not contiguous (a mesh whose
    batch axes interleave processes) or not divisible among the processes.
    """
    count, index = jax.process_count(), jax.process_index()
    if sharding is None:
        if global_batch_size % count:
            raise ValueError(f"global batch of {global_batch_size} rows does not split evenly over {count} processes")
        per = global_batch_size // count
        return slice(index * per, (index + 1) * per)
    shape = (global_batch_size,) + (1,) * (len(getattr(sharding, "spec", ())) - 1)
    rows: set[int] = set()
    for device_index in sharding.addressable_devices_indices_map(shape).values():
        rows.update(range(*device_index[0].indices(global_batch_size)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise ValueError(
            f"this process's devices hold non-contiguous batch rows {sorted(rows)[:8]}...; order the mesh so that "
            "each process's devices are consecutive along the batch axes"
        )
    return slice(start, stop)


__all__ = ["initialize", "process_batch_slice", "shutdown"]

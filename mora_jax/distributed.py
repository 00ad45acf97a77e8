"""Multi-process (multi-host) start-up and per-process batch slicing.

Every process runs the same program (SPMD, multi-controller): call :func:`initialize` first,
before anything touches a JAX device, then build the mesh over ``jax.devices()`` (all processes'
devices), and feed each process only its own rows of the global batch::

    mora_jax.distributed.initialize()                     # TPU pods / SLURM: auto-detected
    mesh = mora_jax.mesh.make_mesh(MeshConfig(...))
    rows = process_batch_slice(global_batch_size, mora_jax.sharding.batch_sharding(mesh))
    batch = mora_jax.sharding.shard_batch({k: v[rows] for k, v in global_batch_np.items()}, mesh)

On CPU (tests, debugging) several processes on one machine talk through gloo collectives:
``initialize('127.0.0.1:PORT', num_processes=2, process_id=i)`` in each process.

Every entry point (``train.pretrain``, ``train.finetune``, ``train.uuid_memorization``,
``train.benchmark``) calls :func:`initialize` first: on a laptop or a single TPU VM it does nothing;
on a TPU pod slice, under SLURM / Open MPI / Kubernetes it joins the cluster JAX detects; elsewhere
it takes the coordinator and process index from the arguments (``--coordinator_address``,
``--num_processes``, ``--process_id`` of ``train.pretrain`` / ``train.finetune``) or from the
environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Sequence

import jax
import numpy as np

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


ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def detect_cluster() -> tuple[str, int] | None:
    """``(cluster name, process count)`` of the cluster JAX's auto-detection would join (Cloud TPU
    pod slices, SLURM, Open MPI, Kubernetes), or None outside one."""
    try:
        from jax._src import clusters  # registers JAX's cluster environments
    except ImportError:  # a jax without them: nothing to detect
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return env.__name__, int(env.get_process_count())
        except Exception as e:  # a half-configured environment: let jax.distributed say what is wrong
            logger.debug("cluster detection %s failed: %s", env.__name__, e)
            return env.__name__, 0
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               *, initialization_timeout: int = 300) -> bool:
    """Start JAX's distributed runtime when this program runs as several processes; returns whether
    it runs (False: one process, nothing to start).

    Must run in every process before any JAX computation or device query. Arguments left None are
    read from the environment (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``); with none set, a cluster JAX detects (Cloud TPU pods, SLURM, Open MPI,
    Kubernetes) is joined if it has more than one process, and anything else is a single process
    (a no-op). On a CPU-only run (``JAX_PLATFORMS=cpu``) gloo cross-process collectives are switched
    on. Calling it again after a successful start is a no-op.

    Args:
      coordinator_address: ``host:port`` of process 0, reachable by every process.
      num_processes: total number of processes (1: a no-op).
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: the local devices this process uses (GPUs; default all).
      initialization_timeout: seconds to wait for all processes to connect.
    """
    if _is_initialized():
        logger.info("jax.distributed is already initialised (process %d of %d)", jax.process_index(), jax.process_count())
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
        raise ValueError(f"num_processes must be >= 1, got {num_processes!r}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is not in [0, num_processes={num_processes})")
    if num_processes == 1:
        return False
    if coordinator_address is None and num_processes is None and process_id is None:
        cluster = detect_cluster()
        if cluster is None or cluster[1] == 1:
            logger.info("one process (%s): jax.distributed not started", cluster[0] if cluster else "no cluster detected")
            return False
        logger.info("joining the %s cluster (%s processes)", cluster[0], cluster[1] or "?")
    elif coordinator_address is None or num_processes is None or process_id is None:
        missing = [name for name, value in (("coordinator address", coordinator_address),
                                            ("number of processes", num_processes), ("process id", process_id))
                   if value is None]
        if detect_cluster() is None:
            raise ValueError(
                f"a multi-process run needs the coordinator address, the number of processes and this process's id; "
                f"missing: {', '.join(missing)} (pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I, "
                f"or set {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
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
    return True


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


def spans_processes(tree) -> bool:
    """Whether any array in ``tree`` has shards on other processes (reading it is then a collective)."""
    return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree_util.tree_leaves(tree))


def fetch(x) -> np.ndarray:
    """The whole value of ``x`` as a NumPy array on this host.

    For an array sharded across processes this gathers it (``process_allgather``): a collective,
    so every process must call it, for the same arrays in the same order."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def fetch_tree(tree):
    """:func:`fetch` of every array leaf of ``tree`` (a collective where arrays span processes)."""
    return jax.tree_util.tree_map(fetch, tree)


def all_processes_agree(ok: bool) -> bool:
    """True iff ``ok`` holds on every process (a collective; with one process, ``ok``)."""
    if jax.process_count() == 1:
        return bool(ok)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(bool(ok)))))


def gather_process_states(state):
    """Every process's JSON-able ``state`` (e.g. its data iterator's position), for a checkpoint that
    process 0 writes: ``state`` itself with one process, else ``{"per_process": [state of process 0,
    1, ...]}`` (a collective). :func:`own_process_state` takes a process's part back."""
    if jax.process_count() == 1:
        return state
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return {"per_process": [json.loads(bytes(row[:n])) for row, n in zip(rows, lengths)]}


def own_process_state(saved):
    """This process's state in what :func:`gather_process_states` returned (a single process's state
    is returned as is)."""
    if not (isinstance(saved, dict) and set(saved) == {"per_process"}):
        return saved
    states = saved["per_process"]
    if len(states) != jax.process_count():
        raise ValueError(
            f"the checkpoint was written by {len(states)} processes, this run has {jax.process_count()}: each "
            f"process reads its own shard of the data, so resume with {len(states)} processes (or start anew)")
    return states[jax.process_index()]


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


__all__ = ["all_processes_agree", "barrier", "detect_cluster", "fetch", "fetch_tree", "gather_process_states",
           "initialize", "own_process_state", "process_batch_slice", "shutdown", "spans_processes"]

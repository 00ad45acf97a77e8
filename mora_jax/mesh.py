"""The device mesh: named axes over the devices of every process.

:class:`MeshConfig` gives axis names and sizes (one size may be ``-1``: the remaining devices) and
:func:`make_mesh` builds the :class:`jax.sharding.Mesh` in JAX's topology-aware device order.
The default axes are ``('data', 'fsdp', 'tensor')`` (see :mod:`mora_jax.sharding` for what each
means); a run config's ``mesh`` section names their sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mora_jax.errors import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_AXIS_NAMES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Axis names and sizes of the device mesh; one size may be ``-1`` (= the remaining devices).

    The default is pure data parallelism over all devices, ``data=-1, fsdp=1, tensor=1``.
    """

    axis_names: tuple[str, ...] = DEFAULT_AXIS_NAMES
    axis_sizes: tuple[int, ...] = (-1, 1, 1)

    def __post_init__(self):
        names = (self.axis_names,) if isinstance(self.axis_names, str) else tuple(self.axis_names)
        sizes = (self.axis_sizes,) if isinstance(self.axis_sizes, int) else tuple(self.axis_sizes)
        object.__setattr__(self, "axis_names", names)
        object.__setattr__(self, "axis_sizes", sizes)
        if not names:
            raise ConfigError("MeshConfig needs at least one axis")
        if len(names) != len(sizes):
            raise ConfigError(f"MeshConfig has {len(names)} axis names {names} but {len(sizes)} sizes {sizes}")
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"MeshConfig axis names must be distinct non-empty strings, got {names}")
        for name, size in zip(names, sizes):
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
                raise ConfigError(f"mesh axis {name!r} has size {size!r}: sizes are positive ints, or -1 for the rest")
        if sum(1 for s in sizes if s == -1) > 1:
            raise ConfigError(f"at most one mesh axis may have size -1 (the remaining devices), got {dict(zip(names, sizes))}")

    def resolve(self, num_devices: int) -> tuple[int, ...]:
        """The concrete axis sizes for ``num_devices`` devices (``-1`` filled in)."""
        fixed = math.prod(s for s in self.axis_sizes if s != -1)
        described = " × ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.axis_sizes))
        if -1 in self.axis_sizes:
            if num_devices % fixed:
                raise ConfigError(
                    f"mesh {described}: the fixed axes need a multiple of {fixed} devices, but there are "
                    f"{num_devices}; choose sizes whose product divides {num_devices}"
                )
            return tuple(num_devices // fixed if s == -1 else s for s in self.axis_sizes)
        if fixed != num_devices:
            raise ConfigError(
                f"mesh {described} has {fixed} devices but there are {num_devices}; make the sizes multiply "
                f"to {num_devices}, or set one of them to -1 (the remaining devices)"
            )
        return tuple(self.axis_sizes)


def make_mesh(mesh_config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A :class:`jax.sharding.Mesh` over ``devices`` (default: every device of every process).

    Axes are ``Auto`` (GSPMD propagates shardings between the constraints); the device order is
    ``jax.make_mesh``'s topology-aware one, so on multi-host systems consecutive entries of the
    last axes stay within a host.
    """
    mesh_config = mesh_config or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_config.resolve(len(devices))
    names = mesh_config.axis_names
    auto = getattr(jax.sharding, "AxisType", None)
    try:
        kwargs = {"axis_types": (auto.Auto,) * len(names)} if auto is not None else {}
        return jax.make_mesh(sizes, names, devices=devices, **kwargs)
    except (TypeError, AttributeError, NotImplementedError, ValueError) as e:  # older jax, unusual topologies
        logger.debug("jax.make_mesh failed (%s); falling back to a plain reshape of the device list", e)
    device_array = np.asarray(devices, dtype=object).reshape(sizes)
    try:
        return Mesh(device_array, names, axis_types=(auto.Auto,) * len(names)) if auto is not None else Mesh(device_array, names)
    except TypeError:
        return Mesh(device_array, names)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def mesh_context(mesh: Mesh):
    """Make ``mesh`` the ambient mesh (``PartitionSpec`` constraints inside jit resolve against it)."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):
        return jax.sharding.use_mesh(mesh)
    return mesh  # jax < 0.5: the Mesh itself is the context manager


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works across processes: an array held by this
    process alone (initialised from the same seed in every process) becomes the global array of
    each process's shards. Arrays already in place are not copied."""
    return jax.tree_util.tree_map(_put, tree, shardings)


def _put(x, sharding):
    if isinstance(x, jax.Array) and x.is_fully_addressable and not sharding.is_fully_addressable:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(_put(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
        x = np.asarray(x)  # the same value in every process: each takes its shards from it
    return jax.device_put(x, sharding)


__all__ = ["DEFAULT_AXIS_NAMES", "MeshConfig", "make_mesh", "mesh_context", "put", "replicated"]

"""LLaMA-style models and their training state sharded over a device mesh (one host or many).

Three layers of naming, as in MaxText / big_vision:

1. **Mesh axes** (:class:`MeshConfig`, :func:`make_mesh`): physical axes of the device mesh,
   by default ``('data', 'fsdp', 'tensor')``: pure data parallelism, data parallelism with
   parameters, gradients and optimizer moments sharded (ZeRO-3 / FSDP), and tensor (Megatron)
   parallelism inside the attention heads and the MLP.
2. **Logical axes**: names of array dimensions (``batch``, ``length``, ``embed``, ``heads``,
   ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``) mapped to mesh axes by
   :data:`LOGICAL_AXIS_RULES`. The LLaMA model annotates its activations with
   ``nn.with_logical_constraint``; the jitted steps here run under these rules and the mesh, so
   those annotations become sharding constraints.
3. **Parameter rules** (:data:`LLAMA_PARAM_RULES`): regexes over ``'/'``-joined parameter paths
   (``re.fullmatch``, first match wins) giving the logical axis of each dimension, e.g.
   ``.*/q_proj/kernel -> ('embed', 'heads')``. Leading dimensions beyond the rule's (the layer
   axis of an ``nn.scan`` model) are not sharded; a dimension whose size is not divisible by its
   mesh axes falls back to fewer axes, down to replicated (logged at debug level). Parameters
   that no rule matches are replicated.

Adapters: MoRA's ``m`` (``r̂ × r̂``, or ``(L, r̂, r̂)`` when scanned) is small and replicated unless
a rule matches its path (``…/q_proj/kernel/m``); LoRA's ``a (k, r)`` / ``b (r, d)`` shard ``k`` / ``d``
like the adapted kernel's input / output dimension. Optimizer-state leaves follow the trainable
leaf they belong to (matched by key-path suffix and shape); scalars (step counts, injected
hyperparameters) are replicated.

Typical use::

    mesh = make_mesh(MeshConfig(axis_sizes=(-1, 1, 4)))         # data × fsdp × tensor
    state, state_sh = init_sharded_state(init_fn, rng, mesh=mesh)  # never materialised whole
    step = jit_train_step(model, tx, schedule, step_config, mesh, state_sh)
    for batch_np in loader:                                      # this process's rows only
        state, metrics = step(state, shard_batch(batch_np, mesh))
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mora_jax import adapters as adapters_lib
from mora_jax import remora, training, xla_tuning
from mora_jax.adapters import LoRAAdapter, MoRAAdapter, is_adapter

logger = logging.getLogger(__name__)

DEFAULT_AXIS_NAMES = ("data", "fsdp", "tensor")

# Logical dimension name -> mesh axes (None = not sharded). Order matters for activations:
# flax assigns each mesh axis at most once per array, in rule order, so ``batch`` (listed first)
# takes 'data' and 'fsdp' and an activation's ``embed`` dimension stays unsharded, while a
# parameter's ``embed`` dimension (no batch dimension) is sharded over 'fsdp'.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)

# Parameter path (re.fullmatch over '/'-joined path) -> logical axis of each (trailing) dimension.
LLAMA_PARAM_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
    (r".*/q_proj/kernel", ("embed", "heads")),
    (r".*/(k|v)_proj/kernel", ("embed", "kv_heads")),
    (r".*/o_proj/kernel", ("heads", "embed")),
    (r".*/(gate|up)_proj/kernel", ("embed", "mlp")),
    (r".*/down_proj/kernel", ("mlp", "embed")),
    (r"(.*/)?embed_tokens/embedding", ("vocab", "embed")),
    (r"(.*/)?lm_head/kernel", ("embed", "vocab")),
    (r".*norm/weight", (None,)),
    # MoRA's square matrix: small, replicated (prepend a rule to shard it).
    (r".*/kernel/m", (None, None)),
)


def _as_axes_tuple(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    if isinstance(axes, str):
        return (axes,)
    return tuple(axes)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical-axis rules plus parameter-path rules (hashable, so it can be closed over by ``jit``).

    Attributes:
      logical: ``(logical name, mesh axis | tuple of mesh axes | None)`` pairs, first match wins.
      params: ``(regex over '/'-joined path, logical name per trailing dimension)`` pairs, first
        ``re.fullmatch`` wins; ``None`` (or ``()``) replicates the parameter. Adapter leaves have
        paths ``<kernel path>/m`` (MoRA) and ``<kernel path>/a`` / ``<kernel path>/b`` (LoRA).
    """

    logical: tuple[tuple[str, Any], ...] = LOGICAL_AXIS_RULES
    params: tuple[tuple[str, tuple[str | None, ...]], ...] = LLAMA_PARAM_RULES

    def __post_init__(self):
        logical = tuple((str(name), _as_axes_tuple(axes) or None) for name, axes in self.logical)
        params = tuple((str(pattern), () if names is None else tuple(names)) for pattern, names in self.params)
        for pattern, _ in params:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"ShardingRules.params: invalid regular expression {pattern!r}: {e}") from None
        object.__setattr__(self, "logical", logical)
        object.__setattr__(self, "params", params)

    def with_param_rules(self, *rules: tuple[str, tuple[str | None, ...]]) -> "ShardingRules":
        """These rules with ``rules`` taking precedence over the existing parameter rules."""
        return dataclasses.replace(self, params=tuple(rules) + self.params)

    def mesh_axes(self, logical_name: str | None) -> tuple[str, ...]:
        """Mesh axes that ``logical_name`` maps to (``()`` for None or an unknown name)."""
        if logical_name is None:
            return ()
        for name, axes in self.logical:
            if name == logical_name:
                return axes or ()
        return ()

    def param_logical_axes(self, path: str) -> tuple[str | None, ...] | None:
        """Logical axes of the first parameter rule matching ``path``, or None if none matches."""
        for pattern, names in self.params:
            if re.fullmatch(pattern, path):
                return names
        return None

    def flax_rules(self, mesh: Mesh) -> tuple[tuple[str, Any], ...]:
        """The logical rules for ``flax.linen.logical_axis_rules``, restricted to ``mesh``'s axes."""
        out = []
        for name, axes in self.logical:
            present = tuple(a for a in (axes or ()) if a in mesh.shape)
            out.append((name, present[0] if len(present) == 1 else (present or None)))
        return tuple(out)


DEFAULT_RULES = ShardingRules()


# ---------------------------------------------------------------------------------------------
# Mesh.
# ---------------------------------------------------------------------------------------------


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
            raise ValueError("MeshConfig needs at least one axis")
        if len(names) != len(sizes):
            raise ValueError(f"MeshConfig has {len(names)} axis names {names} but {len(sizes)} sizes {sizes}")
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"MeshConfig axis names must be distinct non-empty strings, got {names}")
        for name, size in zip(names, sizes):
            if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
                raise ValueError(f"mesh axis {name!r} has size {size!r}: sizes are positive ints, or -1 for the rest")
        if sum(1 for s in sizes if s == -1) > 1:
            raise ValueError(f"at most one mesh axis may have size -1 (the remaining devices), got {dict(zip(names, sizes))}")

    def resolve(self, num_devices: int) -> tuple[int, ...]:
        """The concrete axis sizes for ``num_devices`` devices (``-1`` filled in)."""
        fixed = math.prod(s for s in self.axis_sizes if s != -1)
        described = " × ".join(f"{n}={s}" for n, s in zip(self.axis_names, self.axis_sizes))
        if -1 in self.axis_sizes:
            if num_devices % fixed:
                raise ValueError(
                    f"mesh {described}: the fixed axes need a multiple of {fixed} devices, but there are "
                    f"{num_devices}; choose sizes whose product divides {num_devices}"
                )
            return tuple(num_devices // fixed if s == -1 else s for s in self.axis_sizes)
        if fixed != num_devices:
            raise ValueError(
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


def _mesh_context(mesh: Mesh):
    """Make ``mesh`` the ambient mesh (``PartitionSpec`` constraints inside jit resolve against it)."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):
        return jax.sharding.use_mesh(mesh)
    return mesh  # jax < 0.5: the Mesh itself is the context manager


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """Context in which ``mesh`` is the ambient mesh and ``rules`` are flax's logical-axis rules, so the
    model's ``nn.with_logical_constraint`` annotations shard activations. Trace (first call or
    ``.lower``) your own ``jax.jit`` functions inside it; the ``jit_*`` helpers here do this for you."""
    with _mesh_context(mesh), nn.logical_axis_rules(rules.flax_rules(mesh)):
        yield


# ---------------------------------------------------------------------------------------------
# PartitionSpecs from rules.
# ---------------------------------------------------------------------------------------------


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _path_names(key_path) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in key_path)


def spec_from_logical(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                      rules: ShardingRules = DEFAULT_RULES, *, what: str = "array") -> PartitionSpec:
    """The PartitionSpec for an array of ``shape`` whose trailing dims have ``logical_axes``.

    Leading dimensions beyond ``logical_axes`` (e.g. a scanned layer axis) are not sharded; mesh
    axes absent from ``mesh`` or already used by an earlier dimension are skipped; a dimension not
    divisible by the product of its mesh axes keeps the longest prefix of them that divides it
    (possibly none: replicated along that dimension).
    """
    shape = tuple(shape)
    logical_axes = tuple(logical_axes)
    if len(logical_axes) > len(shape):
        raise ValueError(
            f"{what}: sharding rule gives {len(logical_axes)} logical axes {logical_axes} but the array has "
            f"shape {shape}; fix the rule in ShardingRules.params"
        )
    logical_axes = (None,) * (len(shape) - len(logical_axes)) + logical_axes
    used: set[str] = set()
    entries: list[Any] = []
    for dim, name in zip(shape, logical_axes):
        axes = [a for a in rules.mesh_axes(name) if a in mesh.shape and a not in used]
        wanted = list(axes)
        while axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes.pop()
        if axes != wanted:
            logger.debug("%s: dimension %s (%s, size %d) is not divisible by mesh axes %s; sharding it over %s",
                         what, len(entries), name, dim, wanted, axes or "nothing (replicated)")
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*entries)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec of the parameter at ``path`` ('/'-joined) with ``shape``."""
    logical = rules.param_logical_axes(path)
    if logical is None:
        logger.debug("no sharding rule matches parameter %s %s; replicating it", path, tuple(shape))
        return PartitionSpec(*([None] * len(shape)))
    return spec_from_logical(shape, logical, mesh, rules, what=path)


def _adapter_specs(path: str, adapter, mesh: Mesh, rules: ShardingRules):
    """The adapter node with each array field replaced by its PartitionSpec."""
    if isinstance(adapter, MoRAAdapter):
        return adapter.replace(m=param_spec(f"{path}/m", adapter.m.shape, mesh, rules))
    if isinstance(adapter, LoRAAdapter):
        specs = {}
        kernel_axes = rules.param_logical_axes(path) or ()
        k_axis, d_axis = kernel_axes[-2:] if len(kernel_axes) >= 2 else (None, None)
        for field, logical in (("a", (k_axis, None)), ("b", (None, d_axis))):
            leaf = getattr(adapter, field)
            own = rules.param_logical_axes(f"{path}/{field}")  # an explicit rule wins
            specs[field] = spec_from_logical(leaf.shape, own if own is not None else logical, mesh, rules,
                                             what=f"{path}/{field}")
        return adapter.replace(**specs)
    raise TypeError(f"unknown adapter type {type(adapter).__name__} at {path}")


def tree_specs(tree, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """PartitionSpecs for a parameter tree (arrays or ShapeDtypeStructs; may hold adapter nodes)."""
    def spec(key_path, leaf):
        path = "/".join(_path_names(key_path))
        if is_adapter(leaf):
            return _adapter_specs(path, leaf, mesh, rules)
        return param_spec(path, np.shape(leaf), mesh, rules)

    return jax.tree_util.tree_map_with_path(spec, tree, is_leaf=is_adapter)


def _named(specs, mesh: Mesh):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, PartitionSpec))


def tree_shardings(tree, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """``NamedSharding``s for a parameter or adapter tree (arrays or ShapeDtypeStructs)."""
    return _named(tree_specs(tree, mesh, rules), mesh)


params_shardings = tree_shardings


def param_sharding_fn(abstract_params, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> Callable:
    """``path tuple -> NamedSharding`` for ``mora_jax.hf.load_llama(..., shardings=fn)``, so that each
    device reads only its slice of each checkpoint tensor.

    ``abstract_params`` gives the shapes (divisibility fallbacks depend on them): e.g.
    ``mora_jax.models.llama.abstract_params(config)`` for the config being loaded (mind
    ``scan_layers``).
    """
    table = {tuple(map(str, path)): s for path, s in adapters_lib.flatten(tree_shardings(abstract_params, mesh, rules)).items()}

    def sharding_of(path) -> NamedSharding:
        key = tuple(map(str, path))
        if key not in table:
            raise KeyError(f"no parameter {'/'.join(key)} in the abstract params given to param_sharding_fn; "
                           "was it built for another config (size, scan_layers, tied embeddings)?")
        return table[key]

    return sharding_of


def follow_shardings(tree, reference, reference_shardings, mesh: Mesh):
    """Shardings for ``tree`` (e.g. an optax state) whose leaves mirror leaves of ``reference``.

    A leaf of ``tree`` gets the sharding of the ``reference`` leaf whose key path is the longest
    suffix of its own and whose shape is the same (``mu/model/.../kernel`` follows
    ``model/.../kernel``); every other leaf (step counts, hyperparameters, factored statistics) is
    replicated.
    """
    ref_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
    sh_leaves = jax.tree_util.tree_leaves(reference_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(ref_leaves) != len(sh_leaves):
        raise ValueError(f"reference has {len(ref_leaves)} leaves but its shardings have {len(sh_leaves)}")
    table = {_path_names(kp): (tuple(np.shape(leaf)), s) for (kp, leaf), s in zip(ref_leaves, sh_leaves)}
    repl = replicated(mesh)

    def follow(key_path, leaf):
        names = _path_names(key_path)
        shape = tuple(np.shape(leaf))
        for start in range(len(names)):
            hit = table.get(names[start:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        if shape:
            logger.debug("state leaf %s %s follows no parameter; replicating it", "/".join(names), shape)
        return repl

    return jax.tree_util.tree_map_with_path(follow, tree)


def state_shardings(abstract_state: training.TrainState, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """A :class:`~mora_jax.training.TrainState` of ``NamedSharding``s for ``abstract_state``
    (``jax.eval_shape`` of the state's constructor, or a concrete state).

    ``frozen`` and ``trainables`` follow the parameter rules (each group on its own paths, so
    rules anchored at ``model/...`` work); optimizer state follows the trainables; the step
    counter and rng key are replicated.
    """
    trainables = {name: tree_shardings(tree, mesh, rules) for name, tree in abstract_state.trainables.items()}
    opt_state = abstract_state.opt_state
    if isinstance(opt_state, Mapping) and set(opt_state) == set(trainables):  # one optimizer state per group
        opt_state = {name: follow_shardings(opt_state[name], abstract_state.trainables[name], trainables[name], mesh)
                     for name in opt_state}
    else:  # one optimizer over all trainables
        opt_state = follow_shardings(opt_state, abstract_state.trainables, trainables, mesh)
    return abstract_state.replace(
        step=replicated(mesh),
        frozen=tree_shardings(abstract_state.frozen, mesh, rules),
        trainables=trainables,
        opt_state=opt_state,
        rng=replicated(mesh),
    )


def shardings_for(abstract_tree, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """:func:`state_shardings` for a ``TrainState``, :func:`tree_shardings` for anything else."""
    if isinstance(abstract_tree, training.TrainState):
        return state_shardings(abstract_tree, mesh, rules)
    return tree_shardings(abstract_tree, mesh, rules)


def specs_of(shardings):
    """PartitionSpecs of a tree of NamedShardings (for printing and tests)."""
    return jax.tree_util.tree_map(lambda s: s.spec, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def place(tree, shardings):
    """A copy of ``tree`` (arrays) laid out in ``shardings``, sharing no buffer with ``tree``.

    Use it to hand a state to a donating step while keeping the original: ``jax.device_put`` to a
    replicated sharding reuses the source buffer for the source device (in jax 0.10 even with
    ``may_alias=False``), and donating the result then deletes the original too. Leaves are
    copied one at a time, so the extra memory is one leaf on its source device.
    """
    def put(x, sharding):
        return jax.device_put(x.copy() if isinstance(x, jax.Array) else x, sharding)

    return jax.tree_util.tree_map(put, tree, shardings)


# ---------------------------------------------------------------------------------------------
# Batches.
# ---------------------------------------------------------------------------------------------


def batch_axes(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> tuple[str, ...]:
    """Mesh axes that the batch dimension is split over (the ``batch`` logical axis on ``mesh``)."""
    return tuple(a for a in rules.mesh_axes("batch") if a in mesh.shape)


def batch_sharding(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a ``(batch, ...)`` input: batch dimension over the data axes (``data`` × ``fsdp``)."""
    axes = batch_axes(mesh, rules)
    return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else (axes[0] if axes else None)))


def shard_batch(batch: Mapping[str, Any], mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> dict[str, jax.Array]:
    """Global ``jax.Array``s from this process's rows of a batch (``{name: (local_batch, ...)}``).

    Each process passes only the rows its devices hold (see
    :func:`mora_jax.distributed.process_batch_slice`); with one process that is the whole batch.
    The rows are split over the batch shards this process holds, so their number must be
    divisible by it.
    """
    sharding = batch_sharding(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in batch_axes(mesh, rules))
    # batch shards held by this process: distinct row blocks among its devices
    local_shards = len({index[0].start for index in sharding.addressable_devices_indices_map((shards,)).values()})
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if not value.ndim or value.shape[0] % local_shards:
            raise ValueError(
                f"batch[{name!r}] has shape {value.shape} here, but this process holds {local_shards} of the "
                f"{shards} batch shards ({' × '.join(f'{a}={mesh.shape[a]}' for a in batch_axes(mesh, rules))}): "
                f"its rows must be divisible by {local_shards}"
            )
        global_shape = (value.shape[0] // local_shards * shards, *value.shape[1:])
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


# ---------------------------------------------------------------------------------------------
# Sharded initialisation.
# ---------------------------------------------------------------------------------------------


def init_sharded_state(init_fn: Callable, *args, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES,
                       donate_argnums: Sequence[int] = ()):
    """``(init_fn(*args), shardings)`` with the result created directly in its sharded layout.

    ``jax.eval_shape`` gives the result's shapes, :func:`shardings_for` its shardings, and
    ``jax.jit(init_fn, out_shardings=...)`` builds each device's slice on that device, so a model
    too big for one device is never materialised whole. ``init_fn`` returns a ``TrainState`` or a
    parameter tree; pass arrays it needs (already-loaded params, rng keys) as ``args``, not by
    closure (closed-over arrays would be embedded as constants).
    """
    with use_mesh(mesh, rules):
        abstract = jax.eval_shape(init_fn, *args)
        shardings = shardings_for(abstract, mesh, rules)
        state = jax.jit(init_fn, out_shardings=shardings, donate_argnums=tuple(donate_argnums))(*args)
    return state, shardings


# ---------------------------------------------------------------------------------------------
# Jitted, sharded steps.
# ---------------------------------------------------------------------------------------------


def _restructure(shardings, like):
    """``shardings`` re-wrapped in the pytree structure of ``like`` (same leaves in the same order).

    ``jax.jit`` compares in/out sharding trees with the argument's structure including static
    metadata, which ReMoRA changes at merges (MoRA's ``mora_type``)."""
    treedef = jax.tree_util.tree_structure(like)
    if jax.tree_util.tree_structure(shardings) == treedef:
        return shardings
    leaves = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    if len(leaves) != treedef.num_leaves:
        raise ValueError(
            f"the state has {treedef.num_leaves} arrays but its shardings have {len(leaves)}: the state's "
            "structure changed (other adapters or optimizer); rebuild them with state_shardings()"
        )
    return jax.tree_util.tree_unflatten(treedef, leaves)


class StateJit:
    """A jitted ``fn(state, *args, **static)`` bound to a mesh, logical-axis rules and state shardings.

    The compiled function is built once per state structure and static keyword values: the same
    sharding leaves serve a state whose MoRA adapters changed type at a ReMoRA merge. Calls and
    :meth:`lower` run inside :func:`use_mesh` and trace ``fn`` inside ``nn.logical_axis_rules``,
    so the model's activation constraints apply.
    """

    def __init__(self, fn: Callable, mesh: Mesh, state_shardings, rules: ShardingRules = DEFAULT_RULES, *,
                 args_shardings: tuple = (), out_shardings: Callable | None = None,
                 returns_new_structure: bool = False, donate_state: bool = False,
                 compiler_options: dict | None = None):
        """``out_shardings(state_shardings_of_output) -> out_shardings`` (default: the state's own);
        ``returns_new_structure``: the output state's structure may differ from the input's (merges);
        ``compiler_options``: XLA options for this function's compiles (see :mod:`mora_jax.xla_tuning`)."""
        self.fn = fn
        self.mesh = mesh
        self.rules = rules
        self.state_shardings = state_shardings
        self.args_shardings = tuple(args_shardings)
        self._out_shardings = out_shardings or (lambda state_sh: state_sh)
        self._returns_new_structure = returns_new_structure
        self._donate = (0,) if donate_state else ()
        self.compiler_options = compiler_options
        self._cache: dict = {}

    def _traced(self, static: dict):
        flax_rules = self.rules.flax_rules(self.mesh)

        def traced(state, *args):
            with nn.logical_axis_rules(flax_rules):
                return self.fn(state, *args, **static)

        return traced

    def jitted(self, state, *args, **static):
        """The ``jax.jit`` function for this state's structure (call it inside :func:`use_mesh`)."""
        key = (jax.tree_util.tree_structure(state), tuple(sorted(static.items())))
        if key not in self._cache:
            in_state_sh = _restructure(self.state_shardings, state)
            traced = self._traced(static)
            out_state_sh = in_state_sh
            if self._returns_new_structure:
                with use_mesh(self.mesh, self.rules):
                    out_abstract = jax.eval_shape(traced, state, *args)
                out_state_sh = _restructure(in_state_sh, out_abstract)
            self._cache[key] = jax.jit(
                traced,
                in_shardings=(in_state_sh, *self.args_shardings),
                out_shardings=self._out_shardings(out_state_sh),
                donate_argnums=self._donate,
                compiler_options=self.compiler_options,
            )
        return self._cache[key]

    def __call__(self, state, *args, **static):
        with use_mesh(self.mesh, self.rules):
            return self.jitted(state, *args, **static)(state, *args)

    def lower(self, state, *args, **static):
        """``jax.jit(...).lower`` for inspection: ``.compile().input_shardings`` etc."""
        with use_mesh(self.mesh, self.rules):
            return self.jitted(state, *args, **static).lower(state, *args)


def jit_train_step(model, tx, schedule: Callable, step_config: training.StepConfig, mesh: Mesh, state_shardings,
                   rules: ShardingRules = DEFAULT_RULES, *, use_dropout: bool = False, donate: bool = True) -> StateJit:
    """``step(state, batch) -> (state, metrics)``: :func:`mora_jax.training.train_step` jitted with the
    state in ``state_shardings`` (donated, updated in place), the batch split over the data axes
    and replicated metrics.

    Donation deletes the state passed in, and with it any array sharing its buffers: a state
    ``jax.device_put`` from one device to a replicated sharding reuses that device's buffer, so
    keep no other reference to it (or lay it out with :func:`place`, or pass ``donate=False``).
    """
    fn = functools.partial(training.train_step, model=model, tx=tx, schedule=schedule,
                           step_config=step_config, use_dropout=use_dropout)
    repl = replicated(mesh)
    return StateJit(fn, mesh, state_shardings, rules, args_shardings=(batch_sharding(mesh, rules),),
                    out_shardings=lambda state_sh: (state_sh, repl), donate_state=donate,
                    compiler_options=xla_tuning.train_step_compiler_options(xla_tuning.mesh_platform(mesh)))


def jit_eval_step(model, step_config: training.StepConfig, mesh: Mesh, state_shardings,
                  rules: ShardingRules = DEFAULT_RULES) -> StateJit:
    """``eval(state, batch) -> {'loss_sum', 'tokens'}`` (replicated): :func:`mora_jax.training.eval_step`."""
    fn = functools.partial(training.eval_step, model=model, step_config=step_config)
    repl = replicated(mesh)
    return StateJit(fn, mesh, state_shardings, rules, args_shardings=(batch_sharding(mesh, rules),),
                    out_shardings=lambda state_sh: repl)


def jit_merge_and_reset(tx, mesh: Mesh, state_shardings, rules: ShardingRules = DEFAULT_RULES, *,
                        reset_optimizer: bool = True, donate: bool = True) -> StateJit:
    """``merge(state, next_type=t) -> state``: :func:`mora_jax.remora.merge_and_reset` on the sharded,
    donated state; the merged kernels and fresh adapters keep the state's shardings."""
    fn = functools.partial(remora.merge_and_reset, tx=tx, reset_optimizer=reset_optimizer)
    return StateJit(fn, mesh, state_shardings, rules, returns_new_structure=True, donate_state=donate)


__all__ = [
    "DEFAULT_AXIS_NAMES",
    "DEFAULT_RULES",
    "LLAMA_PARAM_RULES",
    "LOGICAL_AXIS_RULES",
    "MeshConfig",
    "ShardingRules",
    "StateJit",
    "batch_axes",
    "batch_sharding",
    "follow_shardings",
    "init_sharded_state",
    "jit_eval_step",
    "jit_merge_and_reset",
    "jit_train_step",
    "make_mesh",
    "param_sharding_fn",
    "param_spec",
    "params_shardings",
    "place",
    "replicated",
    "shard_batch",
    "shardings_for",
    "spec_from_logical",
    "specs_of",
    "state_shardings",
    "tree_shardings",
    "tree_specs",
    "use_mesh",
]

"""LLaMA-style models and their training state sharded over a device mesh (one host or many).

Three layers of naming, as in MaxText / big_vision:

1. **Mesh axes** (:class:`MeshConfig`, :func:`make_mesh`): physical axes of the device mesh,
   by default ``('data', 'fsdp', 'tensor')``: pure data parallelism, data parallelism with
   parameters, gradients and optimizer moments sharded (ZeRO-3 / FSDP), and tensor (Megatron)
   parallelism inside the attention heads and the MLP.
2. **Logical axes**: names of array dimensions (``batch``, ``length``, ``embed``, ``heads``,
   ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``) mapped to mesh axes by
   :data:`LOGICAL_AXIS_RULES`. The LLaMA model annotates its activations with
   ``nn.with_logical_constraint``; the compiled steps (:mod:`mora_jax.steps`) run under these rules and the mesh, so
   those annotations become sharding constraints.
3. **Parameter rules** (:data:`LLAMA_PARAM_RULES`): regexes over ``'/'``-joined parameter paths
   (``re.fullmatch``, first match wins) giving the logical axis of each dimension, e.g.
   ``.*/q_proj/kernel -> ('embed', 'heads')``. Leading dimensions beyond the rule's (the layer
   axis of an ``nn.scan`` model) are not sharded; a dimension whose size is not divisible by its
   mesh axes falls back to fewer axes, down to replicated (logged at debug level). Parameters
   that no rule matches are replicated.

Adapters: MoRA's ``m`` (``r̂ × r̂``, or ``(L, r̂, r̂)`` when scanned) is small and replicated unless
a rule matches its path (``…/q_proj/kernel/m``); LoRA's (and DoRA's, HiRA's) ``a (k, r)`` / ``b (r, d)`` shard
``k`` / ``d`` like the adapted kernel's input / output dimension, DoRA's (and MoRA's optional) ``magnitude (d,)`` like ``d``. Optimizer-state leaves follow the trainable
leaf they belong to (matched by key-path suffix and shape); scalars (step counts, injected
hyperparameters) are replicated.

Typical use::

    mesh = make_mesh(MeshConfig(axis_sizes=(-1, 1, 4)))         # data × fsdp × tensor
    state_sh = state_shardings(jax.eval_shape(lambda: state), mesh)
    state = place(state, state_sh)                               # or init_sharded_state(...)

The compiled steps that use these shardings are built by :func:`mora_jax.steps.build_steps`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mora_jax import adapters as adapters_lib
from mora_jax.adapters import LoRAAdapter, MoRAAdapter, is_adapter
from mora_jax.dora import DoRAAdapter
from mora_jax.hira import HiRAAdapter
from mora_jax.mesh import mesh_context, put, replicated
from mora_jax.quant.formats import QuantizedKernel, is_quantized

logger = logging.getLogger(__name__)


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


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """Context in which ``mesh`` is the ambient mesh and ``rules`` are flax's logical-axis rules, so the
    model's ``nn.with_logical_constraint`` annotations shard activations. Trace (first call or
    ``.lower``) your own ``jax.jit`` functions inside it; :mod:`mora_jax.steps` does this for its steps."""
    with mesh_context(mesh), nn.logical_axis_rules(rules.flax_rules(mesh)):
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
        specs = {"m": param_spec(f"{path}/m", adapter.m.shape, mesh, rules)}
        if adapter.magnitude is not None:  # like the kernel's output dimension, as DoRA's
            kernel_axes = rules.param_logical_axes(path) or ()
            own = rules.param_logical_axes(f"{path}/magnitude")
            specs["magnitude"] = spec_from_logical(adapter.magnitude.shape, own if own is not None else
                                                   (kernel_axes[-1] if kernel_axes else None,), mesh, rules,
                                                   what=f"{path}/magnitude")
        return adapter.replace(**specs)
    if isinstance(adapter, (LoRAAdapter, DoRAAdapter, HiRAAdapter)):
        specs = {}
        kernel_axes = rules.param_logical_axes(path) or ()
        k_axis, d_axis = kernel_axes[-2:] if len(kernel_axes) >= 2 else (None, None)
        fields = [("a", (k_axis, None)), ("b", (None, d_axis))]
        if isinstance(adapter, DoRAAdapter):
            fields.append(("magnitude", (d_axis,)))
        for field, logical in fields:
            leaf = getattr(adapter, field)
            own = rules.param_logical_axes(f"{path}/{field}")  # an explicit rule wins
            specs[field] = spec_from_logical(leaf.shape, own if own is not None else logical, mesh, rules,
                                             what=f"{path}/{field}")
        return adapter.replace(**specs)
    raise TypeError(f"unknown adapter type {type(adapter).__name__} at {path}")


def _quantized_specs(path: str, leaf: QuantizedKernel, mesh: Mesh, rules: ShardingRules):
    """A quantized kernel (:mod:`mora_jax.quant`) follows its kernel's rule: the codes have the
    kernel's shape, the block scales (and Q4_1's minima) the same logical axes (a block dimension the
    mesh does not divide stays replicated); merges kept beside the codes follow the adapters' rules."""
    logical = rules.param_logical_axes(path)
    spec = lambda x: None if x is None else (  # noqa: E731
        PartitionSpec(*([None] * len(x.shape))) if logical is None
        else spec_from_logical(x.shape, logical, mesh, rules, what=path))
    kept = leaf.residual
    if kept is not None:  # merges kept beside the codes: sharded as live adapters of this kernel would be
        kept = kept.replace(
            mora=tuple(_adapter_specs(path, a, mesh, rules) for a in kept.mora),
            lora=None if kept.lora is None else _adapter_specs(path, kept.lora, mesh, rules),
            count=None if kept.count is None else PartitionSpec(*([None] * kept.count.ndim)))
    return leaf.replace(q=leaf.q.replace(qvalue=spec(leaf.q.qvalue), scale=spec(leaf.q.scale)),
                        offset=spec(leaf.offset), residual=kept)


def _is_node(x) -> bool:
    return is_adapter(x) or is_quantized(x)


def tree_specs(tree, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """PartitionSpecs for a parameter tree (arrays or ShapeDtypeStructs; may hold adapter nodes and
    quantized kernels)."""
    def spec(key_path, leaf):
        path = "/".join(_path_names(key_path))
        if is_adapter(leaf):
            return _adapter_specs(path, leaf, mesh, rules)
        if is_quantized(leaf):
            return _quantized_specs(path, leaf, mesh, rules)
        return param_spec(path, np.shape(leaf), mesh, rules)

    return jax.tree_util.tree_map_with_path(spec, tree, is_leaf=_is_node)


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


def follow_shardings(tree, reference, reference_shardings, mesh: Mesh, *, zero_axis: str | None = None):
    """Shardings for ``tree`` (e.g. an optax state) whose leaves mirror leaves of ``reference``.

    A leaf of ``tree`` gets the sharding of the ``reference`` leaf whose key path is the longest
    suffix of its own and whose shape is the same (``mu/model/.../kernel`` follows
    ``model/.../kernel``); every other leaf (step counts, hyperparameters, factored statistics) is
    replicated. With ``zero_axis``, a leaf whose reference is replicated (MoRA's ``m``, whose ``r̂``
    rarely divides the mesh) is sharded over that mesh axis along its first dimension it divides
    (ZeRO-1: the update is computed on each shard and gathered into the replicated parameter).
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
                return _zero_sharded(shape, hit[1], mesh, zero_axis) if zero_axis else hit[1]
        if shape:
            logger.debug("state leaf %s %s follows no parameter; replicating it", "/".join(names), shape)
        return repl

    return jax.tree_util.tree_map_with_path(follow, tree)


def _zero_sharded(shape, sharding: NamedSharding, mesh: Mesh, axis: str) -> NamedSharding:
    size = mesh.shape.get(axis, 1)
    if size == 1 or len(shape) < 2 or any(entry is not None for entry in sharding.spec):
        return sharding
    for dim, n in enumerate(shape):
        if n % size == 0:
            return NamedSharding(mesh, PartitionSpec(*(axis if d == dim else None for d in range(len(shape)))))
    return sharding


def state_shardings(abstract_state, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """A :class:`~mora_jax.training.TrainState` of ``NamedSharding``s for ``abstract_state``
    (``jax.eval_shape`` of the state's constructor, or a concrete state).

    ``frozen`` and ``trainables`` follow the parameter rules (each group on its own paths, so
    rules anchored at ``model/...`` work); optimizer state follows the trainables, except that the
    moments of a replicated trainable are sharded over ``fsdp`` (:func:`follow_shardings`); the step
    counter and rng key are replicated.
    """
    trainables = {name: tree_shardings(tree, mesh, rules) for name, tree in abstract_state.trainables.items()}
    opt_state = abstract_state.opt_state
    if isinstance(opt_state, Mapping) and set(opt_state) == set(trainables):  # one optimizer state per group
        opt_state = {name: follow_shardings(opt_state[name], abstract_state.trainables[name], trainables[name], mesh,
                                            zero_axis="fsdp") for name in opt_state}
    else:  # one optimizer over all trainables
        opt_state = follow_shardings(opt_state, abstract_state.trainables, trainables, mesh, zero_axis="fsdp")
    return abstract_state.replace(
        step=replicated(mesh),
        frozen=tree_shardings(abstract_state.frozen, mesh, rules),
        trainables=trainables,
        opt_state=opt_state,
        rng=replicated(mesh),
    )


def _is_train_state(tree) -> bool:
    return all(hasattr(tree, name) for name in ("step", "frozen", "trainables", "opt_state", "rng"))


def shardings_for(abstract_tree, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """:func:`state_shardings` for a ``TrainState``, :func:`tree_shardings` for anything else."""
    if _is_train_state(abstract_tree):
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
    def copy_to(x, sharding):
        return put(x.copy() if isinstance(x, jax.Array) else x, sharding)

    return jax.tree_util.tree_map(copy_to, tree, shardings)


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


__all__ = [
    "DEFAULT_RULES",
    "LLAMA_PARAM_RULES",
    "LOGICAL_AXIS_RULES",
    "ShardingRules",
    "batch_axes",
    "batch_sharding",
    "follow_shardings",
    "init_sharded_state",
    "param_sharding_fn",
    "param_spec",
    "params_shardings",
    "place",
    "shard_batch",
    "shardings_for",
    "spec_from_logical",
    "specs_of",
    "state_shardings",
    "tree_shardings",
    "tree_specs",
    "use_mesh",
]

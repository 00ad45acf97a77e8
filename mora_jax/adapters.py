"""Adapters as transforms of a Flax model's parameter pytree.

The adapter pytree is separate from the base parameters and mirrors only the targeted kernels:
``adapters['model']['layers_0']['self_attn']['q_proj']['kernel']`` is a :class:`MoRAAdapter` (or
:class:`LoRAAdapter`) whose only array leaves are the trainable matrices; the sizes and operator
type are static pytree metadata, so an adapter tree is self-describing and ``jax.jit`` specialises
on it. Kernels with a leading layer axis (``nn.scan``) get adapters with the same leading axis.

Functions here are pure: ``init_adapters``, ``merge``, ``unmerge``, ``split``, ``combine``.
Running a model with adapters in effect is :func:`mora_jax.apply_model` (``intercept.py``).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mora_jax import dora, hira, ops
from mora_jax.dora import DoRAAdapter
from mora_jax.errors import ConfigError
from mora_jax.hira import HiRAAdapter
from mora_jax.intercept import record_dense_calls
from mora_jax.quant.formats import as_float, is_quantized, store_like
from mora_jax.methods import AdapterConfig, DoRAConfig, FullConfig, HiRAConfig, LoRAConfig, MoRAConfig, PiSSAConfig

Path = tuple[str, ...]


# ---------------------------------------------------------------------------------------------
# Adapter nodes (one per adapted kernel).
# ---------------------------------------------------------------------------------------------


@flax.struct.dataclass
class MoRAAdapter:
    """MoRA on one kernel: ``m`` is ``(*stack, r̂, r̂)`` in kernel layout (``z @ m``), float32.

    ``magnitude`` (``(*stack, d)`` float32, or None): a DoRA-style magnitude on top of MoRA
    (``MoRAConfig(magnitude=True)``): the adapted kernel is ``(mag/n) ⊙ (K + ΔK)`` column-wise with
    ``n = ‖K + ΔK‖_c`` detached in the backward pass, as DoRA's (``docs/methods.md``)."""

    m: jax.Array
    in_features: int = flax.struct.field(pytree_node=False)
    out_features: int = flax.struct.field(pytree_node=False)
    mora_type: int = flax.struct.field(pytree_node=False)
    r: int = flax.struct.field(pytree_node=False)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)
    magnitude: jax.Array | None = None

    @property
    def r_hat(self) -> int:
        return int(self.m.shape[-1])

    @property
    def uses_kernel(self) -> bool:
        """With a magnitude the interceptor hands the layer's kernel to :meth:`dense_output`."""
        return self.magnitude is not None

    @property
    def merge_needs_norms(self) -> bool:
        """With a magnitude, undoing a merge needs the column norm at merge time (:func:`merge_with_norms`)."""
        return self.magnitude is not None

    def weight_norm(self, kernel_KxD):
        """``‖K + ΔK‖_c`` (float32, ``(d,)``, single layer), without gradient (detached as in DoRA);
        ``ΔK`` is built once (``O(k·d)``, no matmul: MoRA's operators are copies and sums)."""
        w = ops.merge_into(kernel_KxD.astype(jnp.float32), self.m, in_features=self.in_features,
                           out_features=self.out_features, mora_type=self.mora_type)
        return jax.lax.stop_gradient(jnp.sqrt(jnp.sum(w * w, axis=0)))

    def dense_output(self, x_BxK, kernel_KxD, *, base_fn, bias_D, dropout_fn, dtype, precision=None):
        """The layer's output with the magnitude (single layer): ``x·K + (mag/n − 1) ⊙ (x·K) + (mag/n) ⊙ Δy``."""
        return dora.rescaled_output(
            x_BxK, kernel_KxD, norm_D=self.weight_norm(kernel_KxD), magnitude_D=self.magnitude, delta_fn=self.delta,
            base_fn=base_fn, bias_D=bias_D, dropout_fn=dropout_fn, dtype=dtype, precision=precision)

    def merged_kernel(self, kernel_KxD):
        """``(mag/n)·(K + ΔK)`` and ``n`` (float32), for kernels ``(*stack, k, d)`` (magnitude set)."""
        def one(k, m, mag):
            w = ops.merge_into(k.astype(jnp.float32), m, in_features=self.in_features,
                               out_features=self.out_features, mora_type=self.mora_type)
            n = jnp.sqrt(jnp.sum(w * w, axis=0))
            return w * (mag / n)[None, :], n

        return _stacked(one, self.m.ndim - 2)(kernel_KxD, self.m, self.magnitude.astype(jnp.float32))

    def unmerge_kernel(self, merged_KxD, norms):
        """``K = K'·(n/mag) − ΔK`` for the norms ``n`` that :meth:`merged_kernel` returned."""
        def one(k, m, mag, n):
            return ops.merge_into(k.astype(jnp.float32) * (n / mag)[None, :], m, in_features=self.in_features,
                                  out_features=self.out_features, mora_type=self.mora_type, sign=-1.0)

        out = _stacked(one, self.m.ndim - 2)(merged_KxD, self.m, self.magnitude.astype(jnp.float32), norms)
        return out.astype(merged_KxD.dtype)

    def delta(self, x_BxK):
        """``Δy`` for inputs ``(..., in_features)`` (single layer: no stack axis)."""
        return ops.apply_mora(
            x_BxK, self.m, in_features=self.in_features, out_features=self.out_features, mora_type=self.mora_type
        )

    def delta_weight(self):
        """``ΔK`` as ``(*stack, in_features, out_features)`` float32."""
        fn = lambda m: ops.delta_weight(
            m, in_features=self.in_features, out_features=self.out_features, mora_type=self.mora_type
        )
        for _ in range(self.m.ndim - 2):
            fn = jax.vmap(fn)
        return fn(self.m)

    def add_to(self, kernel, sign: float = 1.0):
        """``kernel + sign·ΔK`` for a kernel ``(*stack, in_features, out_features)`` (type 6 rewrites
        only the blocks its ``ΔK`` touches, see :func:`mora_jax.ops.merge_into`). With a magnitude the
        merged kernel ``(mag/n)·(K + ΔK)``; its unmerge needs :func:`unmerge_with_norms`."""
        if self.magnitude is not None:
            if sign != 1.0:
                raise ValueError("a MoRA merge with a magnitude cannot be undone from the merged kernel and the adapter "
                                 "alone (the column norm at merge time is lost): use mora_jax.adapters.merge_with_norms "
                                 "and unmerge_with_norms")
            return self.merged_kernel(kernel)[0].astype(kernel.dtype)
        fn = lambda k, m: ops.merge_into(
            k, m, in_features=self.in_features, out_features=self.out_features, mora_type=self.mora_type, sign=sign
        )
        for _ in range(self.m.ndim - 2):
            fn = jax.vmap(fn)
        return fn(kernel, self.m)


@flax.struct.dataclass
class LoRAAdapter:
    """LoRA on one kernel: ``a (*stack, k, r)``, ``b (*stack, r, d)``, ``Δy = scale·(x @ a) @ b``."""

    a: jax.Array
    b: jax.Array
    in_features: int = flax.struct.field(pytree_node=False)
    out_features: int = flax.struct.field(pytree_node=False)
    alpha: float = flax.struct.field(pytree_node=False)
    rslora: bool = flax.struct.field(pytree_node=False, default=False)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def r(self) -> int:
        return int(self.a.shape[-1])

    @property
    def scale(self) -> float:
        return ops.lora_scale(self.r, self.alpha, self.rslora)

    def delta(self, x_BxK):
        return ops.apply_lora(x_BxK, self.a, self.b, scale=self.scale)

    def delta_weight(self):
        return self.scale * jnp.matmul(self.a.astype(jnp.float32), self.b.astype(jnp.float32))

    def add_to(self, kernel, sign: float = 1.0):
        """``kernel + sign·ΔK`` (float32 accumulate, ``kernel``'s dtype out)."""
        return (kernel.astype(jnp.float32) + sign * self.delta_weight()).astype(kernel.dtype)


def _stacked(fn, n_stack: int):
    for _ in range(n_stack):
        fn = jax.vmap(fn)
    return fn


Adapter = MoRAAdapter | LoRAAdapter | DoRAAdapter | HiRAAdapter
ADAPTER_TYPES = (MoRAAdapter, LoRAAdapter, DoRAAdapter, HiRAAdapter)


def is_adapter(x) -> bool:
    return isinstance(x, ADAPTER_TYPES)


def _is_mora(x) -> bool:
    return isinstance(x, MoRAAdapter)


def mora_types(tree) -> set[int]:
    """The MoRA operator types of every :class:`MoRAAdapter` node anywhere in ``tree`` (an adapter
    tree, a train state, an optimizer state; abstract or not)."""
    nodes = jax.tree_util.tree_leaves(tree, is_leaf=_is_mora)
    return {node.mora_type for node in nodes if _is_mora(node)}


def current_mora_type(tree) -> int | None:
    """The MoRA type in use in ``tree`` (ReMoRA changes it at each merge); None when ``tree`` holds
    no MoRA adapter. Adapters of several types at once are an error."""
    types = mora_types(tree)
    if len(types) > 1:
        raise ValueError(f"the MoRA adapters have several types {sorted(types)}; expected one")
    return next(iter(types), None)


# ---------------------------------------------------------------------------------------------
# Paths.
# ---------------------------------------------------------------------------------------------


def path_str(path: Path) -> str:
    return "/".join(str(p) for p in path)


def flatten(tree: Mapping) -> dict[Path, Any]:
    """Nested dicts → ``{path tuple: leaf}``; adapter nodes count as leaves."""
    if hasattr(tree, "unfreeze"):  # flax FrozenDict
        tree = tree.unfreeze()
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def unflatten(flat: Mapping[Path, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat)) if flat else {}


def _select(paths, patterns: tuple[str, ...], what: str, *, allow_empty: bool = False) -> list[Path]:
    names = {path_str(p): p for p in paths}
    selected = []
    for pattern in patterns:
        hits = [p for name, p in names.items() if re.fullmatch(pattern, name)]
        if not hits and not allow_empty:
            shown = sorted(names)
            listing = ", ".join(shown[:12]) + (f", ... ({len(shown)} in all)" if len(shown) > 12 else "")
            raise ConfigError(
                f"{what} pattern {pattern!r} matches no parameter of the model: patterns are regular expressions "
                f"matched whole (re.fullmatch) against '/'-joined parameter paths; fix the pattern (the "
                f"parameters are: {listing})"
            )
        selected += hits
    return sorted(set(selected), key=path_str)


# ---------------------------------------------------------------------------------------------
# Layout: which axes of a kernel are the layer stack, the inputs and the outputs.
# ---------------------------------------------------------------------------------------------


def _split_shape(path: Path, shape, layout) -> tuple[tuple, int, int]:
    """``(stack_shape, in_features, out_features)`` for a targeted kernel."""
    if len(shape) < 2:
        raise ValueError(
            f"target {path_str(path)!r} has shape {tuple(shape)}: only kernels with >= 2 dims can be "
            "adapted; narrow the targets pattern (e.g. end it with '/kernel')"
        )
    n_stack, n_in = (layout or {}).get(path_str(path), (0, 1))
    if n_stack + n_in >= len(shape):
        raise ValueError(f"layout {n_stack, n_in} for {path_str(path)!r} leaves no output axis in shape {shape}")
    stack = tuple(shape[:n_stack])
    k = math.prod(shape[n_stack : n_stack + n_in])
    d = math.prod(shape[n_stack + n_in :])
    return stack, k, d


def dense_layout(model, *args, **kwargs) -> dict[str, tuple[int, int]]:
    """Trace ``model.init(*args, **kwargs)`` abstractly and record, for each Dense/DenseGeneral kernel,
    ``(number of leading stacked axes, number of input axes)``.

    Needed by :func:`init_adapters` only for kernels that are not plain 2-D ``(in, out)``: layers
    under ``nn.scan`` (a leading layer axis) or ``DenseGeneral`` with several input axes.
    """
    with record_dense_calls() as calls:
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    flat = flatten(variables["params"])
    layout = {}
    for module_path, (kernel_ndim, n_in) in calls.items():
        path = (*module_path, "kernel")
        if path in flat:
            layout[path_str(path)] = (flat[path].ndim - kernel_ndim, n_in)
    return layout


# ---------------------------------------------------------------------------------------------
# Init, merge, unmerge.
# ---------------------------------------------------------------------------------------------


def init_adapters(params, config: AdapterConfig, rng: jax.Array, *, layout=None) -> dict:
    """A new adapter pytree for the kernels that ``config.targets`` selects.

    MoRA ``m`` starts at zero; LoRA ``a`` is kaiming-uniform (PyTorch's ``a=√5`` on the ``(r, k)``
    matrix, i.e. ``U(-1/√k, 1/√k)``) and ``b`` zero; DoRA as LoRA plus ``magnitude = ‖K‖_c``
    (:mod:`mora_jax.dora`); HiRA as LoRA without a scale (:mod:`mora_jax.hira`); all float32.
    ``FullConfig`` has no adapters and returns ``{}``. ``layout`` (from :func:`dense_layout`) is needed only for stacked or
    multi-input-axis kernels.
    """
    if isinstance(config, PiSSAConfig):
        raise TypeError("PiSSA also rewrites the base weights (K -> K - s·A0·B0): use "
                        "params, adapters = mora_jax.pissa.init(params, config, rng, layout=...)")
    flat = flatten(params)
    paths = _select(flat, config.targets, "targets")
    if isinstance(config, FullConfig):
        return {}
    out = {}
    for i, path in enumerate(paths):
        stack, k, d = _split_shape(path, flat[path].shape, layout)
        if isinstance(config, MoRAConfig):
            r_hat = ops.rank_hat(k, d, config.r, config.mora_type)
            magnitude = dora.column_norms(as_float(flat[path]).reshape(*stack, k, d)) if config.magnitude else None
            out[path] = MoRAAdapter(
                m=jnp.zeros((*stack, r_hat, r_hat), jnp.float32),
                in_features=k, out_features=d, mora_type=config.mora_type, r=config.r, dropout=config.dropout,
                magnitude=magnitude,
            )
        elif isinstance(config, LoRAConfig):
            bound = 1.0 / math.sqrt(k)
            a = jax.random.uniform(jax.random.fold_in(rng, i), (*stack, k, config.r), jnp.float32, -bound, bound)
            out[path] = LoRAAdapter(
                a=a, b=jnp.zeros((*stack, config.r, d), jnp.float32), in_features=k, out_features=d,
                alpha=float(config.alpha), rslora=bool(config.rslora), dropout=config.dropout,
            )
        elif isinstance(config, DoRAConfig):
            out[path] = dora.init_adapter(as_float(flat[path]), stack, k, d, config, jax.random.fold_in(rng, i))
        elif isinstance(config, HiRAConfig):
            out[path] = hira.init_adapter(stack, k, d, config, jax.random.fold_in(rng, i))
        else:
            raise TypeError(f"config must be one of the mora_jax.methods configs, got {type(config).__name__}")
    return unflatten(out)


def _check_fits(path: Path, kernel, adapter) -> tuple:
    stack_ndim = _adapter_stack_ndim(adapter)
    stack = tuple(kernel.shape[:stack_ndim])
    kd = kernel.shape[stack_ndim:]
    k_times_d = math.prod(kd) if kd else 0
    adapter_stack = _adapter_stack_shape(adapter)
    if adapter_stack != stack or k_times_d != adapter.in_features * adapter.out_features:
        raise ValueError(
            f"adapter for {path_str(path)!r} does not fit the kernel: adapter is "
            f"{adapter.in_features}x{adapter.out_features} (stack {adapter_stack}) but the kernel has shape "
            f"{tuple(kernel.shape)}; were the adapters built for other params (another model size, or "
            "scan_layers on/off)? Re-create them with init_adapters(params, ...)"
        )
    return stack


def _adapter_stack_ndim(adapter) -> int:
    return (adapter.m.ndim if isinstance(adapter, MoRAAdapter) else adapter.a.ndim) - 2


def _adapter_stack_shape(adapter) -> tuple:
    leaf = adapter.m if isinstance(adapter, MoRAAdapter) else adapter.a
    return tuple(leaf.shape[:-2])


def _merge(params, adapters, sign: float):
    flat_params = flatten(params)
    flat_adapters = flatten(adapters)
    for path, adapter in flat_adapters.items():
        if not is_adapter(adapter):
            raise TypeError(f"{path_str(path)!r} in the adapter tree is {type(adapter).__name__}, not an adapter")
        if path not in flat_params:
            raise ValueError(
                f"adapter path {path_str(path)!r} is not in params; the adapters were built for another model"
            )
        stored = flat_params[path]  # a quantized kernel is re-quantized after the merge (docs/quantization.md)
        if is_quantized(stored) and stored.residual is not None and keeps_merges_beside_codes(adapter):
            _check_fits(path, stored, adapter)  # merges kept exactly beside the codes (mora_jax.quant.residual)
            flat_params[path] = stored.replace(residual=stored.residual.absorb(adapter, sign))
            continue
        kernel = as_float(stored)
        stack = _check_fits(path, kernel, adapter)
        kernel_KxD = kernel.reshape(*stack, adapter.in_features, adapter.out_features)
        flat_params[path] = store_like(stored, adapter.add_to(kernel_KxD, sign).reshape(kernel.shape))
    return unflatten(flat_params)


def keeps_merges_beside_codes(adapter) -> bool:
    """Whether ``adapter``'s merges into a quantized kernel can be kept exactly beside its codes
    (:mod:`mora_jax.quant.residual`): LoRA and MoRA without a magnitude, whose ``ΔK`` is linear in
    their parameters."""
    return type(adapter) is LoRAAdapter or (type(adapter) is MoRAAdapter and adapter.magnitude is None)


def _needs_norms(adapter) -> bool:
    return bool(getattr(adapter, "merge_needs_norms", False))


def merge_with_norms(params, adapters):
    """:func:`merge` plus what :func:`unmerge_with_norms` needs to undo it exactly: for each DoRA
    adapter (and MoRA adapter with a magnitude) the column norm ``‖K + ΔK‖_c`` at merge time (a tree
    like ``adapters``; None for the other adapters, whose merge :func:`unmerge` undoes alone)."""
    flat_params, flat_adapters = flatten(params), flatten(adapters)
    norms = {}
    for path, adapter in flat_adapters.items():
        if _needs_norms(adapter):
            stored = flat_params[path]
            kernel = as_float(stored)
            stack = _check_fits(path, kernel, adapter)
            merged, norms[path] = adapter.merged_kernel(kernel.reshape(*stack, adapter.in_features,
                                                                       adapter.out_features))
            flat_params[path] = store_like(stored, merged.reshape(kernel.shape))
        else:
            norms[path] = None
    others = {p: a for p, a in flat_adapters.items() if not _needs_norms(a)}
    return merge(unflatten(flat_params), unflatten(others)), unflatten(norms)


def unmerge_with_norms(params, adapters, norms):
    """The inverse of :func:`merge_with_norms` (``norms`` is its second output)."""
    flat_params, flat_adapters, flat_norms = flatten(params), flatten(adapters), flatten(norms)
    for path, adapter in flat_adapters.items():
        if _needs_norms(adapter):
            stored = flat_params[path]
            kernel = as_float(stored)
            stack = _check_fits(path, kernel, adapter)
            kernel_KxD = kernel.reshape(*stack, adapter.in_features, adapter.out_features)
            flat_params[path] = store_like(stored, adapter.unmerge_kernel(kernel_KxD, flat_norms[path]).reshape(kernel.shape))
    others = {p: a for p, a in flat_adapters.items() if not _needs_norms(a)}
    return unmerge(unflatten(flat_params), unflatten(others))


def merge(params, adapters):
    """Params with every adapter folded in, ``K ← K + ΔK`` (float32 accumulate, cast back to ``K``'s dtype).

    Pure and jit-able; use ``jax.jit(merge, donate_argnums=0)`` to update sharded weights in place.
    """
    return _merge(params, adapters, +1.0)


def unmerge(params, adapters):
    """The inverse of :func:`merge`: ``K ← K − ΔK`` (HiRA: ``K ← K / (1 + A·B)``; DoRA: use
    :func:`unmerge_with_norms`)."""
    return _merge(params, adapters, -1.0)


# ---------------------------------------------------------------------------------------------
# Split / combine: trainable versus frozen base parameters.
# ---------------------------------------------------------------------------------------------


def trainable_patterns(config: AdapterConfig) -> tuple[str, ...]:
    """Regexes of the base parameters trained in full under ``config``."""
    full = config.targets if isinstance(config, FullConfig) else ()
    return tuple(full) + tuple(config.unfreeze)


def split(params, patterns, *, allow_empty: bool = False) -> tuple[dict, dict]:
    """Split ``params`` into ``(selected, rest)`` sparse trees by regexes over paths (``re.fullmatch``).

    Each output keeps only its own leaves, so the selected tree can be differentiated and given to
    an optimizer without touching the rest. ``combine(selected, rest)`` rebuilds ``params``.
    A pattern that matches nothing is an error unless ``allow_empty``.
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    flat = flatten(params)
    chosen = set(_select(flat, tuple(patterns), "unfreeze", allow_empty=allow_empty))
    selected = {p: v for p, v in flat.items() if p in chosen}
    rest = {p: v for p, v in flat.items() if p not in chosen}
    return unflatten(selected), unflatten(rest)


def combine(*trees) -> dict:
    """Merge sparse trees with disjoint leaves (the inverse of :func:`split`)."""
    out: dict[Path, Any] = {}
    for tree in trees:
        for path, leaf in flatten(tree).items():
            if path in out:
                raise ValueError(f"combine: {path_str(path)!r} appears in more than one tree")
            out[path] = leaf
    return unflatten(out)


def count_params(tree) -> int:
    """Scalars in ``tree``; a quantized kernel counts as its weights (not its scales)."""
    return int(sum(np.prod(x.shape if is_quantized(x) else np.shape(x))
                   for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized)))


def summary(params, adapters, config: AdapterConfig) -> str:
    """One line: trainable versus total parameters."""
    trainable, _ = split(params, trainable_patterns(config), allow_empty=True)
    n_train = count_params(adapters) + count_params(trainable)
    n_total = count_params(params) + count_params(adapters)
    return (
        f"{config.method}: trainable {n_train:,} / total {n_total:,} parameters "
        f"({100.0 * n_train / max(n_total, 1):.3f}%), {len(flatten(adapters))} adapted kernels"
    )

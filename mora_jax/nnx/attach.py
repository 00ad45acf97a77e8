"""Attaching adapters to an nnx model: select layers by regex, add the variables, mark what trains.

:func:`attach` is the one line a Tunix (or any nnx) user adds: it walks the model's graph
(``nnx.iter_graph``), matches each supported layer's kernel path (``'/'``-joined, e.g.
``layers/0/attn/q_proj/kernel``) against the config's ``targets`` with ``re.fullmatch`` (the same
configs and patterns as the linen path), and adapts the matches in place (see ``layers.py``). New
variables follow the kernel's placement: ``M`` is replicated on the kernel's mesh (``r̂ × r̂`` is
small) and LoRA's ``a`` / ``b`` take the kernel's sharding of their ``in`` / ``out`` axes, both as the
actual array sharding and as ``out_sharding`` metadata (so ``nnx.get_partition_spec`` and
``nnx.jit`` see it).

``FullConfig`` targets and every config's ``unfreeze`` patterns re-type the matched base
parameters to :class:`TrainedParam` (a ``LoRAParam``) so that ``wrt=nnx.LoRAParam`` trains them.
"""

from __future__ import annotations

import math
import re
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mora_jax import ops
from mora_jax import dora, pissa
from mora_jax.methods import AdapterConfig, DoRAConfig, FullConfig, HiRAConfig, LoRAConfig, MoRAConfig, PiSSAConfig
from mora_jax.nnx import layers as layers_lib
from mora_jax.nnx.layers import DROPOUT_ATTR, NORM_ATTR, SPEC_ATTR, AdapterSpec
from mora_jax.nnx.variables import MoRAParam, TrainedParam
from mora_jax.quant.formats import as_float, is_quantized

Path = tuple  # of str | int


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


# ---------------------------------------------------------------------------------------------
# Walking the graph.
# ---------------------------------------------------------------------------------------------


def iter_modules(model) -> Iterator[tuple[Path, nnx.Module]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            yield tuple(path), node


def iter_params(model) -> Iterator[tuple[Path, nnx.Variable]]:
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Param):
            yield tuple(path), node


def adapted_layers(model) -> dict[Path, nnx.Module]:
    """``{module path: layer}`` of every layer carrying an adapter, sorted by path string."""
    found = {path: m for path, m in iter_modules(model) if layers_lib.is_adapted(m)}
    return dict(sorted(found.items(), key=lambda kv: path_str(kv[0])))


def adaptable_layers(model) -> dict[Path, nnx.Module]:
    """``{module path: layer}`` of every layer an adapter can attach to (adapted or not)."""
    found = {path: m for path, m in iter_modules(model) if layers_lib.kind_of(m) is not None}
    return dict(sorted(found.items(), key=lambda kv: path_str(kv[0])))


def _node_at(root, path: Path):
    node = root
    for key in path:
        node = node[key] if isinstance(key, int) or not hasattr(node, str(key)) else getattr(node, key)
    return node


def _set_child(parent, key, value) -> None:
    if isinstance(key, str) and hasattr(parent, key) and not isinstance(parent, dict):
        setattr(parent, key, value)
    else:
        parent[key] = value


def _retype(model, variable: nnx.Variable, new_type: type) -> nnx.Variable:
    """Replace every reference to ``variable`` by a ``new_type`` variable with the same value and metadata."""
    new = new_type.from_metadata(variable.get_raw_value(), variable.get_metadata())
    while True:
        path = next((tuple(p) for p, node in nnx.iter_graph(model) if node is variable), None)
        if path is None:
            return new
        _set_child(_node_at(model, path[:-1]), path[-1], new)


# ---------------------------------------------------------------------------------------------
# Selection.
# ---------------------------------------------------------------------------------------------


def _listing(names) -> str:
    shown = sorted(names)
    listing = "\n  ".join(shown[:40])
    return listing + (f"\n  ... and {len(shown) - 40} more" if len(shown) > 40 else "")


def _select_params(model, patterns, what: str, *, allow_empty: bool = False) -> dict[str, tuple[Path, nnx.Variable]]:
    params = {path_str(p): (p, v) for p, v in iter_params(model)}
    selected = {}
    for pattern in patterns:
        hits = {name: pv for name, pv in params.items() if re.fullmatch(pattern, name)}
        if not hits and not allow_empty:
            raise ValueError(
                f"{what} pattern {pattern!r} matches no parameter (patterns use re.fullmatch over '/'-joined "
                f"paths). The parameters are:\n  {_listing(params)}"
            )
        selected.update(hits)
    return dict(sorted(selected.items()))


def _select_kernels(model, patterns) -> dict[str, tuple[Path, nnx.Module]]:
    """``{kernel path: (module path, layer)}`` for the supported layers whose kernel a pattern matches."""
    candidates = {}
    for path, layer in adaptable_layers(model).items():
        candidates[path_str((*path, layers_lib.kind_of(layer).kernel))] = (path, layer)
    params = {path_str(p) for p, _ in iter_params(model)}
    selected = {}
    for pattern in patterns:
        hits = {name: v for name, v in candidates.items() if re.fullmatch(pattern, name)}
        stray = sorted(name for name in params if re.fullmatch(pattern, name) and name not in candidates)
        if stray:
            raise ValueError(
                f"targets pattern {pattern!r} matches {stray[:10]}, which are not the kernel of a layer adapters can "
                f"attach to ({', '.join(layers_lib.supported_layer_names())}; add einsum-style layers with "
                "mora_jax.nnx.register_einsum_layer). Narrow the pattern, e.g. end it with '_proj/kernel'"
            )
        if not hits:
            raise ValueError(
                f"targets pattern {pattern!r} matches no adaptable kernel (patterns use re.fullmatch over '/'-joined "
                f"paths such as 'layers/0/attn/q_proj/kernel'). The adaptable kernels are:\n  {_listing(candidates)}"
            )
        selected.update(hits)
    return dict(sorted(selected.items()))


# ---------------------------------------------------------------------------------------------
# New adapter variables, placed like their kernel.
# ---------------------------------------------------------------------------------------------


def _kernel_spec(kernel: nnx.Variable, ndim: int) -> tuple | None:
    value = kernel.get_value()
    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, NamedSharding) and not isinstance(value, jax.core.Tracer):
        spec = tuple(sharding.spec)
        return sharding.mesh, spec + (None,) * (ndim - len(spec))
    return None


def _new_variable(var_type, value, kernel: nnx.Variable, axes: tuple, ndim: int):
    """A ``var_type`` variable whose axis ``i`` is sharded like kernel axis ``axes[i]`` (None: replicated)."""
    metadata = {}
    annotation = kernel.get_metadata().get("out_sharding")
    if annotation:
        annotation = tuple(annotation) + (None,) * (ndim - len(annotation))
        metadata["out_sharding"] = tuple(None if a is None else annotation[a] for a in axes)
        for key in ("mesh", "sharding_rules"):
            if kernel.has_metadata(key):
                metadata[key] = kernel.get_metadata(key)
    placed = _kernel_spec(kernel, ndim)
    if placed is not None:
        mesh, spec = placed
        partition = PartitionSpec(*(None if a is None else spec[a] for a in axes))
        value = jax.device_put(value, NamedSharding(mesh, partition))
    return var_type(value, eager_sharding=False, **metadata)


def _plan_adapter(layer, config, rng, rngs):
    """``(spec, variables, dropout module or None, new kernel value or None)`` for one layer, validated; the
    layer is not touched (PiSSA's new kernel, the SVD residual, is installed by :func:`_install`)."""
    kind = layers_lib.kind_of(layer)
    if layers_lib.is_adapted(layer):
        raise ValueError(
            f"{type(layer).__name__} already carries an adapter; call mora_jax.nnx.merge_and_unload(model) (or "
            "load a fresh model) before attaching another"
        )
    kernel = getattr(layer, kind.kernel)
    shape = tuple(kernel.shape)
    stack, in_axes, out_axes = layers_lib.kernel_layout(layer)
    n = len(stack)  # leading axes of layers stacked with nnx.vmap: the adapter is stacked the same way
    in_shape = tuple(shape[i] for i in in_axes)
    out_shape = tuple(shape[i] for i in out_axes)
    k, d = math.prod(in_shape), math.prod(out_shape)
    common = dict(kernel=kind.kernel, in_shape=in_shape, out_shape=out_shape,
                  perm=tuple(a - n for a in in_axes + out_axes), r=config.r, dropout=float(config.dropout),
                  stack_shape=stack)
    if config.dropout > 0.0 and rngs is None:
        raise ValueError(
            f"{config.method} dropout={config.dropout} needs random streams: pass rngs=nnx.Rngs(dropout=...) to "
            "attach (model.eval() / nnx.view(model, deterministic=True) turns it off)"
        )
    if config.dropout > 0.0 and n:
        raise ValueError(
            f"{type(layer).__name__} is stacked over {stack} (made by nnx.vmap): adapter dropout there would need "
            "random streams split per layer, which attach does not make; use dropout=0.0 for stacked layers"
        )
    stacked = tuple(range(n))
    new_kernel = None
    if isinstance(config, PiSSAConfig):
        if is_quantized(kernel.get_value()):
            raise ValueError(f"PiSSA writes the SVD residual into {type(layer).__name__}'s kernel, which is stored "
                             "quantized: attach PiSSA to the float model (or use LoRA, DoRA, HiRA or MoRA on the "
                             "quantized base)")
        if config.r > min(k, d):
            raise ValueError(f"PiSSA rank r={config.r} exceeds the rank of {type(layer).__name__}'s {k}x{d} kernel; "
                             f"use r <= {min(k, d)}")
        spec = AdapterSpec(method="pissa", alpha=float(config.alpha), rslora=bool(config.rslora), niter=config.niter,
                           **common)
        a, b, new_kernel = principal_start(kernel[...], spec, rng)
        variables = [_new_variable(nnx.LoRAParam, a, kernel, (*stacked, *in_axes, None), len(shape)),
                     _new_variable(nnx.LoRAParam, b, kernel, (*stacked, None, *out_axes), len(shape))]
    elif isinstance(config, MoRAConfig):
        spec = AdapterSpec(method="mora", mora_type=config.mora_type, magnitude=config.magnitude, **common)
        r_hat = ops.rank_hat(k, d, config.r, config.mora_type)
        variables = [_new_variable(MoRAParam, jnp.zeros((*stack, r_hat, r_hat), jnp.float32), kernel,
                                   (*stacked, None, None), len(shape))]
    else:
        if isinstance(config, HiRAConfig):
            spec = AdapterSpec(method="hira", **common)
        else:
            spec = AdapterSpec(method="dora" if isinstance(config, DoRAConfig) else "lora", alpha=float(config.alpha),
                               rslora=bool(config.rslora), **common)
        variables = [
            _new_variable(nnx.LoRAParam, initial_lora_a(rng, spec), kernel, (*stacked, *in_axes, None), len(shape)),
            _new_variable(nnx.LoRAParam, jnp.zeros((*stack, config.r, *out_shape), jnp.float32), kernel,
                          (*stacked, None, *out_axes), len(shape)),
        ]
    if spec.rescaled:  # DoRA's (MoRA's) magnitude starts at the kernel's column norms, laid out like its out axes
        variables.append(_new_variable(nnx.LoRAParam, initial_magnitude(as_float(kernel.get_value()), spec), kernel,
                                       (*stacked, *out_axes), len(shape)))
    dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout > 0.0 else None
    return spec, variables, dropout, new_kernel


def principal_start(kernel, spec: AdapterSpec, rng):
    """PiSSA's start for a kernel in the layer's layout: ``(a (*stack, *in_shape, r), b (*stack, r, *out_shape),
    residual kernel)``, each layer of a stack by its own SVD (:func:`mora_jax.pissa.principal_init`)."""
    n = kernel.ndim - len(spec.perm)
    matrices = jax.vmap(lambda x: layers_lib.kernel_as_matrix(x, spec))(kernel.reshape(-1, *kernel.shape[n:]))
    # as mora_jax.pissa.init: one key per layer of a stack, the kernel's own key for a layer of its own
    keys = jax.random.split(rng, matrices.shape[0]) if spec.stack_shape else jnp.stack([rng])
    a, b, residual = jax.vmap(lambda x, key: pissa.principal_init(x, spec.r, spec.lora_scale, spec.niter, key))(
        matrices, keys)
    residual = jax.vmap(lambda x: layers_lib.matrix_as_kernel(x, spec))(residual).astype(kernel.dtype)
    return (a.reshape(*spec.stack_shape, *spec.in_shape, spec.r), b.reshape(*spec.stack_shape, spec.r, *spec.out_shape),
            residual.reshape(kernel.shape))


def set_kernel(layer, spec: AdapterSpec, value) -> None:
    """Write ``value`` into the layer's kernel, placed like the old value."""
    kernel = getattr(layer, spec.kernel)
    old = kernel[...]
    sharding = getattr(old, "sharding", None)
    if sharding is not None and not isinstance(old, jax.core.Tracer) and not isinstance(value, jax.core.Tracer):
        value = jax.device_put(value, sharding)
    kernel[...] = value


def _install(layer, spec: AdapterSpec, variables, dropout, new_kernel=None) -> None:
    """Swap the layer's class for its adapted subclass and give it the adapter's variables (and PiSSA's
    residual kernel)."""
    if new_kernel is not None:
        set_kernel(layer, spec, new_kernel)
    if dropout is not None:
        setattr(layer, DROPOUT_ATTR, dropout)
    layer.__class__ = layers_lib.adapted_class(type(layer))
    setattr(layer, SPEC_ATTR, spec)
    for name, variable in zip(spec.names, variables):
        setattr(layer, name, variable)


def _add_adapter(layer, config, rng, rngs) -> AdapterSpec:
    _install(layer, *_plan_adapter(layer, config, rng, rngs))
    return getattr(layer, SPEC_ATTR)


def initial_magnitude(kernel, spec: AdapterSpec):
    """DoRA's ``magnitude = ‖K‖_c`` (float32) of a kernel in the layer's layout, as ``(*stack, *out_shape)``."""
    n = kernel.ndim - len(spec.perm)
    matrices = jax.vmap(lambda k: layers_lib.kernel_as_matrix(k, spec))(kernel.reshape(-1, *kernel.shape[n:]))
    return dora.column_norms(matrices).reshape(*spec.stack_shape, *spec.out_shape)


def lora_a_init(rng, k: int, r: int):
    """LoRA's ``a`` as the linen path initialises it: PyTorch's kaiming-uniform, ``U(-1/√k, 1/√k)``, ``(k, r)``."""
    bound = 1.0 / math.sqrt(k)
    return jax.random.uniform(rng, (k, r), jnp.float32, -bound, bound)


def initial_lora_a(rng, spec: AdapterSpec):
    """:func:`lora_a_init` in the layer's layout ``(*stack, *in_shape, r)``; stacked layers get one key each
    (``fold_in(rng, i)`` for layer ``i`` of the flattened stack)."""
    if not spec.stack_shape:
        return lora_a_init(rng, spec.in_features, spec.r).reshape(*spec.in_shape, spec.r)
    keys = [jax.random.fold_in(rng, i) for i in range(math.prod(spec.stack_shape))]
    a = jnp.stack([lora_a_init(key, spec.in_features, spec.r) for key in keys])
    return a.reshape(*spec.stack_shape, *spec.in_shape, spec.r)


def attach(model, config: AdapterConfig, *, rng: jax.Array | int = 0, rngs: nnx.Rngs | None = None):
    """Adapt ``model`` in place for ``config`` and return it.

    ``MoRAConfig`` / ``LoRAConfig`` / ``HiRAConfig`` / ``DoRAConfig`` / ``PiSSAConfig``: every ``nnx.Linear``
    / ``nnx.LinearGeneral`` / ``nnx.Einsum`` (or registered einsum layer) whose kernel path ``config.targets``
    matches gets an adapter: MoRA's ``M = 0`` (a :class:`MoRAParam`; with ``magnitude=True`` also a
    magnitude ``‖K‖_c``), LoRA's (HiRA's, DoRA's) ``a``
    kaiming-uniform and ``b = 0`` (``nnx.LoRAParam``; DoRA's magnitude ``‖K‖_c``; PiSSA's ``a``, ``b`` from
    the kernel's SVD, the kernel replaced by the residual), all float32. ``FullConfig``: the matched parameters become trainable. In every case ``unfreeze``
    patterns become trainable too (:class:`TrainedParam`). Afterwards::

        optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)   # or Tunix's PeftTrainer, unchanged

    Args:
      rng: key (or int seed) for LoRA's ``a`` (kernel ``i`` in sorted path order uses ``fold_in(rng, i)``).
      rngs: random streams for adapter dropout (needed only when ``config.dropout > 0``).
    """
    if not isinstance(config, (MoRAConfig, LoRAConfig, HiRAConfig, DoRAConfig, PiSSAConfig, FullConfig)):
        raise TypeError(f"config must be a MoRAConfig, LoRAConfig, HiRAConfig, DoRAConfig, PiSSAConfig or FullConfig, "
                        f"got "
                        f"{type(config).__name__}: the nnx path does not implement {getattr(config, 'method', 'it')} yet (the linen path, "
                        "mora_jax.init_adapters / apply_model, does)")
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"attach needs an nnx.Module, got {type(model).__name__} (for linen models use mora_jax.init_adapters)"
        )
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    # Select and build everything first, so that a config error leaves the model untouched.
    plans = []
    if isinstance(config, FullConfig):
        trained = _select_params(model, config.targets, "targets")
    else:
        for i, (_, (_, layer)) in enumerate(_select_kernels(model, config.targets).items()):
            plans.append((layer, _plan_adapter(layer, config, jax.random.fold_in(rng, i), rngs)))
        trained = {}
    trained.update(_select_params(model, config.unfreeze, "unfreeze"))
    frozen_codes = sorted(name for name, (_, v) in trained.items() if is_quantized(v.get_value()))
    if frozen_codes:
        raise ValueError(f"{frozen_codes[:5]} are stored quantized (mora_jax.nnx.quant): full fine-tuning of a "
                         "quantized kernel is not possible; leave them out of the targets / unfreeze patterns, or "
                         "dequantize the model first (mnx.dequantize)")
    for layer, plan in plans:
        _install(layer, *plan)
    for _, variable in trained.values():
        if not isinstance(variable, nnx.LoRAParam):
            _retype(model, variable, TrainedParam)
    return model


def detach(model, *, keep_trained: bool = False):
    """Remove every adapter (without merging it) and restore the layers' classes; with ``keep_trained=False``
    re-type :class:`TrainedParam` back to ``nnx.Param``. Returns the model. See also ``merge_and_unload``."""
    for _, layer in adapted_layers(model).items():
        spec = getattr(layer, SPEC_ATTR)
        for name in (*spec.names, SPEC_ATTR):
            delattr(layer, name)
        if hasattr(layer, NORM_ATTR):
            delattr(layer, NORM_ATTR)
        if hasattr(layer, DROPOUT_ATTR):
            delattr(layer, DROPOUT_ATTR)
        layer.__class__ = layers_lib.base_class(type(layer))
    if not keep_trained:
        for _, variable in list(iter_params(model)):
            if isinstance(variable, TrainedParam):
                _retype(model, variable, nnx.Param)
    return model


def summary(model) -> str:
    """One line: trainable (``nnx.LoRAParam``) versus total parameters, and the number of adapted kernels."""
    n_train = n_total = 0
    for _, variable in iter_params(model):
        n_total += math.prod(variable.shape)
        if isinstance(variable, nnx.LoRAParam):
            n_train += math.prod(variable.shape)
    methods = sorted({getattr(layer, SPEC_ATTR).method for layer in adapted_layers(model).values()}) or ["full"]
    return (
        f"{'+'.join(methods)}: trainable {n_train:,} / total {n_total:,} parameters "
        f"({100.0 * n_train / max(n_total, 1):.3f}%), {len(adapted_layers(model))} adapted kernels"
    )


__all__ = ["adaptable_layers", "adapted_layers", "attach", "detach", "initial_lora_a", "path_str", "summary"]

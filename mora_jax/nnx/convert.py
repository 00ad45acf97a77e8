"""Converting between an nnx model's adapters and the linen adapter tree (``mora_jax.adapters`` format).

The linen tree (what ``mora_jax.init_adapters`` returns and ``apply_model`` / ``merge`` / the PEFT
and checkpoint code consume) maps linen parameter paths to :class:`mora_jax.MoRAAdapter` /
:class:`mora_jax.LoRAAdapter` nodes whose arrays are 2-D ``(k, ·)`` / ``(·, d)``. An nnx layer's
adapter is the same thing in the kernel's own axes (``M`` is identical; LoRA's ``a`` is
``(*in_shape, r)`` and ``b`` is ``(r, *out_shape)``), so conversion is a reshape and a renaming of paths.

Paths: an nnx path names list items by index (``model/layers/0/self_attn/q_proj/kernel``) where
linen's ``setup`` lists name them ``layers_0``; :func:`linen_path` maps the first to the second, and an
adapter is always keyed by its layer's path plus ``kernel`` (a Tunix ``Einsum``'s ``w`` too, as a
PEFT file names the module, not the parameter). A model with other names passes ``path_map``, any
function from an nnx module path (a tuple) to the linen module path.

Layers stacked with ``nnx.vmap`` (run with ``nnx.scan``) convert to the linen tree of an ``nn.scan``
model: one adapter per stacked layer path (``layers/mlp/up_proj/kernel``) with a leading layer axis,
which ``mora_jax.hf.peft.save_adapter`` writes as one tensor per layer (``model.layers.i...``).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mora_jax.adapters import LoRAAdapter, MoRAAdapter, flatten, is_adapter, unflatten
from mora_jax.dora import DoRAAdapter
from mora_jax.hira import HiRAAdapter
from mora_jax.methods import DoRAConfig, HiRAConfig, LoRAConfig, MoRAConfig
from mora_jax.pissa import PiSSAAdapter
from mora_jax.nnx import layers as layers_lib
from mora_jax.nnx.attach import _add_adapter, adaptable_layers, adapted_layers, path_str
from mora_jax.nnx.layers import SPEC_ATTR
from mora_jax.nnx.merge import placed_like

PathMap = Callable[[tuple], tuple]


def linen_path(path) -> tuple[str, ...]:
    """nnx path -> linen path: an integer (list index) joins its parent name, ``('layers', 0)`` -> ``'layers_0'``."""
    out: list[str] = []
    for part in path:
        if isinstance(part, int) and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(str(part))
    return tuple(out)


def _adapter_key(module_path, path_map: PathMap | None) -> tuple[str, ...]:
    return tuple((path_map or linen_path)(tuple(module_path))) + ("kernel",)


def to_linen_adapters(model, *, path_map: PathMap | None = None) -> dict:
    """The linen adapter tree of ``model``'s adapters (float32 copies), e.g. for ``mora_jax.apply_model``
    on the linen twin of the model, ``mora_jax.hf.save_adapter`` or a linen checkpoint."""
    out = {}
    for path, layer in adapted_layers(model).items():
        spec = getattr(layer, SPEC_ATTR)
        if spec.merged:
            raise ValueError(f"{path_str(path)} is merged; unmerge the model before exporting its adapters")
        key = _adapter_key(path, path_map)
        if key in out:
            raise ValueError(f"path_map sends two layers to {'/'.join(key)}")
        arrays = [jnp.array(x, dtype=jnp.float32) for x in layers_lib.adapter_arrays(layer, spec)]
        if len(spec.stack_shape) > 1:
            raise ValueError(
                f"{path_str(path)} is stacked over {spec.stack_shape}; the linen adapter tree stacks layers on one "
                "axis (nn.scan), so only layers stacked on one axis convert")
        if spec.method == "mora":
            out[key] = MoRAAdapter(m=arrays[0], in_features=spec.in_features, out_features=spec.out_features,
                                   mora_type=spec.mora_type, r=spec.r, dropout=spec.dropout,
                                   magnitude=arrays[1] if spec.magnitude else None)
        elif spec.method == "hira":
            out[key] = HiRAAdapter(a=arrays[0], b=arrays[1], in_features=spec.in_features,
                                   out_features=spec.out_features, dropout=spec.dropout)
        elif spec.method == "pissa":
            out[key] = PiSSAAdapter(a=arrays[0], b=arrays[1], in_features=spec.in_features,
                                    out_features=spec.out_features, alpha=spec.alpha, rslora=spec.rslora,
                                    dropout=spec.dropout, niter=spec.niter)
        elif spec.method == "dora":
            out[key] = DoRAAdapter(a=arrays[0], b=arrays[1], magnitude=arrays[2], in_features=spec.in_features,
                                   out_features=spec.out_features, alpha=spec.alpha, rslora=spec.rslora,
                                   dropout=spec.dropout)
        else:
            out[key] = LoRAAdapter(a=arrays[0], b=arrays[1], in_features=spec.in_features,
                                   out_features=spec.out_features, alpha=spec.alpha, rslora=spec.rslora,
                                   dropout=spec.dropout)
    return unflatten(out)


def linen_kernel_shapes(model, *, path_map: PathMap | None = None, dtype=jnp.float32, modules=None) -> dict:
    """A linen-style parameter tree of ``jax.ShapeDtypeStruct`` ``(k, d)`` for every adaptable kernel of
    ``model`` (what ``mora_jax.hf.peft.load_adapter`` needs to check a PEFT file against the model).

    ``modules``: linen module paths (tuples); only those layers are inspected, so a layer no adapter
    targets is never asked how it would be adapted (an ``nnx.Einsum`` with a batch axis cannot be)."""
    shapes = {}
    wanted = None if modules is None else {tuple(m) for m in modules}
    for path, layer in adaptable_layers(model).items():
        if wanted is not None and _adapter_key(path, path_map)[:-1] not in wanted:
            continue
        kind = layers_lib.kind_of(layer)
        stack, in_axes, out_axes = layers_lib.kernel_layout(layer)
        shape = getattr(layer, kind.kernel).shape
        k = math.prod(shape[a] for a in in_axes)
        d = math.prod(shape[a] for a in out_axes)
        shapes[_adapter_key(path, path_map)] = jax.ShapeDtypeStruct((*stack, k, d), dtype)  # (layers, k, d) stacked
    return unflatten(shapes)


def _method_of(key, adapter) -> str:
    """``"mora"``, ``"hira"``, ``"dora"``, ``"pissa"`` or ``"lora"``."""
    if isinstance(adapter, MoRAAdapter):
        return "mora"
    if isinstance(adapter, DoRAAdapter):
        return "dora"
    if isinstance(adapter, PiSSAAdapter):
        return "pissa"
    return "hira" if isinstance(adapter, HiRAAdapter) else "lora"


def _config_of(adapter):
    if isinstance(adapter, MoRAAdapter):
        return MoRAConfig(r=adapter.r, mora_type=adapter.mora_type, targets=(".*",), dropout=adapter.dropout,
                          magnitude=adapter.magnitude is not None)
    if isinstance(adapter, HiRAAdapter):
        return HiRAConfig(r=adapter.r, targets=(".*",), dropout=adapter.dropout)
    if isinstance(adapter, DoRAAdapter):
        return DoRAConfig(r=adapter.r, alpha=adapter.alpha, rslora=adapter.rslora, targets=(".*",),
                          dropout=adapter.dropout)
    return LoRAConfig(r=adapter.r, alpha=adapter.alpha, rslora=adapter.rslora, targets=(".*",), dropout=adapter.dropout)


def load_linen_adapters(model, adapters, *, path_map: PathMap | None = None, rngs: nnx.Rngs | None = None):
    """Put a linen adapter tree into ``model`` (in place; returns the model).

    A layer that already carries an adapter takes the tree's values and metadata (type, ``r``, alpha;
    the shapes must agree); a layer without one gets one attached. Every adapter in the tree must map to
    an adaptable layer of the model, stacked as the layer is (an ``nn.scan`` tree's ``(layers, ...)``
    arrays fit layers stacked with ``nnx.vmap``; for unstacked layers unstack it first with
    ``mora_jax.models.unstack_layers``). ``rngs`` is needed only for adapters with dropout.
    """
    layers = {_adapter_key(path, path_map): (path, layer) for path, layer in adaptable_layers(model).items()}
    flat = flatten(adapters)
    for key, adapter in sorted(flat.items(), key=lambda kv: "/".join(kv[0])):
        if not is_adapter(adapter):
            raise TypeError(f"{'/'.join(key)} in the adapter tree is {type(adapter).__name__}, not an adapter")
        if key not in layers:
            raise ValueError(
                f"adapter {'/'.join(key)} maps to no adaptable layer of the model; the model's adaptable kernels, as "
                f"linen paths, are: {sorted('/'.join(k) for k in layers)[:20]}. Pass path_map if the names differ"
            )
        path, layer = layers[key]
        method = _method_of(key, adapter)
        arrays = (adapter.m,) if isinstance(adapter, MoRAAdapter) else (adapter.a, adapter.b)
        stack = layers_lib.kernel_layout(layer)[0]
        if any(x.shape[: x.ndim - 2] != stack for x in arrays):
            raise ValueError(
                f"adapter {'/'.join(key)} has shape {arrays[0].shape}, but the layer is "
                + (f"stacked over {stack}" if stack else "one layer (not stacked)") + ": stack axes must match "
                "the layer's (unstack an nn.scan tree for unstacked layers with mora_jax.models.unstack_layers)"
            )
        if not layers_lib.is_adapted(layer):
            # PiSSA attaches as LoRA here: the params already hold the residual, no SVD may rewrite them
            _add_adapter(layer, _config_of(adapter), jax.random.key(0), rngs)
            if method == "pissa":
                setattr(layer, SPEC_ATTR, getattr(layer, SPEC_ATTR).replace(method="pissa"))
        spec = getattr(layer, SPEC_ATTR)
        if spec.merged:
            raise ValueError(f"{path_str(path)} is merged; unmerge the model before loading adapters into it")
        if (adapter.in_features, adapter.out_features) != (spec.in_features, spec.out_features):
            raise ValueError(
                f"adapter {'/'.join(key)} is {adapter.in_features}x{adapter.out_features} but the layer maps "
                f"{spec.in_features} -> {spec.out_features} features"
            )
        with_magnitude = isinstance(adapter, MoRAAdapter) and adapter.magnitude is not None
        if method != spec.method or (method == "mora" and with_magnitude != spec.magnitude):
            def name(m, mag):
                return f"{m} with a magnitude" if m == "mora" and mag else m
            raise ValueError(
                f"adapter {'/'.join(key)} is {name(method, with_magnitude)} but the layer carries "
                f"{name(spec.method, spec.magnitude)}; detach the model's adapters first (mora_jax.nnx.detach)"
            )
        if method == "mora":
            new_spec = spec.replace(mora_type=adapter.mora_type, r=adapter.r, dropout=adapter.dropout)
            values = (adapter.m,)
            if with_magnitude:
                values += (adapter.magnitude.reshape(*stack, *spec.out_shape),)
        elif method == "hira":
            new_spec = spec.replace(r=adapter.r, dropout=adapter.dropout)
            values = (adapter.a.reshape(*stack, *spec.in_shape, adapter.r),
                      adapter.b.reshape(*stack, adapter.r, *spec.out_shape))
        else:
            new_spec = spec.replace(r=adapter.r, alpha=adapter.alpha, rslora=adapter.rslora, dropout=adapter.dropout,
                                    niter=getattr(adapter, "niter", None))
            values = (adapter.a.reshape(*stack, *spec.in_shape, adapter.r),
                      adapter.b.reshape(*stack, adapter.r, *spec.out_shape))
            if method == "dora":
                values += (adapter.magnitude.reshape(*stack, *spec.out_shape),)
        for name, value in zip(spec.names, values):
            variable = getattr(layer, name)
            if variable.shape != value.shape:
                raise ValueError(
                    f"adapter {'/'.join(key)}: {name} has shape {value.shape} in the tree but {variable.shape} in the "
                    "model (another r, or a type 6 adapter on a types 1-4 layer); detach the model's adapters first"
                )
            variable[...] = placed_like(jnp.asarray(value, dtype=variable[...].dtype), variable[...])
        if (new_spec.dropout > 0.0) != hasattr(layer, layers_lib.DROPOUT_ATTR):
            raise ValueError(f"adapter {'/'.join(key)} changes dropout on or off; attach with the matching config")
        if new_spec.dropout > 0.0:
            getattr(layer, layers_lib.DROPOUT_ATTR).rate = new_spec.dropout
        setattr(layer, SPEC_ATTR, new_spec)
    return model


__all__ = ["linen_kernel_shapes", "linen_path", "load_linen_adapters", "to_linen_adapters"]

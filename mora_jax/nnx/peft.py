"""PEFT adapter files for nnx models, through the linen path's reader and writer.

``save_adapter(path, model)`` converts the model's adapters to the linen adapter tree
(:func:`to_linen_adapters`) and writes it with :func:`mora_jax.hf.peft.save_adapter`: the MoRA
reference's format (``use_mora``, ``mora_type``, ``lora_A.weight = lora_B.weight = Mᵀ``) or plain
LoRA. ``load_adapter(path, model)`` reads a directory with :func:`mora_jax.hf.peft.load_adapter`,
checked against the model's kernel shapes, and puts the adapters into the model
(:func:`load_linen_adapters`). Module names follow the linen paths (``model.layers.0.self_attn.q_proj``
for ``model/layers/0/self_attn/q_proj``); ``path_map`` renames for other models.
"""

from __future__ import annotations

import re

from mora_jax.adapters import flatten
from mora_jax.hf import peft
from mora_jax.hf.files import hf_name_to_path, layer_index
from mora_jax.hf.peft_files import adapter_directory, group_tensors, read_adapter_tensors
from mora_jax.methods import DoRAConfig, HiRAConfig, LoRAConfig, MoRAConfig, PiSSAConfig
from mora_jax.nnx.attach import adapted_layers, path_str
from mora_jax.nnx.convert import PathMap, linen_kernel_shapes, load_linen_adapters, to_linen_adapters
from mora_jax.nnx.layers import SPEC_ATTR


def adapter_config(model) -> MoRAConfig | LoRAConfig | HiRAConfig | DoRAConfig:
    """The config of ``model``'s adapters (one method, ``r`` and type for all), ``targets`` their exact kernel paths."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model carries no adapters (attach them with mora_jax.nnx.attach)")
    specs = {getattr(layer, SPEC_ATTR).replace(in_shape=(), out_shape=(), perm=(), kernel="", merged=False,
                                               stack_shape=())
             for layer in layers.values()}
    if len(specs) > 1:
        raise ValueError(
            f"the model's adapters differ in method, rank, type or scale ({sorted(map(str, specs))[:3]}); a PEFT "
            "adapter file holds one configuration"
        )
    spec = specs.pop()
    targets = tuple(re.escape(path_str((*p, getattr(layer, SPEC_ATTR).kernel))) for p, layer in layers.items())
    if spec.method == "mora":
        return MoRAConfig(r=spec.r, mora_type=spec.mora_type, targets=targets, dropout=spec.dropout,
                          magnitude=spec.magnitude)
    if spec.method == "hira":
        return HiRAConfig(r=spec.r, targets=targets, dropout=spec.dropout)
    if spec.method == "dora":
        return DoRAConfig(r=spec.r, alpha=spec.alpha, rslora=spec.rslora, targets=targets, dropout=spec.dropout)
    if spec.method == "pissa":  # a PEFT file of it is a LoRA for the residual base (pissa.to_lora: for the original)
        return PiSSAConfig(r=spec.r, alpha=spec.alpha, rslora=spec.rslora, targets=targets, dropout=spec.dropout,
                           niter=spec.niter)
    return LoRAConfig(r=spec.r, alpha=spec.alpha, rslora=spec.rslora, targets=targets, dropout=spec.dropout)


def save_adapter(path, model, *, path_map: PathMap | None = None, base_model_name_or_path: str = "",
                 overwrite: bool = False):
    """Write ``model``'s adapters as a PEFT adapter directory; returns the written files."""
    config = adapter_config(model)
    return peft.save_adapter(path, config, to_linen_adapters(model, path_map=path_map),
                             base_model_name_or_path=base_model_name_or_path, overwrite=overwrite)


def load_adapter(path, model, *, path_map: PathMap | None = None,
                 rngs=None) -> MoRAConfig | LoRAConfig | HiRAConfig | DoRAConfig:
    """Read a PEFT adapter directory into ``model`` (attaching adapters where it has none); returns its config
    with ``targets`` naming the adapted kernels' nnx paths."""
    # Only the layers the file adapts are inspected: the model may hold layers no adapter could attach to.
    directory = adapter_directory(path)
    targeted = [hf_name_to_path(m) for m in group_tensors(read_adapter_tensors(directory), str(directory))]
    stacked = [tuple("layers" if layer_index(p) is not None else p for p in m) for m in targeted]  # scanned trees
    shapes = linen_kernel_shapes(model, path_map=path_map, modules=targeted + stacked)
    _, adapters = peft.load_adapter(path, shapes)
    if not flatten(adapters):
        raise ValueError(f"{path} holds no adapters")
    load_linen_adapters(model, adapters, path_map=path_map, rngs=rngs)
    return adapter_config(model)


__all__ = ["adapter_config", "load_adapter", "save_adapter"]

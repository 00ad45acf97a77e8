"""Adapter files in Hugging Face PEFT format <-> this project's adapter trees.

``load_adapter(path, params)`` reads a PEFT adapter directory (the MoRA reference's fork, or plain
LoRA) into an adapter tree for the given base parameters (unrolled ``model/layers_{i}`` or scanned
``model/layers`` with a leading layer axis); ``save_adapter`` writes one that the reference (and, for
LoRA, stock PEFT) loads. Everything that would change the adapted model's function but is not
modelled here (``modules_to_save``, per-layer ranks, trained biases, ...) is refused with a
message saying so.

Design: the format itself (file and tensor names, safe reading, the supported options, the config
the reference writes) is ``mora_jax.hf.peft_files``, which knows nothing of base models; this module
does the conversion, which is where shapes are checked against the base model: each tensor name
resolves to a base kernel, ``r̂`` is recomputed from that kernel's shape (``mora_jax.ops.rank_hat``),
and PyTorch's ``(out, in)`` layout becomes the kernel layout ``(in, out)``. Names map through
``mora_jax.hf.files`` (shared with ``mora_jax.hf.checkpoints``, which this module never imports).
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax import ops
from mora_jax.adapters import LoRAAdapter, MoRAAdapter, flatten, is_adapter, path_str, unflatten
from mora_jax.dora import DoRAAdapter
from mora_jax.hira import HiRAAdapter
from mora_jax.hf.files import Path, hf_name_to_path, layer_index, write_safetensors, write_text_atomic
from mora_jax.hf.peft_files import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    PICKLE_WEIGHTS_FILE,
    TENSOR_PREFIX,
    AdapterFormatError,
    adapter_directory,
    check_supported,
    group_tensors,
    parse_tensor_name,
    part_suffix,
    peft_config_dict,
    read_adapter_config,
    read_adapter_tensors,
    target_modules_for,
    tensor_name,
)
from mora_jax.methods import DoRAConfig, HiRAConfig, LoRAConfig, MoRAConfig

# ---------------------------------------------------------------------------------------------
# load_adapter
# ---------------------------------------------------------------------------------------------


def _targets_pattern(target_modules) -> str | None:
    """Regex over ``/``-joined param paths equivalent to PEFT's list matching, or None for a str.

    PEFT adapts a module whose name equals a listed entry or ends with ``.<entry>``.
    """
    if not isinstance(target_modules, (list, tuple)) or not target_modules:
        return None
    alternatives = sorted(re.escape("/".join(hf_name_to_path(str(t)))) for t in target_modules)
    return rf"(?:.*/)?(?:{'|'.join(alternatives)})/kernel"


def _resolve_module(module: str, flat_params: Mapping[Path, Any]) -> tuple[Path, int | None] | None:
    """``(kernel path in params, layer index or None)`` for a HF module name, or None if absent.

    For scanned params (``model/layers`` with a leading layer axis) the per-layer name
    ``model.layers.3.x`` resolves to the stacked kernel ``model/layers/x/kernel`` at index 3.
    """
    path = hf_name_to_path(module) + ("kernel",)
    if path in flat_params:
        return path, None
    for i, part in enumerate(path):
        layer = layer_index(part)
        if layer is not None:
            stacked = path[:i] + ("layers",) + path[i + 1 :]
            if stacked in flat_params:
                return stacked, layer
    return None


def _mora_matrix(module: str, parts, k: int, d: int, r: int, mora_type: int, where) -> np.ndarray:
    """``m`` (kernel layout, float32) from the reference's ``lora_A.weight = Mᵀ``, checked against r̂."""
    name = f"{TENSOR_PREFIX}{module}.lora_A.weight"
    if "lora_A" not in parts:
        raise AdapterFormatError(f"{where}: {name} is missing (only lora_B is stored for this module)")
    m_t = parts["lora_A"]
    if m_t.ndim != 2 or m_t.shape[0] != m_t.shape[1]:
        raise AdapterFormatError(
            f"{where}: {name} has shape {m_t.shape}, but a MoRA matrix is square (r̂, r̂); is this a plain "
            "LoRA adapter with a stray \"use_mora\": true in its config?"
        )
    r_hat_file = m_t.shape[0]
    if mora_type == 6 and r_hat_file % 2:
        raise AdapterFormatError(
            f"{where}: {name} has shape {m_t.shape}: type 6 (RoPE-based) MoRA needs an even r̂, got {r_hat_file}; "
            "the file is not a type 6 adapter (check mora_type in adapter_config.json)"
        )
    r_hat = ops.rank_hat(k, d, r, mora_type)
    if r_hat_file != r_hat:
        raise AdapterFormatError(
            f"{where}: {name} has shape {m_t.shape}, but for the base layer {module} ({k} -> {d} features) "
            f"r={r} with mora_type {mora_type} gives r̂={r_hat}, i.e. shape ({r_hat}, {r_hat}). The adapter was "
            "trained for another base model, or adapter_config.json has the wrong r / mora_type"
        )
    if "lora_B" in parts and not np.array_equal(parts["lora_B"], m_t):
        raise AdapterFormatError(
            f"{where}: {TENSOR_PREFIX}{module}.lora_B.weight differs from lora_A.weight; the MoRA reference stores "
            "one matrix under both names, so this file is not a MoRA adapter from the reference (or is corrupt)"
        )
    return np.ascontiguousarray(m_t.astype(np.float32).T)


def _lora_matrices(module: str, parts, k: int, d: int, r: int, where,
                   names=("lora_A", "lora_B")) -> tuple[np.ndarray, np.ndarray]:
    """``(a (k, r), b (r, d))`` float32 from PEFT's ``lora_A.weight (r, k)``, ``lora_B.weight (d, r)``
    (HiRA: ``names=("hira_A", "hira_B")``, the same layout)."""
    a_name, b_name = (part_suffix(n) for n in names)
    for part, shown in zip(names, (a_name, b_name)):
        if part not in parts:
            raise AdapterFormatError(f"{where}: {TENSOR_PREFIX}{module}.{shown} is missing")
    a_t, b_t = parts[names[0]], parts[names[1]]
    if a_t.shape != (r, k) or b_t.shape != (d, r):
        raise AdapterFormatError(
            f"{where}: module {module} has {a_name} {a_t.shape} and {b_name} {b_t.shape}, but the base "
            f"layer maps {k} -> {d} features and r={r}, so they should be {(r, k)} and {(d, r)}; the adapter was "
            "trained for another base model or adapter_config.json has the wrong r"
        )
    return np.ascontiguousarray(a_t.astype(np.float32).T), np.ascontiguousarray(b_t.astype(np.float32).T)


def _magnitude(module: str, parts, d: int, where) -> np.ndarray:
    """DoRA's ``lora_magnitude_vector`` ``(d,)`` float32."""
    if "lora_magnitude_vector" not in parts:
        raise AdapterFormatError(f"{where}: {TENSOR_PREFIX}{module}.lora_magnitude_vector is missing (use_dora is set)")
    mag = parts["lora_magnitude_vector"]
    if mag.shape != (d,):
        raise AdapterFormatError(f"{where}: {TENSOR_PREFIX}{module}.lora_magnitude_vector has shape {mag.shape}, but "
                                 f"the base layer has {d} output features; the adapter was trained for another model")
    return mag.astype(np.float32)


def load_adapter(path, params) -> tuple[MoRAConfig | LoRAConfig | DoRAConfig, dict]:
    """Read a PEFT adapter directory (MoRA reference format or plain LoRA) for the base ``params``.

    Args:
      path: directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
      params: the base model's parameters (e.g. from ``mora_jax.hf.load_llama``), unrolled
        (``model/layers_{i}``) or scanned (``model/layers`` with a leading layer axis; then the file
        must cover every layer of each adapted kernel).

    Returns:
      ``(config, adapters)``: a ``MoRAConfig`` / ``LoRAConfig`` (``targets`` selects exactly the
      adapted kernels, as a regex built from ``target_modules`` when that is equivalent) and an
      adapter tree for ``mora_jax.apply_model`` / ``mora_jax.merge``, all float32.

    Raises:
      FileNotFoundError: missing directory or files.
      AdapterFormatError (a ValueError): unsupported options, tensors that map to no base parameter,
        or shapes that do not fit the base model (the message names the layer and the expected shape).
    """
    directory = adapter_directory(path)
    where = str(directory)
    raw = read_adapter_config(directory)
    check_supported(raw, where)
    modules = group_tensors(read_adapter_tensors(directory), where)

    use_hira = raw.get("peft_type") == "HIRA"
    use_mora = bool(raw.get("use_mora")) and not use_hira
    use_dora = bool(raw.get("use_dora")) and not use_hira
    r = int(raw["r"])
    mora_type = int(raw.get("mora_type", 1))
    alpha = float(raw.get("lora_alpha", 8))
    rslora = bool(raw.get("use_rslora", False))
    dropout = float(raw.get("hira_dropout" if use_hira else "lora_dropout", 0.0) or 0.0)

    flat_params = flatten(params)
    unmatched = []
    per_kernel: dict[Path, dict[int | None, Any]] = {}
    for module in sorted(modules):
        resolved = _resolve_module(module, flat_params)
        if resolved is None:
            unmatched.append(module)
            continue
        kernel_path, layer = resolved
        kernel = flat_params[kernel_path]
        want_ndim = 2 if layer is None else 3
        if len(kernel.shape) != want_ndim:
            raise AdapterFormatError(
                f"{where}: module {module} maps to {path_str(kernel_path)} of shape {tuple(kernel.shape)}; only "
                f"{'(in, out)' if layer is None else '(layers, in, out)'} kernels can carry a PEFT adapter"
            )
        if layer is not None and layer >= kernel.shape[0]:
            unmatched.append(module)
            continue
        k, d = int(kernel.shape[-2]), int(kernel.shape[-1])
        _check_parts(module, modules[module], use_hira, where)
        if use_hira:
            value = _lora_matrices(module, modules[module], k, d, r, where, names=("hira_A", "hira_B"))
        elif use_mora:
            value = _mora_matrix(module, modules[module], k, d, r, mora_type, where)
        else:
            value = _lora_matrices(module, modules[module], k, d, r, where)
            if use_dora:
                value = (*value, _magnitude(module, modules[module], d, where))
        if not use_dora and "lora_magnitude_vector" in modules[module]:
            raise AdapterFormatError(f"{where}: {module} has a lora_magnitude_vector but use_dora is not set in "
                                     "adapter_config.json; set \"use_dora\": true if it is a DoRA adapter")
        per_kernel.setdefault(kernel_path, {})[layer] = (value, k, d)
    if unmatched:
        raise AdapterFormatError(
            f"{where}: {len(unmatched)} adapter module(s) map to no base parameter: {unmatched[:10]} "
            f"(looked for '<module path>/kernel' in params, e.g. {path_str(hf_name_to_path(unmatched[0]) + ('kernel',))}); "
            "the adapter was trained for another model (check base_model_name_or_path in adapter_config.json)"
        )

    flat_adapters = {}
    for kernel_path, layers in per_kernel.items():
        if None in layers:
            value, k, d = layers[None]
            stack = lambda xs: xs[0]  # noqa: E731
            items = [value]
        else:
            n_layers = int(flat_params[kernel_path].shape[0])
            missing = [i for i in range(n_layers) if i not in layers]
            if missing:
                raise AdapterFormatError(
                    f"{where}: the params are scanned (stacked layers) but the adapter has no tensors for "
                    f"{path_str(kernel_path)} in layer(s) {missing}; load unrolled params "
                    "(load_llama(..., scan_layers=False)) to use an adapter that skips layers"
                )
            k, d = layers[0][1], layers[0][2]
            items = [layers[i][0] for i in range(n_layers)]
            stack = lambda xs: np.stack(xs)  # noqa: E731
        if use_mora:
            flat_adapters[kernel_path] = MoRAAdapter(
                m=_device_array(stack(items)), in_features=k, out_features=d, mora_type=mora_type, r=r,
                dropout=dropout,
            )
        elif use_hira:
            flat_adapters[kernel_path] = HiRAAdapter(
                a=_device_array(stack([a for a, _ in items])), b=_device_array(stack([b for _, b in items])),
                in_features=k, out_features=d, dropout=dropout,
            )
        elif use_dora:
            flat_adapters[kernel_path] = DoRAAdapter(
                a=_device_array(stack([v[0] for v in items])), b=_device_array(stack([v[1] for v in items])),
                magnitude=_device_array(stack([v[2] for v in items])),
                in_features=k, out_features=d, alpha=alpha, rslora=rslora, dropout=dropout,
            )
        else:
            flat_adapters[kernel_path] = LoRAAdapter(
                a=_device_array(stack([a for a, _ in items])), b=_device_array(stack([b for _, b in items])),
                in_features=k, out_features=d, alpha=alpha, rslora=rslora, dropout=dropout,
            )

    targets = _config_targets(raw.get("target_modules"), flat_params, set(flat_adapters))
    if use_hira:
        config = HiRAConfig(r=r, targets=targets, dropout=dropout)
    elif use_mora:
        config = MoRAConfig(r=r, mora_type=mora_type, targets=targets, dropout=dropout)
    elif use_dora:
        config = DoRAConfig(r=r, alpha=alpha, rslora=rslora, targets=targets, dropout=dropout)
    else:
        config = LoRAConfig(r=r, alpha=alpha, rslora=rslora, targets=targets, dropout=dropout)
    return config, unflatten(flat_adapters)


def _check_parts(module: str, parts, use_hira: bool, where) -> None:
    """A HiRA file holds only ``hira_A`` / ``hira_B``, a LoRA/MoRA/DoRA file none of them."""
    hira_parts = {"hira_A", "hira_B"} & set(parts)
    if use_hira and set(parts) - hira_parts:
        raise AdapterFormatError(f"{where}: {module} has {sorted(set(parts) - hira_parts)} tensors but the config says "
                                 "peft_type HIRA (tensors hira_A, hira_B only); fix peft_type in adapter_config.json")
    if not use_hira and hira_parts:
        raise AdapterFormatError(f"{where}: {module} has HiRA tensors {sorted(hira_parts)} but peft_type is "
                                 f"{'LORA'!r}; set \"peft_type\": \"HIRA\" if it is a HiRA adapter")


def _device_array(x: np.ndarray) -> jax.Array:
    return jnp.asarray(x)


def _config_targets(target_modules, flat_params, adapted: set[Path]) -> tuple[str, ...]:
    """``targets`` for the returned config: the regex from ``target_modules`` when it selects exactly
    the adapted kernels of ``params``, otherwise the adapted kernel paths themselves (escaped)."""
    pattern = _targets_pattern(target_modules)
    if pattern is not None:
        selected = {p for p in flat_params if re.fullmatch(pattern, path_str(p))}
        if selected == adapted:
            return (pattern,)
    return tuple(re.escape(path_str(p)) for p in sorted(adapted, key=path_str))


# ---------------------------------------------------------------------------------------------
# save_adapter
# ---------------------------------------------------------------------------------------------


def _per_layer(path: Path, array: np.ndarray) -> list[tuple[Path, np.ndarray]]:
    """Split a (possibly layer-stacked) adapter array into ``(module path, 2-D array)`` pairs."""
    module = path[:-1]
    if array.ndim == 2:
        return [(module, array)]
    if array.ndim == 3 and "layers" in module:
        i = module.index("layers")
        return [(module[:i] + (f"layers_{n}",) + module[i + 1 :], array[n]) for n in range(array.shape[0])]
    raise AdapterFormatError(
        f"adapter {path_str(path)} has shape {array.shape}; PEFT files hold one 2-D matrix per module, so only "
        "unrolled adapters or adapters stacked along a 'layers' axis (nn.scan) can be saved"
    )


def _check_adapters_match(config, flat_adapters) -> None:
    for path, adapter in flat_adapters.items():
        if not is_adapter(adapter):
            raise TypeError(f"{path_str(path)} in the adapter tree is {type(adapter).__name__}, not an adapter")
        if path[-1] != "kernel":
            raise AdapterFormatError(
                f"adapter at {path_str(path)} is not on a 'kernel' parameter; PEFT files adapt whole Linear modules"
            )
        if isinstance(adapter, MoRAAdapter) and adapter.magnitude is not None:
            raise AdapterFormatError(
                f"adapter at {path_str(path)} is MoRA with a magnitude (MoRAConfig(magnitude=True)), which no PEFT "
                "file format holds; save the merged model instead (mora_jax.merge, then mora_jax.hf.save_llama)"
            )
        if isinstance(config, HiRAConfig):
            if not isinstance(adapter, HiRAAdapter) or adapter.r != config.r:
                raise AdapterFormatError(
                    f"adapter at {path_str(path)} does not match the HiRAConfig(r={config.r}) given to save_adapter "
                    f"({_describe(adapter)}); pass the config the adapters were created with"
                )
        elif isinstance(config, MoRAConfig):
            if not isinstance(adapter, MoRAAdapter) or (adapter.r, adapter.mora_type) != (config.r, config.mora_type):
                raise AdapterFormatError(
                    f"adapter at {path_str(path)} does not match the MoRAConfig(r={config.r}, mora_type="
                    f"{config.mora_type}) given to save_adapter ({_describe(adapter)}); pass the config the "
                    "adapters were created with"
                )
        else:
            want = DoRAAdapter if isinstance(config, DoRAConfig) else LoRAAdapter  # PiSSA's nodes are LoRA's
            if not isinstance(adapter, want) or isinstance(adapter, DoRAAdapter) != (want is DoRAAdapter) or (adapter.r, adapter.alpha, adapter.rslora) != (
                config.r, float(config.alpha), bool(config.rslora)
            ):
                raise AdapterFormatError(
                    f"adapter at {path_str(path)} does not match the {type(config).__name__}(r={config.r}, "
                    f"alpha={config.alpha}, "
                    f"rslora={config.rslora}) given to save_adapter ({_describe(adapter)}); pass the config the "
                    "adapters were created with"
                )


def _describe(adapter) -> str:
    if isinstance(adapter, MoRAAdapter):
        return f"MoRA r={adapter.r}, type {adapter.mora_type}"
    if isinstance(adapter, HiRAAdapter):
        return f"HiRA r={adapter.r}"
    if isinstance(adapter, DoRAAdapter):
        return f"DoRA r={adapter.r}, alpha={adapter.alpha}, rslora={adapter.rslora}"
    return f"LoRA r={adapter.r}, alpha={adapter.alpha}, rslora={adapter.rslora}"


def adapter_tensors(config: MoRAConfig | LoRAConfig | DoRAConfig | HiRAConfig, adapters) -> dict[str, np.ndarray]:
    """The PEFT state dict (name -> numpy array in PyTorch layout) of an adapter tree."""
    flat = flatten(adapters)
    if not flat:
        raise AdapterFormatError("the adapter tree is empty: nothing to save")
    _check_adapters_match(config, flat)
    tensors = {}
    for path, adapter in sorted(flat.items(), key=lambda kv: path_str(kv[0])):
        if isinstance(adapter, MoRAAdapter):
            m = np.asarray(jax.device_get(adapter.m))
            for module, m_2d in _per_layer(path, m):
                m_t = np.ascontiguousarray(m_2d.T)  # lora_A.weight = Mᵀ
                tensors[tensor_name(module, "lora_A")] = m_t
                tensors[tensor_name(module, "lora_B")] = m_t.copy()  # the reference aliases B to A
        else:
            a = _per_layer(path, np.asarray(jax.device_get(adapter.a)))
            b = _per_layer(path, np.asarray(jax.device_get(adapter.b)))
            a_part, b_part = ("hira_A", "hira_B") if isinstance(adapter, HiRAAdapter) else ("lora_A", "lora_B")
            for (module, a_2d), (_, b_2d) in zip(a, b):
                tensors[tensor_name(module, a_part)] = np.ascontiguousarray(a_2d.T)  # (r, k)
                tensors[tensor_name(module, b_part)] = np.ascontiguousarray(b_2d.T)  # (d, r)
            if isinstance(adapter, DoRAAdapter):
                for module, mag in _per_layer(path, np.asarray(jax.device_get(adapter.magnitude))[..., None]):
                    tensors[tensor_name(module, "lora_magnitude_vector")] = np.ascontiguousarray(mag[:, 0])
    return tensors


def save_adapter(
    path,
    config: MoRAConfig | LoRAConfig | DoRAConfig | HiRAConfig,
    adapters,
    *,
    base_model_name_or_path: str = "",
    overwrite: bool = False,
) -> list[pathlib.Path]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT format.

    MoRA adapters are written exactly as the reference's PEFT fork writes them (``use_mora``,
    ``mora_type``, ``lora_A.weight = lora_B.weight = Mᵀ``), so PyTorch users of the reference can
    load them with ``PeftModel.from_pretrained``; LoRA adapters in standard PEFT format. Scanned
    (layer-stacked) adapter trees are written per layer. Refuses an existing non-empty directory
    unless ``overwrite=True`` (which replaces the two adapter files and keeps other files).
    Returns the written files.
    """
    if not isinstance(config, (MoRAConfig, LoRAConfig, DoRAConfig, HiRAConfig)):
        raise TypeError(f"config must be a MoRAConfig, LoRAConfig, DoRAConfig or HiRAConfig, got {type(config).__name__}")
    tensors = adapter_tensors(config, adapters)  # validate before touching the disk
    modules = sorted({hf_name_to_path(parse_tensor_name(n)[0]) for n in tensors})
    config_dict = peft_config_dict(config, target_modules_for(modules), base_model_name_or_path)

    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; choose a directory path for the adapter")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{directory} is not empty; choose a new directory or pass overwrite=True to replace the adapter files"
        )
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = directory / ADAPTER_WEIGHTS_FILE, directory / ADAPTER_CONFIG_FILE
    write_safetensors(weights_path, tensors)
    # both files through a temporary file and a rename: a crash leaves the previous file or the new
    # one, and a symlink at the destination is replaced, never written through
    write_text_atomic(config_path, json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return [config_path, weights_path]


__all__ = ["adapter_tensors", "load_adapter", "save_adapter"]

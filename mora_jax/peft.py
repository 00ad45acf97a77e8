"""Adapter files in Hugging Face PEFT format: the MoRA reference's fork, and plain LoRA.

A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensors
are named ``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight`` in PyTorch layout:

- plain LoRA: ``lora_A.weight`` is ``Aᵀ`` ``(r, k)`` and ``lora_B.weight`` is ``Bᵀ`` ``(d, r)``, with
  ``Δy = scale·(x·A)·B`` and ``scale = lora_alpha / r`` (``lora_alpha / √r`` when ``use_rslora``);
- MoRA (the reference's fork of PEFT: ``"peft_type": "LORA"``, ``"use_mora": true``,
  ``"mora_type": t``): ``lora_A.weight`` is ``Mᵀ`` ``(r̂, r̂)`` and ``lora_B.weight`` is an identical
  copy (the reference aliases B to A). ``r̂`` is not stored; it follows from ``r``, the type and each
  layer's shape (``mora_jax.rank_hat``), and ``lora_alpha`` is ignored.

``load_adapter(path, params)`` reads such a directory into this project's adapter tree for the
given base parameters (unrolled ``model/layers_{i}`` or scanned ``model/layers`` with a leading
layer axis); ``save_adapter`` writes one that the reference (and, for LoRA, stock PEFT) loads.
Everything that would change the adapted model's function but is not modelled here (DoRA,
``modules_to_save``, per-layer ranks, trained biases, ...) is refused with a message saying so.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import struct
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mora_jax import ops
from mora_jax.adapters import LoRAAdapter, MoRAAdapter, flatten, is_adapter, path_str, unflatten
from mora_jax.config import LoRAConfig, MoRAConfig

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
TENSOR_PREFIX = "base_model.model."
# base_model.model.<module>.lora_A.weight (PEFT strips the adapter name "default" when saving).
_TENSOR_NAME = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight")
_LAYER_PART = re.compile(r"layers_(\d+)")
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}  # fmt: skip

Path = tuple[str, ...]


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be read into, or written from, this project's adapters.

    The message names the problem and what to do about it.
    """


# ---------------------------------------------------------------------------------------------
# Module names: HF dotted names <-> parameter tree paths.
# ---------------------------------------------------------------------------------------------


def _module_to_path(module: str) -> Path:
    """``'model.layers.0.self_attn.q_proj'`` -> ``('model', 'layers_0', 'self_attn', 'q_proj')``."""
    from mora_jax.hf import hf_name_to_path  # imported here: mora_jax.hf re-exports this module

    return tuple(hf_name_to_path(module))


def _path_to_module(path: Path) -> str:
    """``('model', 'layers_0', 'self_attn', 'q_proj')`` -> ``'model.layers.0.self_attn.q_proj'``."""
    from mora_jax.hf import path_to_hf_name

    return path_to_hf_name(path)


def _tensor_name(module_path: Path, part: str) -> str:
    return f"{TENSOR_PREFIX}{_path_to_module(module_path)}.{part}.weight"


# ---------------------------------------------------------------------------------------------
# Reading the files.
# ---------------------------------------------------------------------------------------------


def _adapter_dir(path) -> pathlib.Path:
    directory = pathlib.Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"adapter directory {directory} does not exist")
    if not directory.is_dir():
        raise NotADirectoryError(
            f"{directory} is not a directory; give the adapter directory that holds {ADAPTER_CONFIG_FILE} "
            f"and {ADAPTER_WEIGHTS_FILE}"
        )
    return directory


def read_adapter_config(path) -> dict[str, Any]:
    """The raw ``adapter_config.json`` of the adapter directory ``path`` (a dict, not validated)."""
    directory = _adapter_dir(path)
    config_path = directory / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"{config_path} not found (the directory holds: {found}); a PEFT adapter directory needs "
            f"{ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}, as written by save_pretrained() or save_adapter()"
        )
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{config_path} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{config_path} must hold a JSON object, got {type(raw).__name__}")
    return raw


def read_adapter_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of ``<path>/adapter_model.safetensors`` by name, in the file's layout and dtype."""
    directory = _adapter_dir(path)
    weights_path = directory / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        if (directory / PICKLE_WEIGHTS_FILE).is_file():
            raise FileNotFoundError(
                f"{directory} holds {PICKLE_WEIGHTS_FILE} (a PyTorch pickle) but no {ADAPTER_WEIGHTS_FILE}; "
                "pickles are not read (unpickling can run arbitrary code). Re-save the adapter with "
                "save_pretrained(..., safe_serialization=True)"
            )
        raise FileNotFoundError(
            f"{weights_path} not found; a PEFT adapter directory needs {ADAPTER_CONFIG_FILE} and "
            f"{ADAPTER_WEIGHTS_FILE}"
        )
    return _read_safetensors(weights_path)


def _read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Small self-contained safetensors reader (float types incl. bfloat16; adapters are small)."""
    data = path.read_bytes()
    try:
        (header_len,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + header_len])
    except (struct.error, ValueError, UnicodeDecodeError):
        raise AdapterFormatError(f"{path} is not a safetensors file (unreadable header); re-save the adapter") from None
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + header_len :]
    tensors = {}
    for name, info in header.items():
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise AdapterFormatError(
                f"{path}: tensor {name} has dtype {info['dtype']}; adapter weights must be floating point "
                f"({', '.join(_SAFETENSORS_DTYPES)})"
            )
        dtype, shape = _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"])
        start, end = info["data_offsets"]
        if end - start != math.prod(shape) * dtype.itemsize or end > len(body):
            raise AdapterFormatError(f"{path} is corrupt: tensor {name} does not fit its byte range; re-save it")
        tensors[name] = np.frombuffer(body[start:end], dtype=dtype).reshape(shape).copy()
    return tensors


# ---------------------------------------------------------------------------------------------
# The config: what is supported.
# ---------------------------------------------------------------------------------------------


def _is_set(value) -> bool:
    """True for a config entry that is present and not its null/empty default."""
    return value not in (None, False, {}, [], "")


def _check_supported(raw: Mapping[str, Any], where) -> None:
    """Refuse every PEFT option that changes the adapted model's function and is not modelled here."""
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterFormatError(
            f"{where}: peft_type {peft_type!r} is not supported; only LoRA adapters (\"peft_type\": \"LORA\") "
            "and the MoRA reference's adapters (\"LORA\" with \"use_mora\": true) can be loaded"
        )
    unsupported = {
        "use_dora": "DoRA adapters (use_dora: true)",
        "modules_to_save": "fully trained modules saved alongside the adapter (modules_to_save)",
        "rank_pattern": "per-module ranks (rank_pattern)",
        "alpha_pattern": "per-module alphas (alpha_pattern)",
        "layer_replication": "layer replication (layer_replication)",
        "lora_bias": "trained LoRA biases (lora_bias: true)",
        "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
        "use_qalora": "QA-LoRA (use_qalora: true)",
    }
    for key, what in unsupported.items():
        if _is_set(raw.get(key)):
            raise AdapterFormatError(
                f"{where}: {what} is not supported (found {key}={raw[key]!r}); merge the adapter into the base "
                "model with PEFT (merge_and_unload) and load the merged checkpoint with mora_jax.hf.load_llama"
            )
    bias = raw.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterFormatError(
            f"{where}: bias={bias!r} (trained biases) is not supported; only bias='none' adapters can be loaded. "
            "Merge the adapter with PEFT (merge_and_unload) and load the merged checkpoint instead"
        )
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{where}: 'r' must be a positive int (the LoRA rank), got {r!r}")
    if raw.get("use_mora"):
        mora_type = raw.get("mora_type", 1)  # the reference's default
        if isinstance(mora_type, bool) or mora_type not in ops.MORA_TYPES:
            raise AdapterFormatError(
                f"{where}: unknown mora_type {mora_type!r}; MoRA defines types {ops.MORA_TYPES} "
                "(1 = sharing, for large r; 6 = RoPE-based, for small r)"
            )
    else:
        alpha = raw.get("lora_alpha", 8)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise AdapterFormatError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    dropout = raw.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterFormatError(f"{where}: lora_dropout must be in [0, 1), got {dropout!r}")


def _targets_pattern(target_modules) -> str | None:
    """Regex over ``/``-joined param paths equivalent to PEFT's list matching, or None for a str.

    PEFT adapts a module whose name equals a listed entry or ends with ``.<entry>``.
    """
    if not isinstance(target_modules, (list, tuple)) or not target_modules:
        return None
    alternatives = sorted(re.escape("/".join(_module_to_path(str(t)))) for t in target_modules)
    return rf"(?:.*/)?(?:{'|'.join(alternatives)})/kernel"


# ---------------------------------------------------------------------------------------------
# load_adapter
# ---------------------------------------------------------------------------------------------


def _resolve_module(module: str, flat_params: Mapping[Path, Any]) -> tuple[Path, int | None] | None:
    """``(kernel path in params, layer index or None)`` for a HF module name, or None if absent.

    For scanned params (``model/layers`` with a leading layer axis) the per-layer name
    ``model.layers.3.x`` resolves to the stacked kernel ``model/layers/x/kernel`` at index 3.
    """
    path = _module_to_path(module) + ("kernel",)
    if path in flat_params:
        return path, None
    for i, part in enumerate(path):
        match = _LAYER_PART.fullmatch(part)
        if match:
            stacked = path[:i] + ("layers",) + path[i + 1 :]
            if stacked in flat_params:
                return stacked, int(match.group(1))
    return None


def _group_tensors(tensors: Mapping[str, np.ndarray], where) -> dict[str, dict[str, np.ndarray]]:
    """``{HF module name: {'lora_A': array, 'lora_B': array}}``; unknown tensor names are an error."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for name, array in tensors.items():
        match = _TENSOR_NAME.fullmatch(name)
        if match is None:
            unknown.append(name)
            continue
        modules.setdefault(match.group("module"), {})[match.group("part")] = array
    if unknown:
        raise AdapterFormatError(
            f"{where}: {len(unknown)} tensor(s) are not LoRA/MoRA weights "
            f"(expected '{TENSOR_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'): {sorted(unknown)[:10]}; "
            "adapters with other trained tensors (DoRA magnitudes, embeddings, biases, modules_to_save) "
            "are not supported"
        )
    if not modules:
        raise AdapterFormatError(f"{where}: the file holds no adapter tensors")
    return modules


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


def _lora_matrices(module: str, parts, k: int, d: int, r: int, where) -> tuple[np.ndarray, np.ndarray]:
    """``(a (k, r), b (r, d))`` float32 from PEFT's ``lora_A.weight (r, k)``, ``lora_B.weight (d, r)``."""
    for part in ("lora_A", "lora_B"):
        if part not in parts:
            raise AdapterFormatError(f"{where}: {TENSOR_PREFIX}{module}.{part}.weight is missing")
    a_t, b_t = parts["lora_A"], parts["lora_B"]
    if a_t.shape != (r, k) or b_t.shape != (d, r):
        raise AdapterFormatError(
            f"{where}: module {module} has lora_A.weight {a_t.shape} and lora_B.weight {b_t.shape}, but the base "
            f"layer maps {k} -> {d} features and r={r}, so they should be {(r, k)} and {(d, r)}; the adapter was "
            "trained for another base model or adapter_config.json has the wrong r"
        )
    return np.ascontiguousarray(a_t.astype(np.float32).T), np.ascontiguousarray(b_t.astype(np.float32).T)


def load_adapter(path, params) -> tuple[MoRAConfig | LoRAConfig, dict]:
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
    directory = _adapter_dir(path)
    where = str(directory)
    raw = read_adapter_config(directory)
    _check_supported(raw, where)
    modules = _group_tensors(read_adapter_tensors(directory), where)

    use_mora = bool(raw.get("use_mora"))
    r = int(raw["r"])
    mora_type = int(raw.get("mora_type", 1))
    alpha = float(raw.get("lora_alpha", 8))
    rslora = bool(raw.get("use_rslora", False))
    dropout = float(raw.get("lora_dropout", 0.0) or 0.0)

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
        if use_mora:
            value = _mora_matrix(module, modules[module], k, d, r, mora_type, where)
        else:
            value = _lora_matrices(module, modules[module], k, d, r, where)
        per_kernel.setdefault(kernel_path, {})[layer] = (value, k, d)
    if unmatched:
        raise AdapterFormatError(
            f"{where}: {len(unmatched)} adapter module(s) map to no base parameter: {unmatched[:10]} "
            f"(looked for '<module path>/kernel' in params, e.g. {path_str(_module_to_path(unmatched[0]) + ('kernel',))}); "
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
        else:
            flat_adapters[kernel_path] = LoRAAdapter(
                a=_device_array(stack([a for a, _ in items])), b=_device_array(stack([b for _, b in items])),
                in_features=k, out_features=d, alpha=alpha, rslora=rslora, dropout=dropout,
            )

    targets = _config_targets(raw.get("target_modules"), flat_params, set(flat_adapters))
    if use_mora:
        config = MoRAConfig(r=r, mora_type=mora_type, targets=targets, dropout=dropout)
    else:
        config = LoRAConfig(r=r, alpha=alpha, rslora=rslora, targets=targets, dropout=dropout)
    return config, unflatten(flat_adapters)


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


def _target_modules(module_paths: list[Path]) -> list[str]:
    """PEFT ``target_modules``: short names (``q_proj``...) when layers ``0..n-1`` all have the same
    adapted modules (as the reference writes them), else the full module names (exact matches in PEFT).

    Without the base model the number of layers is unknown, so an adapter on layers ``0..n-1`` of a
    deeper model also gets short names; PEFT then adds zero-initialised (no-op) adapters to the rest.
    """
    by_name: dict[str, set] = {}
    layers_seen = set()
    uniform = True
    for module in module_paths:
        layer = [i for i, p in enumerate(module) if _LAYER_PART.fullmatch(p)]
        if len(layer) != 1:
            uniform = False
            break
        i = layer[0]
        layers_seen.add(module[i])
        by_name.setdefault(module[-1], set()).add((module[:i], module[i], module[i + 1 :]))
    if uniform and layers_seen != {f"layers_{i}" for i in range(len(layers_seen))}:
        uniform = False  # e.g. only layer 1 adapted: short names would make PEFT adapt layer 0 too
    if uniform:
        for entries in by_name.values():
            layers = {layer for _, layer, _ in entries}
            shapes = {(pre, post) for pre, _, post in entries}
            if layers != layers_seen or len(shapes) != 1:
                uniform = False
                break
    if uniform:
        return sorted(by_name)
    return sorted(_path_to_module(m) for m in module_paths)


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def _check_adapters_match(config, flat_adapters) -> None:
    for path, adapter in flat_adapters.items():
        if not is_adapter(adapter):
            raise TypeError(f"{path_str(path)} in the adapter tree is {type(adapter).__name__}, not an adapter")
        if path[-1] != "kernel":
            raise AdapterFormatError(
                f"adapter at {path_str(path)} is not on a 'kernel' parameter; PEFT files adapt whole Linear modules"
            )
        if isinstance(config, MoRAConfig):
            if not isinstance(adapter, MoRAAdapter) or (adapter.r, adapter.mora_type) != (config.r, config.mora_type):
                raise AdapterFormatError(
                    f"adapter at {path_str(path)} does not match the MoRAConfig(r={config.r}, mora_type="
                    f"{config.mora_type}) given to save_adapter ({_describe(adapter)}); pass the config the "
                    "adapters were created with"
                )
        else:
            if not isinstance(adapter, LoRAAdapter) or (adapter.r, adapter.alpha, adapter.rslora) != (
                config.r, float(config.alpha), bool(config.rslora)
            ):
                raise AdapterFormatError(
                    f"adapter at {path_str(path)} does not match the LoRAConfig(r={config.r}, alpha={config.alpha}, "
                    f"rslora={config.rslora}) given to save_adapter ({_describe(adapter)}); pass the config the "
                    "adapters were created with"
                )


def _describe(adapter) -> str:
    if isinstance(adapter, MoRAAdapter):
        return f"MoRA r={adapter.r}, type {adapter.mora_type}"
    return f"LoRA r={adapter.r}, alpha={adapter.alpha}, rslora={adapter.rslora}"


def peft_config_dict(config: MoRAConfig | LoRAConfig, target_modules, base_model_name_or_path: str = "") -> dict:
    """``adapter_config.json`` contents with every field the reference's PEFT fork writes."""
    if isinstance(config, MoRAConfig):
        mora_fields = {"use_mora": True, "mora_type": int(config.mora_type)}
        alpha = 8  # ignored by MoRA; the reference LoraConfig's default
        rslora = False
    else:
        mora_fields = {}
        alpha = _json_number(config.alpha)
        rslora = bool(config.rslora)
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": str(base_model_name_or_path),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": float(config.dropout),
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        **mora_fields,
        "peft_type": "LORA",
        "r": int(config.r),
        "rank_pattern": {},
        "revision": None,
        "target_modules": list(target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": rslora,
    }


def adapter_tensors(config: MoRAConfig | LoRAConfig, adapters) -> dict[str, np.ndarray]:
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
                tensors[_tensor_name(module, "lora_A")] = m_t
                tensors[_tensor_name(module, "lora_B")] = m_t.copy()  # the reference aliases B to A
        else:
            a = _per_layer(path, np.asarray(jax.device_get(adapter.a)))
            b = _per_layer(path, np.asarray(jax.device_get(adapter.b)))
            for (module, a_2d), (_, b_2d) in zip(a, b):
                tensors[_tensor_name(module, "lora_A")] = np.ascontiguousarray(a_2d.T)  # (r, k)
                tensors[_tensor_name(module, "lora_B")] = np.ascontiguousarray(b_2d.T)  # (d, r)
    return tensors


def save_adapter(
    path,
    config: MoRAConfig | LoRAConfig,
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
    if not isinstance(config, (MoRAConfig, LoRAConfig)):
        raise TypeError(f"config must be a MoRAConfig or LoRAConfig, got {type(config).__name__}")
    from safetensors.numpy import save_file

    tensors = adapter_tensors(config, adapters)  # validate before touching the disk
    modules = sorted({_module_to_path(n[len(TENSOR_PREFIX) :].rsplit(".", 2)[0]) for n in tensors})
    config_dict = peft_config_dict(config, _target_modules(modules), base_model_name_or_path)

    directory = pathlib.Path(path)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory; choose a directory path for the adapter")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{directory} is not empty; choose a new directory or pass overwrite=True to replace the adapter files"
        )
    directory.mkdir(parents=True, exist_ok=True)
    weights_path, config_path = directory / ADAPTER_WEIGHTS_FILE, directory / ADAPTER_CONFIG_FILE
    save_file(tensors, str(weights_path), metadata={"format": "pt"})
    config_path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    return [config_path, weights_path]


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "AdapterFormatError",
    "adapter_tensors",
    "load_adapter",
    "peft_config_dict",
    "read_adapter_config",
    "read_adapter_tensors",
    "save_adapter",
]

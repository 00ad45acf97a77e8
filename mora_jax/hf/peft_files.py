"""The Hugging Face PEFT adapter format: what the files hold and which of its options are supported.

The PEFT code is split in two by concern:

- this module knows the *files*: the names of the two files in an adapter directory, how a tensor
  name encodes the adapted module, how to read them safely, which ``adapter_config.json`` options
  change the adapted model's function in ways this project does not model, and what config the
  MoRA reference's fork of PEFT writes. It works on plain dicts and NumPy arrays and knows nothing
  of base models or adapter trees;
- ``mora_jax.hf.peft`` *converts* between those files and this project's adapter trees
  (``load_adapter`` / ``save_adapter``), checking shapes against a base model.

Both use ``mora_jax.hf.files`` for safetensors and for the HF-name <-> Flax-path mapping, which is
shared with ``mora_jax.hf``; none of them imports ``mora_jax.hf``.

The format
----------
A PEFT adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensors
are named ``base_model.model.<HF module>.lora_A.weight`` / ``.lora_B.weight`` (PEFT drops the
adapter name ``default`` when saving) in PyTorch layout:

- plain LoRA: ``lora_A.weight`` is ``Aᵀ`` ``(r, k)`` and ``lora_B.weight`` is ``Bᵀ`` ``(d, r)``, with
  ``Δy = scale·(x·A)·B`` and ``scale = mora_jax.ops.lora_scale(r, lora_alpha, use_rslora)``;
- DoRA (``"use_dora": true``): LoRA's two tensors plus ``lora_magnitude_vector`` ``(d,)`` per module
  (no ``.weight`` suffix), the magnitude of ``mora_jax.dora``;
- HiRA (``"peft_type": "HIRA"``, PEFT's ``HiraConfig``): ``hira_A`` ``(r, k)`` and ``hira_B`` ``(d, r)``
  per module (no ``.weight`` suffix), ``Aᵀ`` and ``Bᵀ`` of ``mora_jax.hira`` (``ΔW = W ⊙ (hira_B·hira_A)``,
  no scale); ``hira_dropout`` is its dropout;
- MoRA (the reference's fork of PEFT: ``"peft_type": "LORA"``, ``"use_mora": true``,
  ``"mora_type": t``): ``lora_A.weight`` is ``Mᵀ`` ``(r̂, r̂)`` and ``lora_B.weight`` is an identical
  copy (the reference aliases B to A). ``r̂`` is not stored; it follows from ``r``, the type and each
  layer's shape (``mora_jax.ops.rank_hat``), and ``lora_alpha`` is ignored.

``docs/mora.md`` describes the operators these matrices feed.
"""

from __future__ import annotations

import math
import pathlib
import re
from typing import Any, Mapping, Sequence

import numpy as np

from mora_jax import ops
from mora_jax.hf.files import (
    FLOAT_DTYPES,
    JSONFileError,
    Path,
    SafetensorsError,
    layer_index,
    non_finite_tensors,
    path_to_hf_name,
    read_json_object,
    read_safetensors,
)
from mora_jax.methods import DoRAConfig, HiRAConfig, LoRAConfig, MoRAConfig

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"
TENSOR_PREFIX = "base_model.model."
TENSOR_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector", "hira_A", "hira_B")
# Parts PEFT saves without a ``.weight`` suffix (nn.Parameter entries, not nn.Linear modules).
_BARE_PARTS = ("lora_magnitude_vector", "hira_A", "hira_B")
# PEFT saves DoRA's magnitude without a ``.weight`` suffix (older versions wrote ``.weight``).
_TENSOR_NAME = re.compile(
    r"base_model\.model\.(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|(?P<mag>lora_magnitude_vector)(?:\.weight)?"
    r"|(?P<hira>hira_A|hira_B))")


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be read into, or written from, this project's adapters.

    The message names the problem and what to do about it.
    """


# ---- Tensor names ------------------------------------------------------------------------------
def tensor_name(module_path: Path, part: str) -> str:
    """The PEFT tensor name of ``part`` (``'lora_A'`` or ``'lora_B'``) of the module at ``module_path``:
    ``('model', 'layers_0', 'self_attn', 'q_proj')`` -> ``'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'``."""
    return f"{TENSOR_PREFIX}{path_to_hf_name(module_path)}.{part_suffix(part)}"


def part_suffix(part: str) -> str:
    """How ``part`` ends a PEFT tensor name: ``'lora_A'`` -> ``'lora_A.weight'``, ``'hira_A'`` -> ``'hira_A'``."""
    if part not in TENSOR_PARTS:
        raise ValueError(f"part must be one of {TENSOR_PARTS}, got {part!r}")
    return part if part in _BARE_PARTS else f"{part}.weight"


def parse_tensor_name(name: str) -> tuple[str, str] | None:
    """``(HF module name, part)`` of a PEFT LoRA/MoRA/DoRA/HiRA tensor name (parts: :data:`TENSOR_PARTS`),
    or None for any other tensor: ``'base_model.model.model.layers.0.mlp.up_proj.lora_B.weight'``
    -> ``('model.layers.0.mlp.up_proj', 'lora_B')``."""
    match = _TENSOR_NAME.fullmatch(name)
    return (match.group("module"), match.group("part") or match.group("mag") or match.group("hira")) if match else None


# ---- Reading the files -------------------------------------------------------------------------
def adapter_directory(path) -> pathlib.Path:
    """``path`` as a ``pathlib.Path`` after checking that it is an existing directory."""
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
    directory = adapter_directory(path)
    config_path = directory / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"{config_path} not found (the directory holds: {found}); a PEFT adapter directory needs "
            f"{ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}, as written by save_pretrained() or save_adapter()"
        )
    try:
        return read_json_object(config_path, remedy="re-save the adapter")
    except JSONFileError as e:
        raise AdapterFormatError(str(e)) from None


def read_adapter_tensors(path) -> dict[str, np.ndarray]:
    """All tensors of ``<path>/adapter_model.safetensors`` by name, in the file's layout and dtype.

    Only floating-point tensors with finite values are accepted (NaN or inf would poison every
    model they are merged into); pickles (``adapter_model.bin``) are never read.
    """
    directory = adapter_directory(path)
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
    try:
        tensors = read_safetensors(weights_path, dtypes=FLOAT_DTYPES, remedy="re-save the adapter")
    except SafetensorsError as e:
        raise AdapterFormatError(f"{e} (adapter weights are floating-point tensors)") from None
    bad = non_finite_tensors(tensors)
    if bad:
        raise AdapterFormatError(
            f"{weights_path}: {len(bad)} tensor(s) hold NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); the adapter is unusable (did its training diverge?): "
            "use an earlier checkpoint of it"
        )
    return tensors


def group_tensors(tensors: Mapping[str, np.ndarray], where) -> dict[str, dict[str, np.ndarray]]:
    """``{HF module name: {'lora_A': array, 'lora_B': array}}``; a tensor that is not a LoRA/MoRA
    weight is an :class:`AdapterFormatError` (``where`` names the file in the message)."""
    modules: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for name, array in tensors.items():
        parsed = parse_tensor_name(name)
        if parsed is None:
            unknown.append(name)
            continue
        module, part = parsed
        modules.setdefault(module, {})[part] = array
    if unknown:
        raise AdapterFormatError(
            f"{where}: {len(unknown)} tensor(s) are not LoRA/MoRA weights "
            f"(expected '{TENSOR_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'): {sorted(unknown)[:10]}; "
            "adapters with other trained tensors (embeddings, biases, modules_to_save) "
            "are not supported"
        )
    if not modules:
        raise AdapterFormatError(f"{where}: the file holds no adapter tensors")
    return modules


# ---- The config: what is supported -------------------------------------------------------------
def _is_set(value) -> bool:
    """True for a config entry that is present and not its null/empty default."""
    return value not in (None, False, {}, [], "")


_UNSUPPORTED = {
    "modules_to_save": "fully trained modules saved alongside the adapter (modules_to_save)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "layer_replication": "layer replication (layer_replication)",
    "lora_bias": "trained LoRA biases (lora_bias: true)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "use_qalora": "QA-LoRA (use_qalora: true)",
}


# adapter_config.json fields this project reads, by the JSON type PEFT writes them as (null = unset).
_BOOLEAN_FIELDS = ("use_mora", "use_rslora", "use_dora", "fan_in_fan_out", "inference_mode", "lora_bias",
                   "use_qalora")
_INTEGER_FIELDS = ("r", "mora_type")
_NUMBER_FIELDS = ("lora_alpha", "lora_dropout", "hira_dropout")
_STRING_FIELDS = ("peft_type", "bias", "base_model_name_or_path", "task_type")


def _json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}" if math.isfinite(value) else f"the non-finite number {value!r}"
    kinds = {str: "string", list: "array", dict: "object"}
    text = repr(value) if isinstance(value, str) and len(value) <= 40 else ""
    return f"the {kinds.get(type(value), type(value).__name__)} {text}".rstrip()


def _check_types(raw: Mapping[str, Any], where) -> None:
    """Each field this project reads has the JSON type PEFT writes: a config typed by hand (``"use_mora":
    "no"``, ``"r": "8"``, ``"lora_alpha": Infinity``) is refused instead of read by Python's truthiness."""
    def wrong(key, expected):
        raise AdapterFormatError(
            f"{where}: {key} must be {expected}, got {_json_kind(raw[key])}; fix adapter_config.json (PEFT's "
            "save_pretrained writes it so)")

    for key in _BOOLEAN_FIELDS:
        if raw.get(key) is not None and not isinstance(raw[key], bool):
            wrong(key, "true or false (a JSON boolean)")
    for key in _INTEGER_FIELDS:
        if raw.get(key) is not None and (isinstance(raw[key], bool) or not isinstance(raw[key], int)):
            wrong(key, "a whole number")
    for key in _NUMBER_FIELDS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            wrong(key, "a finite number")
    for key in _STRING_FIELDS:
        if raw.get(key) is not None and not isinstance(raw[key], str):
            wrong(key, "a string")
    targets = raw.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        wrong("target_modules", "a list of module names or a regex string")


def check_supported(raw: Mapping[str, Any], where) -> None:
    """Raise :class:`AdapterFormatError` for a raw ``adapter_config.json`` that this project cannot
    load faithfully: a field of another JSON type than PEFT writes (``"use_mora": "no"``, a non-finite
    ``lora_alpha``), a PEFT type other than LoRA, any option that changes the adapted model's function
    and is not modelled here (DoRA, ``modules_to_save``, per-module ranks, trained biases, ...), or an
    invalid ``r``, ``mora_type``, ``lora_alpha`` or ``lora_dropout``. ``where`` names the adapter in
    the message. This is the one check of an adapter's config: ``load_adapter`` (merge, generate) and
    ``mora-jax info`` all go through it."""
    peft_type = raw.get("peft_type")
    if peft_type not in ("LORA", "HIRA"):
        raise AdapterFormatError(
            f"{where}: peft_type {peft_type!r} is not supported; only LoRA adapters (\"peft_type\": \"LORA\", "
            "DoRA with \"use_dora\": true), HiRA adapters (\"HIRA\") and the MoRA reference's adapters "
            "(\"LORA\" with \"use_mora\": true) can be loaded"
        )
    _check_types(raw, where)
    if peft_type == "HIRA":
        _check_hira(raw, where)
        return
    for key, what in _UNSUPPORTED.items():
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
    if raw.get("use_mora") and raw.get("use_dora"):
        raise AdapterFormatError(f"{where}: use_mora and use_dora (DoRA) are both set; a PEFT file is MoRA or DoRA, not both")
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


def _check_hira(raw: Mapping[str, Any], where) -> None:
    """The HiRA part of :func:`check_supported` (PEFT's ``HiraConfig`` fields)."""
    for key in ("modules_to_save", "rank_pattern"):
        if _is_set(raw.get(key)):
            raise AdapterFormatError(
                f"{where}: {_UNSUPPORTED[key]} is not supported (found {key}={raw[key]!r}); merge the adapter into "
                "the base model with PEFT (merge_and_unload) and load the merged checkpoint with mora_jax.hf.load_llama"
            )
    if raw.get("fan_in_fan_out"):
        raise AdapterFormatError(f"{where}: fan_in_fan_out is set (Conv1D weights, e.g. GPT-2); only LLaMA-style "
                                 "nn.Linear modules are supported")
    for key in ("use_mora", "use_dora"):
        if raw.get(key):
            raise AdapterFormatError(f"{where}: {key} is set in a HiRA (\"peft_type\": \"HIRA\") config; HiRA has "
                                     f"no such option: remove {key} or fix peft_type")
    r = raw.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{where}: 'r' must be a positive int (the HiRA rank), got {r!r}")
    dropout = raw.get("hira_dropout") or 0.0
    if not 0.0 <= dropout < 1.0:
        raise AdapterFormatError(f"{where}: hira_dropout must be in [0, 1), got {dropout!r}")


# ---- Writing the config ------------------------------------------------------------------------
def target_modules_for(module_paths: Sequence[Path]) -> list[str]:
    """PEFT ``target_modules`` for adapters on ``module_paths``: short names (``q_proj``...) when
    layers ``0..n-1`` all have the same adapted modules (as the reference writes them), else the full
    module names (exact matches in PEFT).

    Without the base model the number of layers is unknown, so an adapter on layers ``0..n-1`` of a
    deeper model also gets short names; PEFT then adds zero-initialised (no-op) adapters to the rest.
    """
    by_name: dict[str, set] = {}
    layers_seen = set()
    uniform = True
    for module in module_paths:
        layer = [i for i, p in enumerate(module) if layer_index(p) is not None]
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
    return sorted(path_to_hf_name(m) for m in module_paths)


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def peft_config_dict(config: MoRAConfig | LoRAConfig | DoRAConfig | HiRAConfig, target_modules,
                     base_model_name_or_path: str = "") -> dict:
    """``adapter_config.json`` contents, with every field the reference's PEFT fork writes, for a
    ``MoRAConfig`` (``"use_mora": true``; ``lora_alpha`` is written as the fork's unused default 8)
    or a ``LoRAConfig`` / ``DoRAConfig`` (``"use_dora": true``); for a ``HiRAConfig`` the fields of
    PEFT's ``HiraConfig`` (``"peft_type": "HIRA"``)."""
    if isinstance(config, HiRAConfig):
        return {
            "base_model_name_or_path": str(base_model_name_or_path),
            "exclude_modules": None,
            "fan_in_fan_out": False,
            "hira_dropout": float(config.dropout),
            "inference_mode": True,
            "init_weights": True,
            "layers_pattern": None,
            "layers_to_transform": None,
            "modules_to_save": None,
            "peft_type": "HIRA",
            "r": int(config.r),
            "rank_pattern": {},
            "revision": None,
            "target_modules": list(target_modules),
            "task_type": "CAUSAL_LM",
        }
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
        "use_dora": isinstance(config, DoRAConfig),
        "use_rslora": rslora,
    }


__all__ = [
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "PICKLE_WEIGHTS_FILE",
    "TENSOR_PARTS",
    "TENSOR_PREFIX",
    "AdapterFormatError",
    "adapter_directory",
    "check_supported",
    "group_tensors",
    "parse_tensor_name",
    "part_suffix",
    "peft_config_dict",
    "read_adapter_config",
    "read_adapter_tensors",
    "target_modules_for",
    "tensor_name",
]

"""A merged model as a Hugging Face directory: an adapter folded into its base (``K ← K + ΔK``).

- :func:`merge_adapter_dir`: a base model directory + a PEFT adapter directory -> a merged
  directory (``mora-jax merge`` is this function). Checks the paths before loading anything, the
  adapter's shapes against the base before reading the weights, and refuses NaN or infinite values
  in the base or the merged kernels; the base's tokenizer and generation config are copied beside
  the weights.
- :func:`save_merged`: parameters and adapters in memory -> a merged directory (a run's
  ``export/merged``, and the writing half of :func:`merge_adapter_dir`).
- :func:`checked_weights`: the checks every command that runs a base model with an adapter makes
  on the weights, so that ``mora-jax merge`` and ``mora-jax generate`` refuse the same inputs.

A problem with the inputs is a :class:`mora_jax.errors.UserError` whose one-line message names the
file and the fix; the messages name the command's options (``--out``, ``--overwrite``) as
``mora-jax merge`` prints them. Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
from typing import Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

from mora_jax.adapters import flatten, merge, path_str, unflatten
from mora_jax.errors import UserError
from mora_jax.hf.checkpoints import SAFE_WEIGHTS, load_llama, param_to_hf_tensor, read_config, save_llama
from mora_jax.hf.files import copy_file_atomic, read_json_object
from mora_jax.hf.peft import load_adapter
from mora_jax.methods import AdapterConfig
from mora_jax.models.config import LlamaConfig
from mora_jax.models.llama import LlamaForCausalLM, abstract_params

# Files copied unchanged from the base model directory into a merged checkpoint.
BASE_FILES_TO_COPY = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
OUT_DTYPES = ("float32", "bfloat16")  # what a merged model may be written as
_STORED_DTYPES = ("float32", "bfloat16", "float16")  # a base's config.json dtypes that are kept when loading


@dataclasses.dataclass(frozen=True)
class MergedDir:
    """What :func:`merge_adapter_dir` wrote: ``out_dir`` in ``dtype``, ``n_kernels`` kernels merged
    from an adapter of ``adapter_config``, and the base's files it copied (``copied``)."""

    out_dir: pathlib.Path
    dtype: str
    adapter_config: AdapterConfig
    n_kernels: int
    copied: tuple[str, ...]


def stored_dtype(base_dir: str | os.PathLike) -> str:
    """The base checkpoint's parameter dtype from ``config.json`` (``float32`` if unknown)."""
    config_path = pathlib.Path(base_dir) / "config.json"
    if not config_path.is_file():
        return "float32"  # load_llama reports a missing config.json itself
    hf_config = read_json_object(config_path, remedy="a Hugging Face config.json holds one JSON object")
    stored = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return stored if stored in _STORED_DTYPES else "float32"


def _first_non_finite(flat_params):
    """The first (sorted) floating-point leaf path of ``flat_params`` holding NaN or infinite values, or None."""
    for path in sorted(flat_params):
        x = flat_params[path]
        if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.isfinite(x).all()):
            return path
    return None


def checked_weights(base, adapter_dir, params, adapters, *, merged: bool, out_dtype=None) -> dict:
    """The checks every command that runs a base model (with an adapter) makes on its weights, so that
    ``merge`` and ``generate`` refuse the same inputs: NaN or infinite values in the base, and an adapter
    whose merge ``K + ΔK`` is not finite (in the kernel's dtype, or ``out_dtype``). The adapter's config
    and tensors were checked when it was read (``mora_jax.hf.peft_files.check_supported``,
    ``read_adapter_tensors``). Returns the flat parameters, with the adapters folded in when ``merged``.
    Kernels are merged one at a time (float32 accumulate, cast back to the kernel's dtype)."""
    base = pathlib.Path(base)
    flat_params = flatten(params)
    bad = _first_non_finite(flat_params)
    if bad is not None:
        where = base / SAFE_WEIGHTS if (base / SAFE_WEIGHTS).is_file() else base
        raise UserError(f"{where}: base tensor {param_to_hf_tensor(bad)[0]} holds NaN or infinite values; the "
                        "checkpoint is damaged or was saved from a diverged run (re-download it)")
    flat_adapters = flatten(adapters) if adapters else {}
    out = dict(flat_params)
    for path, adapter in tqdm(
        sorted(flat_adapters.items(), key=lambda kv: path_str(kv[0])),
        desc="merging" if merged else "checking the adapter", unit="kernel", disable=None, file=sys.stderr,
    ):  # one kernel at a time: K <- K + ΔK in float32, cast back to K's dtype
        kernel = flatten(merge(unflatten({path: flat_params[path]}), unflatten({path: adapter})))[path]
        if out_dtype is not None:
            kernel = jnp.asarray(kernel, out_dtype)
        if not bool(jnp.isfinite(kernel).all()):
            dtype = jnp.dtype(kernel.dtype).name
            raise UserError(f"merging {adapter_dir} into {base} gives NaN or infinite values in "
                            f"{param_to_hf_tensor(path)[0]} ({dtype}); the adapter's values are too large for "
                            "this base" + (" (nothing was written)" if merged else ""))
        if merged:
            out[path] = kernel
    return out


def _check_writable(out: pathlib.Path) -> None:
    """``out`` (or, if it does not exist yet, its nearest existing parent) must be a writable directory."""
    target = out
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir() or not os.access(target, os.W_OK | os.X_OK):
        where = f"--out {out}" if target == out else f"--out {out}: its parent directory {target}"
        raise UserError(f"{where} is not writable; choose a directory you can write to")


def _check_paths(base: pathlib.Path, adapter: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
    """Fail fast, before loading anything, on paths that cannot work."""
    for what, directory in (("base model", base), ("adapter", adapter)):
        if not directory.is_dir():
            raise UserError(f"{what} directory {directory} does not exist or is not a directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.resolve() in (base.resolve(), adapter.resolve()):
        raise UserError(f"--out {out} is the base model or adapter directory; write the merged model elsewhere")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output directory {out} is not empty; choose a new directory or pass --overwrite to replace "
            "the model files in it"
        )
    _check_writable(out)


def save_merged(out_dir, model_or_config: LlamaForCausalLM | LlamaConfig, params, adapters=None, *,
                base_dir=None, overwrite: bool = False) -> tuple[str, ...]:
    """Write ``params`` with ``adapters`` folded in (none: ``params`` as they are) to ``out_dir`` as a
    Hugging Face checkpoint (:func:`mora_jax.hf.checkpoints.save_llama`: same dtypes, same refusal of
    a non-empty directory without ``overwrite``), then copy :data:`BASE_FILES_TO_COPY` found in
    ``base_dir`` beside it (a symlink at the destination is replaced, never written through).
    Returns the names copied. Several processes: every one calls it, process 0 writes."""
    out_dir = pathlib.Path(out_dir)
    save_llama(out_dir, model_or_config, params if adapters is None else merge(params, adapters), overwrite=overwrite)
    if base_dir is None:
        return ()
    copied = tuple(name for name in BASE_FILES_TO_COPY if (pathlib.Path(base_dir) / name).is_file())
    if jax.process_index() == 0:
        for name in copied:
            copy_file_atomic(pathlib.Path(base_dir) / name, out_dir / name)
    return copied


def merge_adapter_dir(base_dir, adapter_dir, out_dir, *, dtype: str | None = None, overwrite: bool = False,
                      allow_pickle: bool = False, log: Callable[[str], None] | None = None) -> MergedDir:
    """Fold the PEFT adapter in ``adapter_dir`` (MoRA reference format or plain LoRA) into the
    Hugging Face checkpoint in ``base_dir`` and write the merged model to ``out_dir`` (plus the
    base's generation config and tokenizer files), in ``dtype`` (one of :data:`OUT_DTYPES`; default:
    the base's stored dtype).

    Refuses, as a :class:`mora_jax.errors.UserError` and before writing anything: a missing base or
    adapter directory, an ``out_dir`` that is the base or the adapter, a non-empty ``out_dir``
    without ``overwrite`` (which replaces the model files and keeps the others), an unwritable one,
    an adapter that does not fit the base, and NaN or infinite values in the base or the merged
    kernels. Pickle checkpoints in the base are read only with ``allow_pickle``. ``log`` receives
    the progress lines (loading, writing) and the pickle warning."""
    base, adapter_dir, out = pathlib.Path(base_dir), pathlib.Path(adapter_dir), pathlib.Path(out_dir)
    log = log or (lambda message: None)
    if dtype is not None and dtype not in OUT_DTYPES:
        raise UserError(f"dtype {dtype!r} is not one a merged model is written as: choose one of {OUT_DTYPES}")
    _check_paths(base, adapter_dir, out, overwrite)
    # Check the adapter against the base's shapes before spending time loading the weights.
    load_adapter(adapter_dir, abstract_params(read_config(base)))

    stored = stored_dtype(base)
    out_dtype = dtype or stored
    # Merge at the checkpoint's precision when it is kept; otherwise in float32, then cast once.
    load_dtype = stored if out_dtype == stored else "float32"
    if allow_pickle:
        log("mora-jax: warning: --allow-pickle: pickle checkpoints (*.bin) in the base are read with "
            "torch.load(weights_only=True); unpickling files you do not trust can still be unsafe")
    log(f"loading base model {base} ({load_dtype})")
    model, params = load_llama(base, param_dtype=load_dtype, allow_pickle=allow_pickle)
    adapter_config, adapters = load_adapter(adapter_dir, params)
    n_kernels = len(flatten(adapters))
    flat_params = checked_weights(base, adapter_dir, params, adapters, merged=True,
                                  out_dtype=out_dtype if out_dtype != load_dtype else None)
    if out_dtype != load_dtype:
        flat_params = {p: jnp.asarray(x, out_dtype) for p, x in flat_params.items()}
    merged_params = jax.block_until_ready(unflatten(flat_params))

    log(f"writing {out} ({out_dtype})")
    try:
        copied = save_merged(out, model.config.replace(param_dtype=out_dtype), merged_params, base_dir=base,
                             overwrite=overwrite)
    except PermissionError as e:
        raise UserError(f"cannot write {e.filename or out}: {e.strerror}; choose a directory you can write to") from None
    return MergedDir(out_dir=out, dtype=out_dtype, adapter_config=adapter_config, n_kernels=n_kernels, copied=copied)


__all__ = ["BASE_FILES_TO_COPY", "OUT_DTYPES", "MergedDir", "checked_weights", "merge_adapter_dir", "save_merged",
           "stored_dtype"]

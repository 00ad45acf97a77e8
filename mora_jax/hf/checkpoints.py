"""Hugging Face checkpoint I/O for LLaMA-family models (``config.json`` + safetensors): Llama 1–3.x,
Mistral and Qwen2 / 2.5 (``model_type`` ``llama``, ``mistral``, ``qwen2``; see
``mora_jax.models.config`` for what each may configure and what is refused).

Naming: a HF module name ``model.layers.3.self_attn.q_proj`` is the Flax tree path
``('model', 'layers_3', 'self_attn', 'q_proj')`` (``hf_name_to_path`` / ``path_to_hf_name``). HF
tensors are ``<module>.weight`` / ``<module>.bias``; a projection's ``weight`` ``(out, in)`` is the
Flax ``kernel`` ``(in, out)`` transposed, ``bias`` keeps its name and layout, ``embed_tokens.weight``
is ``embedding`` and norm weights keep ``weight``.

Loading reads one tensor (or, with shardings, one device's slice of it) at a time from memory-mapped
safetensors files, so a large model is never held twice in host memory. Pickle checkpoints
(``*.bin``) are refused unless ``allow_pickle=True``; remote code is never run.

The name mapping and the safetensors reader/writer are shared with the PEFT adapter code and live in
``mora_jax.hf.files``; PEFT adapter files are ``mora_jax.hf.peft``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from mora_jax import distributed
from mora_jax.hf.files import (
    Path,
    SafetensorsFile,
    hf_name_to_path,
    path_to_hf_name,
    read_json_object,
    write_safetensors,
    write_text_atomic,
)
from mora_jax.models.config import ARCHITECTURES, LlamaConfig
from mora_jax.models.llama import LlamaForCausalLM, abstract_params

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size="5GB"
# Tensors some LLaMA checkpoints carry that the model recomputes.
_IGNORED_TENSORS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONFIG_REMEDY = "a Hugging Face config.json holds one JSON object (save_pretrained writes it)"


# ---- Names -------------------------------------------------------------------------------------
def param_to_hf_tensor(path: Sequence[str]) -> tuple[str, bool]:
    """Parameter leaf path -> ``(HF tensor name, transpose?)``; e.g. ``.../q_proj/kernel`` ->
    ``('model.layers.0.self_attn.q_proj.weight', True)``, ``.../q_proj/bias`` ->
    ``('model.layers.0.self_attn.q_proj.bias', False)``."""
    *module, leaf = path
    if leaf not in ("kernel", "embedding", "weight", "bias"):
        raise ValueError(f"parameter {'/'.join(path)} has no Hugging Face counterpart")
    return path_to_hf_name(module) + (".bias" if leaf == "bias" else ".weight"), leaf == "kernel"


def _expected_tensors(config: LlamaConfig) -> dict[str, tuple[Path, tuple[int, ...], bool]]:
    """``{HF tensor name: (unrolled param path, Flax shape, transpose?)}`` for ``config``."""
    flat = traverse_util.flatten_dict(abstract_params(config.replace(scan_layers=False, remat_policy="none")))
    out = {}
    for path, leaf in flat.items():
        name, transpose = param_to_hf_tensor(path)
        out[name] = (path, tuple(leaf.shape), transpose)
    return out


# ---- Reading -------------------------------------------------------------------------------------
def _safetensors_reader(path: pathlib.Path) -> SafetensorsFile:
    return SafetensorsFile(path, remedy="re-download it")


class _TorchFile:
    """A pickle checkpoint read through ``torch.load(weights_only=True)`` (only with allow_pickle)."""

    def __init__(self, path: pathlib.Path):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"{path} is a PyTorch pickle checkpoint and reading it needs torch (pip install torch), "
                "or convert it to safetensors"
            ) from e
        self.path = path
        self._torch = torch
        try:
            try:  # zip-format checkpoints can be memory-mapped; legacy ones cannot
                self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:
                self.tensors = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
            # weights_only=True refuses a pickle that would build anything but tensors (e.g. call a
            # function): the file is not a plain state dict, or is damaged
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ValueError(
                f"{path} could not be read as a PyTorch state dict with torch.load(weights_only=True) ({reason[:200]}); "
                "it holds more than tensors or is damaged: convert a checkpoint you trust to safetensors, or "
                "re-download it"
            ) from None
        if not isinstance(self.tensors, Mapping):
            raise ValueError(f"{path} holds a {type(self.tensors).__name__}, not a state dict of tensors; re-download it")
        self.entries = {k: None for k, v in self.tensors.items() if isinstance(v, torch.Tensor)}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, index=()) -> np.ndarray:
        t = self.tensors[name][index]
        if t.dtype == self._torch.bfloat16:
            return t.float().numpy().astype(ml_dtypes.bfloat16)
        return t.numpy().copy()


class _Checkpoint:
    """All tensors of a (possibly sharded) checkpoint directory, by HF name."""

    def __init__(self, files: Mapping[str, Any]):
        self._file_of = files  # name -> file reader

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file_of[name].shape(name)

    def read(self, name: str, index=()) -> np.ndarray:
        return self._file_of[name].read(name, index)


def _open_files(directory: pathlib.Path, files: Sequence[str], reader) -> _Checkpoint:
    by_name = {}
    for fname in files:
        if os.path.basename(fname) != fname:
            raise ValueError(f"checkpoint index in {directory} names a file outside it: {fname!r}")
        fpath = directory / fname
        if not fpath.is_file():
            raise FileNotFoundError(f"checkpoint file {fpath} (listed in the index) is missing; re-download it")
        f = reader(fpath)
        by_name.update({name: f for name in f.entries})
    return _Checkpoint(by_name)


def _index_files(index_path: pathlib.Path) -> list[str]:
    weight_map = read_json_object(index_path, remedy="re-download it").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index_path} has no \"weight_map\" object of tensor name -> file name; re-download it")
    return sorted(set(weight_map.values()))


def _open_checkpoint(directory: pathlib.Path, allow_pickle: bool) -> _Checkpoint:
    if (directory / SAFE_INDEX).is_file():
        return _open_files(directory, _index_files(directory / SAFE_INDEX), _safetensors_reader)
    if (directory / SAFE_WEIGHTS).is_file():
        return _open_files(directory, [SAFE_WEIGHTS], _safetensors_reader)
    pickles = sorted(p.name for p in directory.iterdir() if p.name.endswith(_PICKLE_SUFFIXES))
    if not pickles:
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"no {SAFE_WEIGHTS} or {SAFE_INDEX} in {directory} (found: {found}); "
            "save the model with save_pretrained(safe_serialization=True)"
        )
    if not allow_pickle:
        raise ValueError(
            f"{directory} holds only pickle checkpoints ({', '.join(pickles)}); unpickling can run arbitrary "
            "code, so they are refused. Convert to safetensors (save_pretrained(safe_serialization=True)) "
            "or, if you trust the files, pass allow_pickle=True (mora-jax merge --allow-pickle)"
        )
    if (directory / "pytorch_model.bin.index.json").is_file():
        return _open_files(directory, _index_files(directory / "pytorch_model.bin.index.json"), _TorchFile)
    bins = [p for p in pickles if p.startswith("pytorch_model")] or pickles
    return _open_files(directory, bins, _TorchFile)


def read_config(path: str | os.PathLike, **overrides) -> LlamaConfig:
    """``LlamaConfig`` from ``<path>/config.json`` (validated; see ``LlamaConfig.from_hf_dict``)."""
    config_path = pathlib.Path(path) / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: load_llama needs a Hugging Face model directory")
    return LlamaConfig.from_hf_dict(read_json_object(config_path, remedy=_CONFIG_REMEDY), **overrides)


def _check_tensors(ckpt: _Checkpoint, expected: Mapping, config: LlamaConfig, directory) -> None:
    available = ckpt.names()
    missing = sorted(set(expected) - available)
    if missing:
        raise ValueError(
            f"checkpoint {directory} is missing {len(missing)} tensor(s) the config needs: {missing}; "
            "check that config.json matches the weights (model_type, num_hidden_layers, tie_word_embeddings, "
            "attention_bias / mlp_bias)"
        )
    ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unexpected = sorted(n for n in available - set(expected) - ignorable if not _IGNORED_TENSORS.search(n))
    if unexpected:
        raise ValueError(
            f"checkpoint {directory} has {len(unexpected)} tensor(s) a {ARCHITECTURES[config.model_type]} with "
            f"this config.json does not use: {unexpected[:20]}; check num_hidden_layers / the architecture "
            "(model_type, attention_bias / mlp_bias)"
        )
    bad = []
    for name, (_, shape, transpose) in expected.items():
        want = shape[::-1] if transpose else shape
        if tuple(ckpt.shape(name)) != want:
            bad.append(f"{name}: expected {want}, found {tuple(ckpt.shape(name))}")
    if bad:
        raise ValueError(
            f"checkpoint {directory} has misshapen tensors ({'; '.join(bad)}); config.json does not "
            "match the weights"
        )


def _leaf_reader(ckpt: _Checkpoint, names: Sequence[str], transpose: bool, stacked: bool, dtype):
    """``read(index) -> np.ndarray``: slice ``index`` (a full tuple of slices) of one Flax-layout leaf.

    ``names`` is one HF tensor, or one per layer for a stacked (scanned) leaf.
    """

    def read_one(name, index):
        if transpose:  # Flax kernel (in, out)[i, o] == HF weight (out, in)[o, i]
            return ckpt.read(name, index[::-1]).T
        return ckpt.read(name, index)

    def read(index):
        index = tuple(index)
        if stacked:
            arr = np.stack([read_one(names[i], index[1:]) for i in range(len(names))[index[0]]])
        else:
            arr = read_one(names[0], index)
        return np.ascontiguousarray(arr.astype(dtype))

    return read


def _sharding_lookup(shardings, mesh) -> Callable[[Path], Sharding | None]:
    def to_sharding(s):
        if isinstance(s, PartitionSpec):
            if mesh is None:
                raise ValueError("shardings given as PartitionSpecs need mesh=...")
            return NamedSharding(mesh, s)
        return s

    if shardings is None:
        default = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
        return lambda path: default
    if callable(shardings) and not isinstance(shardings, (Mapping, Sharding)):
        return lambda path: to_sharding(shardings(path))
    leaves = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: x is None or isinstance(x, (Sharding, PartitionSpec))
    )[0]
    table = {tuple(str(getattr(k, "key", k)) for k in kp): to_sharding(s) for kp, s in leaves}

    def lookup(path):
        if path not in table:
            raise ValueError(f"shardings has no entry for parameter {'/'.join(path)}; it must mirror the params tree")
        return table[path]

    return lookup


def load_llama(
    path: str | os.PathLike,
    dtype=jnp.float32,
    param_dtype=None,
    mesh: jax.sharding.Mesh | None = None,
    shardings=None,
    allow_pickle: bool = False,
    scan_layers: bool = False,
    config_overrides: Mapping[str, Any] | None = None,
) -> tuple[LlamaForCausalLM, dict]:
    """Load a HF Llama / Mistral / Qwen2 directory; returns ``(LlamaForCausalLM, params)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or a sharded
        ``model.safetensors.index.json``).
      dtype: compute dtype of the model.
      param_dtype: dtype of the returned parameters; ``None`` = the checkpoint's ``torch_dtype``
        (float32 / bfloat16 / float16), else float32.
      mesh: with no ``shardings``, replicate every parameter over this mesh; also turns
        ``PartitionSpec`` leaves of ``shardings`` into ``NamedSharding``s.
      shardings: pytree mirroring the params (of ``Sharding`` or ``PartitionSpec``), or a callable
        ``path tuple -> Sharding`` (``None`` = default device). Each device reads only its slice.
      allow_pickle: permit ``pytorch_model*.bin`` (via ``torch.load(weights_only=True)``).
      scan_layers: return stacked layers (``model/layers``) for an ``nn.scan`` model.
      config_overrides: other ``LlamaConfig`` fields to set (e.g. ``remat_policy``).
    """
    directory = pathlib.Path(path)
    config_path = directory / "config.json"
    hf_config = read_json_object(config_path, remedy=_CONFIG_REMEDY) if config_path.is_file() else None
    if param_dtype is None:
        stored = (hf_config or {}).get("torch_dtype") or (hf_config or {}).get("dtype")
        param_dtype = stored if stored in ("float32", "bfloat16", "float16") else jnp.float32
    config = read_config(
        directory, dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers, **(config_overrides or {})
    )
    ckpt = _open_checkpoint(directory, allow_pickle)
    expected = _expected_tensors(config)
    _check_tensors(ckpt, expected, config, directory)

    name_of = {p: n for n, (p, _, _) in expected.items()}
    transposed = {p: t for _, (p, _, t) in expected.items()}
    sharding_of = _sharding_lookup(shardings, mesh)
    target = traverse_util.flatten_dict(abstract_params(config))
    flat = {}
    for leaf_path, leaf in target.items():
        stacked = leaf_path[:2] == ("model", "layers")
        if stacked:
            unrolled = [("model", f"layers_{i}") + leaf_path[2:] for i in range(config.num_hidden_layers)]
        else:
            unrolled = [leaf_path]
        read = _leaf_reader(ckpt, [name_of[p] for p in unrolled], transposed[unrolled[0]], stacked, leaf.dtype)
        sharding = sharding_of(leaf_path)
        if sharding is None:
            flat[leaf_path] = jax.device_put(read((slice(None),) * len(leaf.shape)))
        else:
            flat[leaf_path] = jax.make_array_from_callback(leaf.shape, sharding, read)
    return LlamaForCausalLM(config), traverse_util.unflatten_dict(flat)


# ---- Writing -------------------------------------------------------------------------------------
def _hf_tensor_getters(config: LlamaConfig, params) -> dict[str, tuple[Callable[[], np.ndarray], int]]:
    """``{HF name: (fetch() -> HF-layout numpy array, nbytes)}``, validated against ``config``.

    Fetching is lazy (one tensor at a time to host); scanned (stacked) leaves are sliced per layer.
    The tied LM head is omitted, as ``save_pretrained`` does.
    """
    expected = _expected_tensors(config)
    getters = {}
    for path, leaf in traverse_util.flatten_dict(params).items():
        if path[:2] == ("model", "layers"):
            items = [(("model", f"layers_{i}") + path[2:], leaf, i) for i in range(leaf.shape[0])]
        else:
            items = [(path, leaf, None)]
        for unrolled, arr, layer in items:
            name, transpose = param_to_hf_tensor(unrolled)
            shape = tuple(arr.shape[1:] if layer is not None else arr.shape)
            if name in expected and shape != expected[name][1]:
                raise ValueError(f"parameter {'/'.join(unrolled)} has shape {shape}, the config expects {expected[name][1]}")

            def fetch(arr=arr, layer=layer, transpose=transpose):  # gathers arrays spread over processes
                host = distributed.fetch(arr if layer is None else arr[layer])
                return np.ascontiguousarray(host.T if transpose else host)

            getters[name] = (fetch, math.prod(shape) * np.dtype(arr.dtype).itemsize)
    missing, extra = sorted(set(expected) - set(getters)), sorted(set(getters) - set(expected))
    if missing or extra:
        raise ValueError(
            f"params do not match the config: missing {missing}, unexpected {extra}; "
            "pass the config the params were created with"
        )
    return getters


def params_to_hf_tensors(config: LlamaConfig, params) -> dict[str, np.ndarray]:
    """HF state dict (numpy arrays in HF layout) of ``params`` (unrolled or scanned)."""
    return {name: fetch() for name, (fetch, _) in _hf_tensor_getters(config, params).items()}


def _plan_shards(nbytes: Mapping[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name in sorted(nbytes):
        if current and size + nbytes[name] > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes[name]
    return shards + [current] if current else shards


def save_llama(
    path: str | os.PathLike,
    model_or_config: LlamaForCausalLM | LlamaConfig,
    params,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[pathlib.Path]:
    """Write ``config.json`` + safetensors weights that ``transformers`` and ``load_llama`` read.

    Above ``max_shard_bytes`` the weights are split into ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``. Tensors keep the parameters' dtype. Refuses an existing
    non-empty directory unless ``overwrite=True`` (which replaces config.json and model*.safetensors
    and keeps other files). Returns the written files.

    Several processes: process 0 alone writes. When ``params`` are sharded across processes, every
    process must call this (each tensor is gathered to the hosts in turn, never the whole model at
    once) and all return when the files are complete; an error on process 0 is raised everywhere.
    """
    config = model_or_config.config if isinstance(model_or_config, LlamaForCausalLM) else model_or_config
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"model_or_config must be a LlamaForCausalLM or LlamaConfig, got {type(config).__name__}")
    getters = _hf_tensor_getters(config, params)  # validate before touching the disk
    directory = pathlib.Path(path)
    writer, collective = jax.process_index() == 0, distributed.spans_processes(params)
    error = None
    if writer:
        try:
            _prepare_directory(directory, overwrite)
        except OSError as e:
            error = e
    if collective and not distributed.all_processes_agree(error is None):
        raise error or RuntimeError(f"process 0 could not write {directory} (see its error); nothing was saved")
    if error is not None:
        raise error

    nbytes = {name: n for name, (_, n) in getters.items()}
    embed_dtype = traverse_util.flatten_dict(params)[("model", "embed_tokens", "embedding")].dtype
    hf_config = {**config.to_hf_dict(), "torch_dtype": np.dtype(embed_dtype).name}
    shards = _plan_shards(nbytes, max_shard_bytes)
    written = []
    if len(shards) == 1:
        names = [SAFE_WEIGHTS]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, shard in zip(names, shards):  # one shard in host memory at a time
        if writer or collective:
            tensors = {n: getters[n][0]() for n in shard}
        if writer:
            write_safetensors(directory / fname, tensors)
        written.append(directory / fname)
    if len(shards) > 1:
        weight_map = {n: fname for fname, shard in zip(names, shards) for n in shard}
        index = {"metadata": {"total_size": int(sum(nbytes.values()))}, "weight_map": weight_map}
        if writer:
            write_text_atomic(directory / SAFE_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(directory / SAFE_INDEX)
    if writer:
        write_text_atomic(directory / "config.json", json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    written.append(directory / "config.json")
    if collective:
        distributed.barrier(f"save_llama:{directory}")
    return written


def _prepare_directory(directory: pathlib.Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{directory} is not empty; choose a new directory or pass overwrite=True to replace the model files"
            )
        for old in directory.iterdir():
            if old.name == "config.json" or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", old.name):
                old.unlink()
    directory.mkdir(parents=True, exist_ok=True)


__all__ = ["DEFAULT_MAX_SHARD_BYTES", "SAFE_INDEX", "SAFE_WEIGHTS", "load_llama", "param_to_hf_tensor",
           "params_to_hf_tensors", "read_config", "save_llama"]

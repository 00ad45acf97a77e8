"""The Hugging Face on-disk format shared by model checkpoints and adapter files.

Two readers need the same two things: ``mora_jax.hf`` (LLaMA checkpoints, ``config.json`` +
``model*.safetensors``) and ``mora_jax.hf.peft`` (PEFT adapters, ``adapter_model.safetensors``). Both
live here, once, so that neither of those modules imports the other:

- **Names.** A HF module name ``model.layers.3.self_attn.q_proj`` is the Flax tree path
  ``('model', 'layers_3', 'self_attn', 'q_proj')``: Flax's ``nn.Module`` lists name the
  ``i``-th layer ``layers_i`` where PyTorch's ``ModuleList`` writes ``layers.i``. Every other dotted
  part maps one to one. :func:`hf_name_to_path` and :func:`path_to_hf_name` are inverses on
  unrolled trees; a scanned tree (one ``layers`` node with a leading layer axis) names no single
  layer, so it is refused.
- **Safetensors.** An 8-byte little-endian header length, a JSON header (``name -> dtype, shape,
  data_offsets``) and the raw bytes. :class:`SafetensorsFile` reads it with a memory map and copies
  only what is asked for (one tensor, or one device's slice of one), which keeps a large model from
  being held twice in host memory. It is our own reader rather than
  ``safetensors.safe_open(framework='np')`` because that one cannot return bfloat16.
  :func:`write_safetensors` writes with the ``safetensors`` package and the ``{"format": "pt"}``
  metadata that ``transformers`` and PEFT expect.
- **Files.** Every file is written to a temporary name in its directory and renamed into place
  (:func:`atomic_write`), so a crash leaves no half-written file and a symlink at the destination is
  replaced, never followed out of the directory; files get the usual ``0o666 & ~umask`` mode.
  :func:`read_json_object` reads a JSON file whose errors name the file.

This module depends only on NumPy, ``ml_dtypes`` and (for writing) ``safetensors``: no JAX, no
model, no adapter code, so it can sit at the bottom of the import graph.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import secrets
import shutil
import struct
from typing import Callable, Mapping, Sequence

import ml_dtypes
import numpy as np

Path = tuple[str, ...]  # a parameter tree path, e.g. ('model', 'layers_0', 'self_attn', 'q_proj', 'kernel')

SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype(bool),
}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # what trained adapter weights may be stored as

_LAYER_PART = re.compile(r"layers_(\d+)")


# ---- Names -------------------------------------------------------------------------------------
def layer_index(part: str) -> int | None:
    """The layer number of a Flax path component ``'layers_<i>'``, or None for any other component."""
    match = _LAYER_PART.fullmatch(str(part))
    return int(match.group(1)) if match else None


def hf_name_to_path(name: str) -> Path:
    """``'model.layers.0.self_attn.q_proj'`` -> ``('model', 'layers_0', 'self_attn', 'q_proj')``."""
    parts = name.split(".")
    path, i = [], 0
    while i < len(parts):
        if parts[i] == "layers" and i + 1 < len(parts) and parts[i + 1].isdigit():
            path.append(f"layers_{int(parts[i + 1])}")
            i += 2
        else:
            path.append(parts[i])
            i += 1
    return tuple(path)


def path_to_hf_name(path: Sequence[str]) -> str:
    """``('model', 'layers_0', 'self_attn', 'q_proj')`` -> ``'model.layers.0.self_attn.q_proj'``."""
    parts = []
    for p in path:
        layer = layer_index(p)
        if layer is not None:
            parts += ["layers", str(layer)]
        elif p == "layers":
            raise ValueError(
                f"path {tuple(path)} is from a scanned (stacked-layer) tree and names no single layer; "
                "unstack it first (mora_jax.models.unstack_layers)"
            )
        else:
            parts.append(str(p))
    return ".".join(parts)


# ---- Files -------------------------------------------------------------------------------------
_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


class JSONFileError(ValueError):
    """A JSON file that cannot be read, or does not hold what it should; the message names the file."""


def read_json_object(path: str | os.PathLike, *, remedy: str) -> dict:
    """The JSON object in ``path``; :class:`JSONFileError` naming the file (and ``remedy``) when it
    is not valid JSON, not UTF-8, or holds another kind of JSON value."""
    path = pathlib.Path(path)
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise JSONFileError(f"{path} is not valid JSON ({e}); {remedy}") from None
    except RecursionError:
        raise JSONFileError(f"{path} is not a usable JSON file (its values are nested too deeply to read); "
                            f"{remedy}") from None
    if not isinstance(value, dict):
        kind = _JSON_TYPES.get(type(value), "null" if value is None else type(value).__name__)
        raise JSONFileError(f"{path} must hold a JSON object, got a JSON {kind}; {remedy}")
    return value


def _file_mode() -> int:
    """``0o666 & ~umask``: the mode ``open()`` gives a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Create ``path`` through ``write(temporary_path)``: the file is written under a temporary name
    in the same directory, synced, given the mode ``open()`` would give it, and renamed into place.
    A crash leaves no half-written ``path``; a symlink at ``path`` is replaced, not followed."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        write(tmp)
        os.chmod(tmp, _file_mode())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> pathlib.Path:
    """:func:`atomic_write` of a text file (UTF-8)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def copy_file_atomic(source: str | os.PathLike, destination: str | os.PathLike) -> pathlib.Path:
    """:func:`atomic_write` of a copy of ``source`` (its bytes; the mode is the usual one)."""
    return atomic_write(destination, lambda tmp: shutil.copyfile(source, tmp))


def is_temporary_file(name: str) -> bool:
    """Whether ``name`` is a temporary file :func:`atomic_write` left behind (a crash mid-write)."""
    return name.startswith(".") and ".tmp-" in name


# ---- Safetensors -------------------------------------------------------------------------------
def _is_count(value) -> bool:
    """A JSON integer >= 0 (not a bool, not a float such as ``1e400``)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

class SafetensorsError(ValueError):
    """A file that is not a readable safetensors file, or holds a tensor of a dtype not accepted."""


class SafetensorsFile:
    """A memory-mapped safetensors file; :meth:`read` copies only the requested tensor or slice.

    Args:
      path: the ``.safetensors`` file.
      dtypes: safetensors dtype names (``"F32"``, ``"BF16"``, ...) accepted; None accepts every
        dtype in :data:`SAFETENSORS_DTYPES`. A tensor of another dtype is a :class:`SafetensorsError`.
      remedy: advice appended to the messages about an unreadable or corrupt file.

    Attributes:
      entries: ``{name: (numpy dtype, shape, start, end)}`` from the header.
    """

    def __init__(self, path: str | os.PathLike, *, dtypes: Sequence[str] | None = None,
                 remedy: str = "re-download or re-write it"):
        self.path = path = pathlib.Path(path)
        allowed = tuple(SAFETENSORS_DTYPES) if dtypes is None else tuple(dtypes)
        file_size = path.stat().st_size
        unreadable = lambda why: SafetensorsError(f"{path} is not a safetensors file ({why}); {remedy}")  # noqa: E731
        if file_size < 8:
            raise unreadable("empty file" if file_size == 0 else f"only {file_size} bytes, shorter than its 8-byte header size")
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > file_size - 8:
                raise unreadable(f"its header size {n} is larger than the file")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise unreadable("its header is not valid JSON") from None
        except RecursionError:
            raise unreadable("its header's JSON is nested too deeply to read") from None
        if not isinstance(header, dict):
            kind = _JSON_TYPES.get(type(header), type(header).__name__)
            raise unreadable(f"its header is a JSON {kind}, not an object")
        header.pop("__metadata__", None)
        size = file_size - 8 - n
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 0 else np.zeros(0, np.uint8)
        self.entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info] if isinstance(info, dict) else []
            if missing or not isinstance(info, dict):
                what = f"lacks {', '.join(missing)}" if missing else "is malformed"
                raise SafetensorsError(f"{path} is corrupt: the header entry of {name} {what}; {remedy}")
            dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
            if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
                raise SafetensorsError(f"{path} is corrupt: tensor {name} has shape {_short(shape)}; a shape is a list "
                                       f"of non-negative integers; {remedy}")
            if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
                raise SafetensorsError(f"{path} is corrupt: tensor {name} has data_offsets {_short(offsets)}; they are "
                                       f"two non-negative integers [start, end]; {remedy}")
            shape, (start, end) = tuple(shape), offsets
            if not isinstance(dtype_name, str) or dtype_name not in allowed or dtype_name not in SAFETENSORS_DTYPES:
                raise SafetensorsError(
                    f"{path}: tensor {name} has dtype {dtype_name if isinstance(dtype_name, str) else _short(dtype_name)}; only {', '.join(allowed)} can be read here"
                )
            dtype = SAFETENSORS_DTYPES[dtype_name]
            if not 0 <= start <= end <= size or end - start != math.prod(shape) * dtype.itemsize:
                raise SafetensorsError(f"{path} is corrupt: tensor {name} does not fit its byte range; {remedy}")
            self.entries[name] = (dtype, shape, start, end)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` as stored."""
        return self.entries[name][1]

    def read(self, name: str, index=()) -> np.ndarray:
        """A copy of ``tensor[index]`` (the whole tensor by default), in the stored dtype."""
        dtype, shape, start, end = self.entries[name]
        return np.array(self._data[start:end].view(dtype).reshape(shape)[index])


def read_safetensors(path: str | os.PathLike, *, dtypes: Sequence[str] | None = None,
                     remedy: str = "re-download or re-write it") -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file by name, as NumPy arrays in the stored dtype and layout.

    ``dtypes`` and ``remedy`` are as for :class:`SafetensorsFile`; meant for small files (adapters).
    """
    f = SafetensorsFile(path, dtypes=dtypes, remedy=remedy)
    return {name: f.read(name) for name in f.entries}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray]) -> None:
    """Write ``tensors`` (NumPy arrays, any layout) to ``path`` with ``{"format": "pt"}`` metadata,
    as ``transformers`` and PEFT write theirs (through :func:`atomic_write`)."""
    from safetensors.numpy import save_file

    contiguous = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"}))


def non_finite_tensors(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the floating-point tensors holding NaN or infinite values (sorted)."""
    floats = {SAFETENSORS_DTYPES[k] for k in ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")}
    bad = []
    for name, t in tensors.items():
        t = np.asarray(t)
        if t.dtype in floats and not np.isfinite(t if t.dtype.kind == "f" else t.astype(np.float32)).all():
            bad.append(name)
    return sorted(bad)


__all__ = [
    "FLOAT_DTYPES",
    "SAFETENSORS_DTYPES",
    "JSONFileError",
    "Path",
    "SafetensorsError",
    "SafetensorsFile",
    "atomic_write",
    "copy_file_atomic",
    "hf_name_to_path",
    "is_temporary_file",
    "layer_index",
    "non_finite_tensors",
    "path_to_hf_name",
    "read_json_object",
    "read_safetensors",
    "write_safetensors",
    "write_text_atomic",
]

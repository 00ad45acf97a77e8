"""GGUF checkpoints (llama.cpp's format) in, without torch: :func:`load_gguf` gives the same
``(LlamaConfig, params)`` as a Hugging Face directory loaded with ``mora_jax.hf``, and
:func:`convert_gguf` writes that directory (``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``generation_config.json``). The file is read with the ``gguf`` package,
llama.cpp's own reader (``pip install gguf``).

What is read:

- **Architectures** (``general.architecture``): ``llama`` (Llama 1–3.x, SmolLM, and Mistral 7B,
  which llama.cpp also writes as ``llama``; a file whose name says Mistral becomes ``model_type``
  ``mistral``, without a sliding window, as llama.cpp runs it) and ``qwen2`` (q/k/v biases).
  Llama 3.1 / 3.2 files carry their ``llama3`` RoPE scaling as a ``rope_freqs`` tensor, which is
  recognised; ``rope.scaling.type = linear`` is read too.
- **Tensor types**: :data:`TENSOR_TYPES` (float, the 4/5/8-bit block types and the K-quants),
  dequantized to float32 by ``gguf.quants.dequantize``; with ``load_gguf(..., keep_quantized=True)``
  the projections' Q8_0 / Q4_0 / Q4_1 blocks are handed over as stored instead (:mod:`mora_jax.quant.gguf_blocks`).
- **Q/K rows**: llama.cpp's converter reorders the rows of each Llama query / key head from
  Hugging Face's "rotate half" layout (first half, second half) to interleaved pairs
  (:func:`permute_rows`); :func:`unpermute_rows` undoes it. Qwen2 files are not reordered.
- **Tokenizer**: ``mora_jax.gguf.tokenizer``.

Anything else (another architecture, an IQ / ternary quantization, an unknown tensor) is a
``ValueError`` naming it and what is supported.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from mora_jax.gguf.tokenizer import tokenizer_files
from mora_jax.hf.checkpoints import param_to_hf_tensor, save_llama
from mora_jax.hf.files import write_text_atomic
from mora_jax.methods import LLAMA_TARGETS
from mora_jax.models.config import LlamaConfig
from mora_jax.models.llama import abstract_params
from mora_jax.models.rope import RopeScaling, rope_inv_freq
from mora_jax.quant.gguf_blocks import KEPT_TYPES, kernel_from_blocks

ARCHITECTURES = ("llama", "qwen2")
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# GGUF tensor names -> Hugging Face module names (the layer ones under blk.N. / model.layers.N.).
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}  # fmt: skip
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# ---- The Q/K row order -------------------------------------------------------------------------
def permute_rows(w, n_heads: int):
    """llama.cpp's reordering of a Llama q/k projection (rows ``(n_heads·H, ...)``): within each head,
    rows ``(first half, second half)`` become interleaved pairs. Its inverse is :func:`unpermute_rows`."""
    w = np.asarray(w)
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w, n_heads: int):
    """The Hugging Face row order of a q/k projection stored by llama.cpp (inverse of :func:`permute_rows`)."""
    w = np.asarray(w)
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- Reading -------------------------------------------------------------------------------------
class GGUFFile:
    """An open GGUF file: metadata (:meth:`get`) and tensors by name (memory-mapped by ``gguf``)."""

    def __init__(self, path: str | os.PathLike):
        try:
            import gguf
        except ImportError as e:
            raise ImportError("reading GGUF files needs the gguf package (pip install gguf)") from e
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} not found")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise ValueError(f"{self.path} is not a readable GGUF file ({e}); re-download it") from None
        self._dequantize, self._types = gguf.quants.dequantize, gguf.GGMLQuantizationType
        self.tensors = {t.name: t for t in self._reader.tensors}
        self.architecture = self.get("general.architecture")

    def get(self, key: str, default: Any = KeyError) -> Any:
        """The value of metadata ``key`` (a list for an array); ``default`` when absent (else a ``ValueError``)."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is KeyError:
                raise ValueError(f"{self.path} has no GGUF metadata {key!r}; the file is incomplete or not a language model")
            return default
        return field.contents()

    def arch(self, key: str, default: Any = KeyError) -> Any:
        """``<architecture>.<key>``, e.g. ``arch('block_count')``."""
        return self.get(f"{self.architecture}.{key}", default)

    def tensor_type(self, name: str) -> str:
        return self._types(self.tensors[name].tensor_type).name

    def raw_rows(self, name: str) -> np.ndarray:
        """Tensor ``name``'s raw blocks as stored, ``(rows, bytes per row)`` uint8 (memory-mapped; one row
        per output feature of a weight), for the block types kept quantized
        (:data:`mora_jax.quant.gguf_blocks.KEPT_TYPES`)."""
        t = self.tensors[name]
        return np.asarray(t.data, np.uint8).reshape(int(np.prod([int(d) for d in t.shape[1:]])), -1)

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` dequantized to float32, in NumPy (= Hugging Face) layout."""
        t = self.tensors[name]
        return np.asarray(self._dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(int(d) for d in t.shape[::-1]))


def _hf_name(name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``)."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in GLOBAL_TENSORS:
        return f"{GLOBAL_TENSORS[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def _shortest(value) -> float:
    """A float32 metadata value as the shortest decimal that is that float32 (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _single(value, what: str, where):
    if isinstance(value, list):  # some architectures store one value per layer
        if len(set(value)) != 1:
            raise ValueError(f"{where}: {what} differs between layers ({value}); only uniform layers are supported")
        value = value[0]
    return value


def _rope_scaling(f: GGUFFile, head_dim: int, theta: float) -> RopeScaling | None:
    kind = f.arch("rope.scaling.type", "none")
    if "rope_freqs.weight" in f.tensors:  # Llama 3.1 / 3.2: the llama3 factors, precomputed per frequency
        factors = f.read("rope_freqs.weight").reshape(-1)
        candidate = RopeScaling(rope_type="llama3", factor=float(factors.max()), **_LLAMA3_ROPE)
        implied = rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, candidate)
        if kind != "none" or factors.shape != implied.shape or not np.allclose(factors, implied, rtol=1e-4):
            raise ValueError(f"{f.path}: its rope_freqs tensor (per-frequency RoPE factors) is not Llama 3.1's llama3 "
                             "scaling (factor, low 1, high 4, original context 8192); other RoPE factors are not supported")
        return candidate
    if kind == "none":
        return None
    if kind != "linear":
        raise ValueError(f"{f.path}: RoPE scaling {kind!r} is not supported; supported: none, linear, and Llama 3.1's "
                         "rope_freqs")
    return RopeScaling(rope_type="linear", factor=float(f.arch("rope.scaling.factor")))


def read_config(f: GGUFFile, **overrides) -> LlamaConfig:
    """The ``LlamaConfig`` a GGUF file describes (``ValueError`` naming what is not supported)."""
    if f.architecture not in ARCHITECTURES:
        raise ValueError(f"{f.path}: GGUF architecture {f.architecture!r} is not supported; supported: 'llama' (Llama "
                         "1-3.x, SmolLM, Mistral 7B) and 'qwen2'")
    unknown = sorted(n for n in f.tensors if n != "rope_freqs.weight" and _hf_name(n) is None)
    if unknown:
        raise ValueError(f"{f.path}: GGUF tensors {unknown[:5]} have no counterpart in a {f.architecture} model")
    bad = sorted({f.tensor_type(n) for n in f.tensors} - set(TENSOR_TYPES))
    if bad:
        raise ValueError(f"{f.path}: GGUF tensor type(s) {', '.join(bad)} are not supported; supported: "
                         f"{', '.join(TENSOR_TYPES)} (re-quantize the model to one of them, e.g. Q8_0)")
    heads = int(_single(f.arch("attention.head_count"), "attention.head_count", f.path))
    kv_heads = int(_single(f.arch("attention.head_count_kv", heads), "attention.head_count_kv", f.path))
    hidden = int(f.arch("embedding_length"))
    head_dim = int(f.arch("attention.key_length", hidden // heads))
    rotary = int(f.arch("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise ValueError(f"{f.path}: RoPE on {rotary} of {head_dim} head dimensions is not supported (only on all)")
    theta = _shortest(f.arch("rope.freq_base", 10000.0))
    names = f.get("general.name", "") + " " + f.get("general.basename", "")
    model_type = "qwen2" if f.architecture == "qwen2" else "mistral" if "mistral" in names.lower() else "llama"
    biased = model_type == "llama" and "blk.0.attn_q.bias" in f.tensors
    ids = {k: f.get(f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos", "padding", "eot", "eom")}
    eos = tuple(dict.fromkeys(i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None))
    if "token_embd.weight" not in f.tensors:
        raise ValueError(f"{f.path}: GGUF has no token_embd.weight (token embeddings); it is not a complete model")
    fields = dict(
        model_type=model_type, vocab_size=int(f.tensors["token_embd.weight"].shape[1]), hidden_size=hidden,
        intermediate_size=int(_single(f.arch("feed_forward_length"), "feed_forward_length", f.path)),
        num_hidden_layers=int(f.arch("block_count")), num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim if head_dim != hidden // heads else None,
        rms_norm_eps=_shortest(f.arch("attention.layer_norm_rms_epsilon")), rope_theta=theta,
        rope_scaling=_rope_scaling(f, head_dim, theta), max_position_embeddings=int(f.arch("context_length")),
        tie_word_embeddings="output.weight" not in f.tensors, attention_bias=biased,
        mlp_bias=model_type == "llama" and "blk.0.ffn_up.bias" in f.tensors, bos_token_id=ids["bos"],
        eos_token_id=eos[0] if len(eos) == 1 else eos or None, pad_token_id=ids["padding"],
    )
    return LlamaConfig(**{**fields, **overrides})


def _unpermuted(w, name: str, config: LlamaConfig):
    if config.model_type != "qwen2" and (".attn_q." in name or ".attn_k." in name):
        return unpermute_rows(w, config.num_attention_heads if ".attn_q." in name else config.resolved_kv_heads)
    return w


def hf_tensors(f: GGUFFile, config: LlamaConfig, keep=lambda name: False):
    """Yield ``(Hugging Face name, float32 array in Hugging Face layout)`` for each weight of the file;
    for the tensors ``keep(gguf name)`` selects, ``(name, (type name, raw rows))``: the blocks as
    stored (rows in Hugging Face order), not dequantized."""
    for name in f.tensors:
        if name == "rope_freqs.weight":
            continue
        if keep(name):
            yield _hf_name(name), (f.tensor_type(name), _unpermuted(f.raw_rows(name), name, config))
            continue
        yield _hf_name(name), _unpermuted(f.read(name), name, config)


def load_gguf(path: str | os.PathLike, *, param_dtype="float32", keep_quantized: bool = False,
              quantized_targets: str = LLAMA_TARGETS, **config_overrides) -> tuple[LlamaConfig, dict]:
    """Read a GGUF model; returns ``(LlamaConfig, params)`` with ``params`` in the form
    ``mora_jax.hf.load_llama`` gives them (unrolled layers, Flax layout, ``param_dtype``).

    ``keep_quantized``: the kernels ``quantized_targets`` matches (a regex over parameter paths; the
    seven projections) that the file stores as Q8_0 / Q4_0 / Q4_1 become
    :class:`~mora_jax.quant.formats.QuantizedKernel` leaves holding the file's blocks, not
    dequantized (QMoRA, ``docs/quantization.md``); every other tensor is dequantized as before.
    ``config_overrides`` set other ``LlamaConfig`` fields (e.g. ``dtype``, ``remat_policy``)."""
    f = GGUFFile(path)
    config = read_config(f, param_dtype=param_dtype, **config_overrides)
    leaves = traverse_util.flatten_dict(abstract_params(config.replace(scan_layers=False)))
    expected = {param_to_hf_tensor(p)[0]: (p, param_to_hf_tensor(p)[1]) for p in leaves}

    def keep(name: str) -> bool:
        hf = _hf_name(name)
        return (keep_quantized and f.tensor_type(name) in KEPT_TYPES and hf in expected
                and re.fullmatch(quantized_targets, "/".join(expected[hf][0])) is not None)

    flat = {}
    for name, w in hf_tensors(f, config, keep):
        if name not in expected:
            raise ValueError(f"{path}: tensor {name} (from GGUF) is not part of a {config.model_type} model with this "
                             "configuration")
        p, transpose = expected[name]
        if isinstance(w, tuple):  # raw blocks, rows = output features: the kernel (in, out) directly
            leaf = kernel_from_blocks(w[1], w[0], dtype=jax.numpy.dtype(leaves[p].dtype).name)
            if leaf.shape != leaves[p].shape:
                raise ValueError(f"{path}: tensor {name} has shape {leaf.shape[::-1]}, the model's metadata implies "
                                 f"{leaves[p].shape[::-1]}")
            flat[p] = leaf
            continue
        w = w.T if transpose else w
        if w.shape != leaves[p].shape:
            raise ValueError(f"{path}: tensor {name} has shape {w.shape}, the model's metadata implies {leaves[p].shape}")
        flat[p] = jax.device_put(np.ascontiguousarray(w.astype(leaves[p].dtype)))
    missing = sorted(expected[n][0] for n in expected if expected[n][0] not in flat)
    if missing:
        raise ValueError(f"{path}: GGUF lacks {len(missing)} tensor(s) the model needs, e.g. {'/'.join(missing[0])}")
    return config, traverse_util.unflatten_dict(flat)


# ---- Writing a Hugging Face directory -------------------------------------------------------------
def generation_config(f: GGUFFile, config: LlamaConfig) -> dict:
    """``generation_config.json``: the special ids, and the sampling settings the file recommends."""
    out: dict[str, Any] = {"bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id,
                           "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) > 1
                           else config.eos_token_id}
    sampling = {k: f.get(f"general.sampling.{k}", None) for k in ("temp", "top_k", "top_p")}
    if sampling["temp"] is not None:
        out.update(do_sample=sampling["temp"] > 0, temperature=float(sampling["temp"]))
    out.update({k: v for k, v in (("top_k", sampling["top_k"]), ("top_p", sampling["top_p"])) if v is not None})
    return {k: v for k, v in out.items() if v is not None}


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                 overwrite: bool = False) -> pathlib.Path:
    """Write the GGUF model as a Hugging Face directory (``config.json``, ``model.safetensors`` in
    ``dtype``, ``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
    ``generation_config.json``) that ``mora_jax.hf.load_llama``, ``Tokenizer`` and ``transformers`` read.

    Everything is checked before anything is written; a non-empty ``out_dir`` is refused unless
    ``overwrite`` (which replaces these files and keeps others). Returns ``out_dir``."""
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not an empty directory; choose a new one or pass overwrite=True")
    f = GGUFFile(gguf_path)
    config = read_config(f, param_dtype=dtype)
    files = tokenizer_files(f.get, where=str(f.path), model_max_length=config.max_position_embeddings)
    files["generation_config.json"] = json.dumps(generation_config(f, config), indent=2) + "\n"
    config, params = load_gguf(gguf_path, param_dtype=dtype)
    save_llama(out, config, params, overwrite=overwrite)
    for name, text in files.items():
        write_text_atomic(out / name, text)
    return out


__all__ = ["ARCHITECTURES", "GLOBAL_TENSORS", "LAYER_TENSORS", "TENSOR_TYPES", "GGUFFile", "convert_gguf",
           "generation_config", "hf_tensors", "load_gguf", "permute_rows", "read_config", "unpermute_rows"]

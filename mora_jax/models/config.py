"""``LlamaConfig``: the architecture of a LLaMA-family model (Llama 1–3.x, Mistral, Qwen2 / 2.5) in
Hugging Face field names, plus JAX execution options, and its ``config.json`` round trip.

The three families share one decoder (RMSNorm, rotary attention with grouped-query heads, SwiGLU
MLP); they differ only in what ``LlamaConfig`` records:

=============  ==============================================================================
``llama``      optional ``rope_scaling`` (``llama3`` / ``linear`` / ``dynamic``), ``attention_bias``
               (q/k/v/o biases) and ``mlp_bias``, tied embeddings, explicit ``head_dim``
``mistral``    ``sliding_window``: a query attends to the last ``sliding_window`` positions only
``qwen2``      biases on the q/k/v projections (not on o), large ``rope_theta``, tied embeddings
=============  ==============================================================================

Anything a checkpoint's ``config.json`` asks for that the model does not implement is refused by
:meth:`LlamaConfig.from_hf_dict` with a message listing what is supported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax.models.attention import check_implementation as check_attention
from mora_jax.models.rope import RopeScaling

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# model_type -> the HF causal-LM class of that family.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MODEL_TYPES = tuple(ARCHITECTURES)
# "none": no rematerialisation; "full": recompute everything (save only layer inputs);
# "projections": save each projection's output (adapter included: y + Δy), recompute the rest;
# any other name is a ``jax.checkpoint_policies`` attribute (e.g. "dots_saveable").
PROJECTION_NAME = "projection"  # jax.ad_checkpoint.checkpoint_name of every projection's output
REMAT_POLICIES = (
    "none",
    "full",
    "projections",
    "nothing_saveable",
    "everything_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots",
    "checkpoint_dots_with_no_batch_dims",
)


def _as_dtype(value, field: str) -> np.dtype:
    try:
        dtype = jnp.dtype(value)
    except TypeError as e:
        raise ValueError(f"LlamaConfig.{field}={value!r} is not a dtype; use one of {SUPPORTED_DTYPES}") from e
    if dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"LlamaConfig.{field}={dtype.name} is not supported; use one of {SUPPORTED_DTYPES}")
    return dtype


def _token_ids(value, field: str):
    """``None``, an int, or (HF's lists of EOS ids) a tuple of ints."""
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        return None if value is None else int(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        return tuple(int(v) for v in value) if len(value) != 1 else int(value[0])
    raise ValueError(f"LlamaConfig.{field} must be None, a token id or a list of token ids, got {value!r}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (HF ``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config`` field names) plus JAX options.

    ``num_key_value_heads=None`` means multi-head attention (= ``num_attention_heads``);
    ``head_dim=None`` means ``hidden_size // num_attention_heads``. ``rope_scaling`` is a
    :class:`RopeScaling` (a HF-style dict is converted). ``eos_token_id`` may be a tuple (Llama 3.1
    instruct stops on several). ``dtype`` is the compute dtype (activations), ``param_dtype`` the
    storage dtype of the parameters; logits are always float32.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    attention_dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Family differences (see the module docstring).
    model_type: str = "llama"
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # llama: biases on q/k/v/o (qwen2 always has q/k/v biases)
    mlp_bias: bool = False  # llama: biases on gate/up/down
    sliding_window: int | None = None  # mistral
    # JAX execution options (not part of the HF config).
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    attention: str = "auto"  # "auto" | "xla" | "flash" | "cudnn": mora_jax.models.attention

    def __post_init__(self):
        check_attention(self.attention, "LlamaConfig.attention")
        object.__setattr__(self, "dtype", _as_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype, "param_dtype"))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.model_type={self.model_type!r} is not supported; use one of {MODEL_TYPES}")
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_hf(
                self.rope_scaling, max_position_embeddings=self.max_position_embeddings))
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"LlamaConfig.rope_scaling must be None, a RopeScaling or a dict, got {self.rope_scaling!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            object.__setattr__(self, name, _token_ids(getattr(self, name), name))
        for name in ("bos_token_id", "pad_token_id"):
            if isinstance(getattr(self, name), tuple):
                raise ValueError(f"LlamaConfig.{name} must be a single token id, got {getattr(self, name)!r}")
        if self.sliding_window is not None:
            if self.model_type != "mistral":
                raise ValueError(f"sliding_window is a Mistral option; model_type={self.model_type!r} has none")
            if isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, (int, np.integer)) \
                    or self.sliding_window <= 0:
                raise ValueError(f"LlamaConfig.sliding_window must be a positive int or None, got {self.sliding_window!r}")
        if (self.attention_bias or self.mlp_bias) and self.model_type != "llama":
            raise ValueError(
                f"attention_bias / mlp_bias are Llama options; model_type={self.model_type!r} fixes its biases "
                "(qwen2: q/k/v biases always, mistral: none)"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim={self.resolved_head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.resolved_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.resolved_kv_heads} (grouped-query attention)"
            )
        if self.remat_policy not in REMAT_POLICIES and not hasattr(jax.checkpoint_policies, self.remat_policy):
            raise ValueError(f"unknown remat_policy {self.remat_policy!r}; use one of {REMAT_POLICIES}")

    @property
    def resolved_head_dim(self) -> int:
        """Per-head size ``H`` (``head_dim`` or ``hidden_size // num_attention_heads``)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def resolved_kv_heads(self) -> int:
        """Number of key/value heads ``K``."""
        return self.num_key_value_heads if self.num_key_value_heads is not None else self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        """Whether the q/k/v projections have biases (Qwen2 always; Llama with ``attention_bias``)."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Whether the output projection has a bias (Llama with ``attention_bias`` only)."""
        return self.model_type == "llama" and self.attention_bias

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """``eos_token_id`` as a tuple (empty when the config has none)."""
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (eos,)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """Build from a HF ``config.json`` dict; raise ``ValueError`` on anything not implemented.

        ``overrides`` set the JAX options (``dtype``, ``param_dtype``, ``remat_policy``,
        ``scan_layers``) or replace any field.
        """
        _check_hf_config(hf)
        model_type = hf["model_type"]
        fields = {f.name for f in dataclasses.fields(cls)} - {
            "dtype", "param_dtype", "rope_scaling", "attention_bias", "mlp_bias", "sliding_window"}
        kwargs = {k: hf[k] for k in fields if k in hf}
        if "max_position_embeddings" not in hf and "max_sequence_length" in hf:  # early LLaMA configs
            kwargs["max_position_embeddings"] = hf["max_sequence_length"]
        max_pos = kwargs.get("max_position_embeddings", cls.max_position_embeddings)
        rope = hf.get("rope_parameters")  # transformers >= 5 keeps rope_theta and the scaling here
        if isinstance(rope, Mapping) and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        scaling = None
        for key in ("rope_scaling", "rope_parameters"):
            if hf.get(key) is not None:
                scaling = scaling or RopeScaling.from_hf(hf[key], max_position_embeddings=max_pos, where=key)
        kwargs["rope_scaling"] = scaling
        if kwargs.get("rope_theta") is None:
            kwargs.pop("rope_theta", None)
        kwargs["rope_theta"] = float(kwargs.get("rope_theta", 10000.0))
        if model_type == "llama":
            kwargs["attention_bias"] = bool(hf.get("attention_bias", False))
            kwargs["mlp_bias"] = bool(hf.get("mlp_bias", False))
        if model_type == "mistral":
            kwargs["sliding_window"] = hf.get("sliding_window")
        kwargs["model_type"] = model_type
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """HF ``config.json`` contents that ``transformers`` loads (``AutoModelForCausalLM``)."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.resolved_kv_heads,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling is not None else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": self.attention_dropout,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype.name,
        }
        if self.head_dim is not None:  # else transformers derives it, as we do
            out["head_dim"] = self.head_dim
        if self.model_type == "llama":
            out.update({"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias, "pretraining_tp": 1})
        elif self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        else:  # qwen2
            out.update({"use_sliding_window": False, "sliding_window": None,
                        "max_window_layers": self.num_hidden_layers})
        return out


_HF_BOOLEANS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
_HF_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
_HF_NUMBERS = ("initializer_range", "attention_dropout")
_HF_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "max_sequence_length",
                     "sliding_window")
_HF_COUNTS = ("max_window_layers",)


def _check_hf_types(hf: Mapping[str, Any]) -> None:
    """The fields read from ``config.json`` have the JSON types ``transformers`` writes (null = unset):
    ``"tie_word_embeddings": "no"`` or ``"rms_norm_eps": Infinity`` is refused, not read as true or inf."""
    def wrong(key, expected):
        raise ValueError(f"config.json: {key} must be {expected}, got {hf[key]!r}; fix config.json "
                         "(save_pretrained writes it so)")

    for key in _HF_BOOLEANS:
        if hf.get(key) is not None and not isinstance(hf[key], bool):
            wrong(key, "true or false (a JSON boolean)")
    for key in _HF_POSITIVE_NUMBERS + _HF_NUMBERS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or (key in _HF_POSITIVE_NUMBERS and value <= 0)):
            wrong(key, "a finite positive number" if key in _HF_POSITIVE_NUMBERS else "a finite number")
    for key in _HF_POSITIVE_INTS + _HF_COUNTS:
        value = hf.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < (0 if key in _HF_COUNTS else 1)):
            wrong(key, "a whole number >= 0" if key in _HF_COUNTS else "a positive whole number")


def _check_hf_config(hf: Mapping[str, Any]) -> None:
    """Reject HF configs this implementation would silently get wrong."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"config.json has model_type={model_type!r}, which is not supported; supported model types: "
            f"{', '.join(f'{t!r} ({a})' for t, a in ARCHITECTURES.items())}"
        )
    _check_hf_types(hf)
    expected = ARCHITECTURES[model_type]
    archs = hf.get("architectures") or [expected]
    if not any(str(a).lower() == expected.lower() for a in archs):
        raise ValueError(
            f"config.json architectures={archs} has no {expected}; only the causal LM (embeddings, decoder "
            "layers, final norm, LM head) is supported"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (LLaMA-family models use 'silu' / SwiGLU)")
    if hf.get("quantization_config"):
        raise ValueError(
            "config.json has a quantization_config: quantized checkpoints are not supported; use the "
            "unquantized (float32 / bfloat16 / float16) weights"
        )
    layer_types = set(hf.get("layer_types") or ())
    if model_type == "qwen2":
        window_layers = hf.get("max_window_layers", hf.get("num_hidden_layers"))
        sliding = hf.get("use_sliding_window") and hf.get("sliding_window") is not None and (
            window_layers is None or window_layers < hf.get("num_hidden_layers", 0))
        if sliding or "sliding_attention" in layer_types:
            raise ValueError(
                "config.json has use_sliding_window=true (sliding-window attention on some Qwen2 layers), which "
                "is not supported for qwen2; released Qwen2 / Qwen2.5 checkpoints do not use it"
            )
    elif model_type == "llama" and layer_types - {"full_attention"}:
        raise ValueError(f"config.json layer_types {sorted(layer_types)}: only full attention is supported for llama")


# ---- Presets ---------------------------------------------------------------------------------
_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
LLAMA_CONFIGS: dict[str, LlamaConfig] = {
    # Test-sized model, same shapes as tests/fixtures/e2e_public/base.
    "tiny": LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    # The MoRA / ReLoRA pretraining models (T5 tokenizer: pad 0, eos 1).
    "mora-250m": LlamaConfig(
        vocab_size=32100, hidden_size=768, intermediate_size=2560, num_hidden_layers=24,
        num_attention_heads=16, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    ),
    "mora-1b": LlamaConfig(
        vocab_size=32100, hidden_size=2048, intermediate_size=5461, num_hidden_layers=24,
        num_attention_heads=32, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, pad_token_id=0,
    ),
    "llama2-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2,
    ),
    # Shapes of today's public checkpoints (load the real weights with mora_jax.hf.load_llama).
    "llama3.2-1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001,
    ),
    # meta-llama/Llama-3.2-3B: the model of Hugging Face PEFT's MetaMathQA method comparison.
    "llama3.2-3b": LlamaConfig(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072, tie_word_embeddings=True,
        bos_token_id=128000, eos_token_id=128001,
    ),
    "llama3.1-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001,
    ),
    # meta-llama/Llama-3.1-70B and Qwen/Qwen2.5-72B (their public config.json): the planner's 70B-class shapes
    # (docs/tpu.md, "Quantized bases"). Qwen2.5-72B: q/k/v biases (the qwen2 family), untied head.
    "llama3.1-70b": LlamaConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072,
        bos_token_id=128000, eos_token_id=128001,
    ),
    "qwen2.5-72b": LlamaConfig(
        model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=1000000.0,
        max_position_embeddings=131072, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
    ),
    "mistral-7b": LlamaConfig(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, max_position_embeddings=32768,
        sliding_window=4096, bos_token_id=1, eos_token_id=2,
    ),
    # SmolLM2-135M(-Instruct): the Instruct checkpoint's special tokens (<|im_start|> 1, <|im_end|> 2).
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    ),
    "qwen2.5-0.5b": LlamaConfig(
        model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643,
    ),
}

__all__ = ["ARCHITECTURES", "LLAMA_CONFIGS", "MODEL_TYPES", "REMAT_POLICIES", "LlamaConfig"]

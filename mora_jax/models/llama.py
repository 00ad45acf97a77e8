"""LLaMA-family causal language model in Flax linen, numerically matching HF ``LlamaForCausalLM``.

Layout contract (the adapter system and the Hugging Face I/O rely on it):

* every projection is a plain ``nn.Dense(use_bias=False)`` whose 2-D kernel is ``(in, out)``, i.e.
  the HF ``weight`` transposed: ``self_attn/{q,k,v,o}_proj``, ``mlp/{gate,up,down}_proj`` and
  ``lm_head`` (absent when the embeddings are tied; then ``embed_tokens.attend`` is used);
* parameter tree::

      {'model': {'embed_tokens': {'embedding'},
                 'layers_0': {'self_attn': {...}, 'mlp': {...},
                              'input_layernorm': {'weight'}, 'post_attention_layernorm': {'weight'}},
                 ...,
                 'norm': {'weight'}},
       'lm_head': {'kernel'}}

  With ``scan_layers=True`` the layers live under ``'model'/'layers'`` with a leading layer axis
  (see ``stack_layers`` / ``unstack_layers``);
* the ``'adapters'`` variable collection is scanned like ``'params'`` and lifted through remat, so
  adapters injected at apply time reach every ``nn.Dense``.

Shape suffixes: B batch, T query length, S key length, D hidden, N query heads, K key/value heads,
G query heads per key/value head (N = K·G), H head dim, F intermediate (MLP) size, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# "none": no rematerialisation; "full": recompute everything (save only layer inputs);
# any other name is a ``jax.checkpoint_policies`` attribute (e.g. "dots_saveable").
REMAT_POLICIES = (
    "none",
    "full",
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
        raise ValueError(f"LlamaConfig.{field}={value!r} is not a dtype; use one of {_SUPPORTED_DTYPES}") from e
    if dtype.name not in _SUPPORTED_DTYPES:
        raise ValueError(f"LlamaConfig.{field}={dtype.name} is not supported; use one of {_SUPPORTED_DTYPES}")
    return dtype


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture (HF ``LlamaConfig`` field names) plus JAX execution options.

    ``num_key_value_heads=None`` means multi-head attention (= ``num_attention_heads``);
    ``head_dim=None`` means ``hidden_size // num_attention_heads``. ``dtype`` is the compute dtype
    (activations), ``param_dtype`` the storage dtype of the parameters; logits are always float32.
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
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # JAX execution options (not part of the HF config).
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False

    def __post_init__(self):
        object.__setattr__(self, "dtype", _as_dtype(self.dtype, "dtype"))
        object.__setattr__(self, "param_dtype", _as_dtype(self.param_dtype, "param_dtype"))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
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
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: hf[k] for k in fields if k in hf and k not in ("dtype", "param_dtype")}
        if "max_position_embeddings" not in hf and "max_sequence_length" in hf:  # early LLaMA configs
            kwargs["max_position_embeddings"] = hf["max_sequence_length"]
        rope = hf.get("rope_parameters")  # transformers >= 5 keeps rope_theta here
        if isinstance(rope, Mapping) and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not isinstance(kwargs.get(key), (int, type(None))):  # lists of eos ids: not modelled
                kwargs.pop(key)
        kwargs["rope_theta"] = float(kwargs.get("rope_theta", 10000.0))
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """HF ``config.json`` contents that ``transformers.LlamaForCausalLM`` loads."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.resolved_kv_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_bias": False,
            "attention_dropout": self.attention_dropout,
            "mlp_bias": False,
            "pretraining_tp": 1,
            "use_cache": True,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype.name,
        }


def _check_hf_config(hf: Mapping[str, Any]) -> None:
    """Reject HF configs this implementation would silently get wrong."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise ValueError(
            f"config.json has model_type={model_type!r}, but only LLaMA-family checkpoints "
            "(model_type 'llama', LlamaForCausalLM) are supported; convert the model or use its own code"
        )
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if not any(a.lower() == "llamaforcausallm" for a in archs):
        raise ValueError(
            f"config.json architectures={archs} has no LlamaForCausalLM; only the causal-LM LLaMA "
            "(embeddings, decoder layers, final norm, LM head) is supported"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported (LLaMA uses 'silu' / SwiGLU)")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key)
        if rope is None:
            continue
        rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else rope
        if rope_type != "default":
            raise ValueError(
                f"{key}={rope!r} is not implemented (only plain RoPE, rope_scaling null, is); "
                "remove it from config.json only if the checkpoint was trained without scaling"
            )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key, False):
            raise ValueError(
                f"{key}=true is not implemented: projections here have no bias; "
                "use a checkpoint without biases (LLaMA has none)"
            )


# ---- Presets ---------------------------------------------------------------------------------
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
}


# ---- Building blocks ---------------------------------------------------------------------------
def _dense(config: LlamaConfig, features: int, name: str | None = None) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(config.initializer_range),
        name=name,
    )


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x²) + eps)``, the statistics computed in float32 (as HF does)."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        weight_D = self.param("weight", nn.initializers.ones, (x_BxTxD.shape[-1],), self.param_dtype)
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        var_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
        normed_BxTxD = (x32_BxTxD * jax.lax.rsqrt(var_BxTx1 + self.eps)).astype(self.dtype)
        return normed_BxTxD * weight_D.astype(self.dtype)


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """Position of each token within its segment (restarts at 0 where the segment id changes)."""
    B, T = segment_ids_BxT.shape
    idx_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    starts_BxT = jnp.concatenate(
        [jnp.ones((B, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1
    )
    return idx_BxT - jax.lax.cummax(jnp.where(starts_BxT, idx_BxT, 0), axis=1)


def rope_cos_sin(positions_BxT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """HF rotary tables ``(cos, sin)``, each ``(B, T, H)`` float32 (frequencies repeated twice)."""
    exponent_h = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq_h = 1.0 / (jnp.float32(theta) ** exponent_h)
    freqs_BxTxh = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_h
    emb_BxTxH = jnp.concatenate([freqs_BxTxh, freqs_BxTxh], axis=-1)
    return jnp.cos(emb_BxTxH), jnp.sin(emb_BxTxH)


def _rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    """HF ``apply_rotary_pos_emb`` (rotate-half convention), in ``x``'s dtype."""
    cos = cos_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
    sin = sin_BxTxH[:, :, None, :].astype(x_BxTxNxH.dtype)
    return x_BxTxNxH * cos + _rotate_half(x_BxTxNxH) * sin


def make_attention_mask(
    length: int, attention_mask_BxS: jax.Array | None = None, segment_ids_BxT: jax.Array | None = None
) -> jax.Array:
    """Boolean ``(B or 1, 1, 1, T, T)`` mask: causal, keys not padding, same non-zero segment."""
    idx = jnp.arange(length)
    mask_BxTxS = (idx[:, None] >= idx[None, :])[None]
    if attention_mask_BxS is not None:
        mask_BxTxS = mask_BxTxS & (attention_mask_BxS != 0)[:, None, :]
    if segment_ids_BxT is not None:
        same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        mask_BxTxS = mask_BxTxS & same_BxTxS & (segment_ids_BxT != 0)[:, None, :]
    return mask_BxTxS[:, None, None]


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings (HF eager-attention numerics)."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        H, N, K = c.resolved_head_dim, c.num_attention_heads, c.resolved_kv_heads
        self.q_proj = _dense(c, N * H)
        self.k_proj = _dense(c, K * H)
        self.v_proj = _dense(c, K * H)
        self.o_proj = _dense(c, c.hidden_size)
        self.dropout = nn.Dropout(c.attention_dropout)

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic: bool = True):
        c = self.config
        H, N, K = c.resolved_head_dim, c.num_attention_heads, c.resolved_kv_heads
        G = N // K
        B, T, _ = x_BxTxD.shape
        q_BxTxNxH = self.q_proj(x_BxTxD).reshape(B, T, N, H)
        k_BxSxKxH = self.k_proj(x_BxTxD).reshape(B, T, K, H)
        v_BxSxKxH = self.v_proj(x_BxTxD).reshape(B, T, K, H)
        q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("batch", "length", "heads", "head_dim"))
        k_BxSxKxH = nn.with_logical_constraint(k_BxSxKxH, ("batch", "length", "kv_heads", "head_dim"))
        v_BxSxKxH = nn.with_logical_constraint(v_BxSxKxH, ("batch", "length", "kv_heads", "head_dim"))
        q_BxTxNxH = apply_rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH)
        k_BxSxKxH = apply_rope(k_BxSxKxH, cos_BxTxH, sin_BxTxH)

        # Query head n uses key/value head n // G (HF repeat_kv), hence the (K, G) split of N.
        q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, G, H)
        scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH) * (H**-0.5)
        scores_BxKxGxTxS = jnp.where(
            mask_Bx1x1xTxS, scores_BxKxGxTxS.astype(jnp.float32), jnp.finfo(jnp.float32).min
        )
        probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(c.dtype)
        probs_BxKxGxTxS = self.dropout(probs_BxKxGxTxS, deterministic=deterministic)
        out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH)
        out_BxTxNxH = nn.with_logical_constraint(
            out_BxTxKxGxH.reshape(B, T, N, H), ("batch", "length", "heads", "head_dim")
        )
        y_BxTxD = self.o_proj(out_BxTxNxH.reshape(B, T, N * H))
        return nn.with_logical_constraint(y_BxTxD, ("batch", "length", "embed"))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.gate_proj = _dense(c, c.intermediate_size)
        self.up_proj = _dense(c, c.intermediate_size)
        self.down_proj = _dense(c, c.hidden_size)

    def __call__(self, x_BxTxD):
        h_BxTxF = nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD)
        h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "length", "mlp"))
        return nn.with_logical_constraint(self.down_proj(h_BxTxF), ("batch", "length", "embed"))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
        self.mlp = LlamaMLP(c)

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic: bool = True):
        h_BxTxD = self.self_attn(self.input_layernorm(x_BxTxD), cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic)
        x_BxTxD = x_BxTxD + h_BxTxD
        x_BxTxD = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
        return nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))


class _ScanDecoderLayer(LlamaDecoderLayer):
    """``nn.scan`` body: returns ``(carry, None)``."""

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic: bool = True):
        return super().__call__(x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic), None


def _layer_class(config: LlamaConfig):
    """Decoder layer class with remat and/or scan applied per the config."""
    cls = _ScanDecoderLayer if config.scan_layers else LlamaDecoderLayer
    if config.remat_policy != "none":
        policy = None if config.remat_policy == "full" else getattr(jax.checkpoint_policies, config.remat_policy)
        # static_argnums counts `self` as 0: `deterministic` is argument 5.
        cls = nn.remat(cls, policy=policy, prevent_cse=not config.scan_layers, static_argnums=(5,))
    if config.scan_layers:
        cls = nn.scan(
            cls,
            variable_axes={"params": 0, "adapters": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=config.num_hidden_layers,
        )
    return cls


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm (HF ``LlamaModel``); returns hidden states."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(c.initializer_range),
        )
        layer_cls = _layer_class(c)
        if c.scan_layers:
            self.layers = layer_cls(c)
        else:
            self.layers = [layer_cls(c) for _ in range(c.num_hidden_layers)]  # named layers_0, layers_1, ...
        self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)

    def __call__(self, input_ids_BxT, attention_mask=None, segment_ids=None, positions=None, deterministic=True):
        c = self.config
        B, T = input_ids_BxT.shape
        if positions is None:
            positions = segment_positions(segment_ids) if segment_ids is not None else jnp.arange(T)[None]
        positions_BxT = jnp.broadcast_to(positions, (B, T))
        cos_BxTxH, sin_BxTxH = rope_cos_sin(positions_BxT, c.resolved_head_dim, c.rope_theta)
        mask_Bx1x1xTxS = make_attention_mask(T, attention_mask, segment_ids)

        x_BxTxD = nn.with_logical_constraint(self.embed_tokens(input_ids_BxT), ("batch", "length", "embed"))
        if c.scan_layers:
            x_BxTxD, _ = self.layers(x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic)
        else:
            for layer in self.layers:
                x_BxTxD = layer(x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic)
        return self.norm(x_BxTxD)

    def attend(self, x_BxTxD):
        """Tied LM head: ``x @ embedding.T``."""
        return self.embed_tokens.attend(x_BxTxD)


class LlamaForCausalLM(nn.Module):
    """HF ``LlamaForCausalLM``: ``apply({'params': p}, input_ids, ...) -> logits (B, T, V) float32``.

    ``attention_mask`` (B, T): 1 for real tokens, 0 for padding keys (positions stay ``arange``,
    as in HF's forward; pass ``positions`` for left padding). ``segment_ids`` (B, T): packed
    sequences, attention only within a segment, 0 = padding; positions then restart at each segment
    unless ``positions`` is given. ``deterministic=False`` enables attention dropout (rng 'dropout').
    """

    config: LlamaConfig

    def setup(self):
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config, self.config.vocab_size)

    def __call__(self, input_ids, attention_mask=None, segment_ids=None, positions=None, deterministic=True):
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer (batch, length) array, got {input_ids.dtype}{input_ids.shape}")
        h_BxTxD = self.model(input_ids, attention_mask, segment_ids, positions, deterministic)
        logits_BxTxV = self.model.attend(h_BxTxD) if self.config.tie_word_embeddings else self.lm_head(h_BxTxD)
        return nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32), ("batch", "length", "vocab"))


# ---- Parameter helpers ----------------------------------------------------------------------------
def _dummy_ids(config: LlamaConfig):
    return jnp.zeros((1, min(8, config.max_position_embeddings)), jnp.int32)


def init_params(config: LlamaConfig, rng: jax.Array) -> dict:
    """Randomly initialised parameters (HF-style: normal(initializer_range) weights, unit norms)."""
    model = LlamaForCausalLM(config)
    return jax.jit(model.init)(rng, _dummy_ids(config))["params"]


def abstract_params(config: LlamaConfig) -> dict:
    """Parameter tree of ``jax.ShapeDtypeStruct`` (no memory allocated)."""
    model = LlamaForCausalLM(config)
    return jax.eval_shape(model.init, jax.random.key(0), _dummy_ids(config))["params"]


def count_params(params) -> int:
    """Total number of scalars in a parameter pytree (arrays or ShapeDtypeStructs)."""
    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def stack_layers(tree: Mapping, num_layers: int | None = None) -> dict:
    """Unrolled tree (``model/layers_{i}``) -> scanned tree (``model/layers`` with a layer axis).

    Works on params and on any tree mirroring them (e.g. adapters); other entries are kept.
    """
    model = dict(tree["model"])
    if num_layers is None:
        num_layers = sum(1 for k in model if k.startswith("layers_"))
    layers = [model.pop(f"layers_{i}") for i in range(num_layers)]
    if any(k.startswith("layers_") for k in model):
        raise ValueError(f"found layers beyond num_layers={num_layers}: {sorted(k for k in model if k.startswith('layers_'))}")
    model["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
    return {**tree, "model": model}


def unstack_layers(tree: Mapping) -> dict:
    """Scanned tree (``model/layers``, leading layer axis) -> unrolled tree (``model/layers_{i}``)."""
    model = dict(tree["model"])
    stacked = model.pop("layers")
    num_layers = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    for i in range(num_layers):
        model[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
    return {**tree, "model": model}

"""LLaMA in ``flax.nnx``, the same function and parameter names as ``mora_jax.models.llama`` (linen).

A real nnx model built from ``nnx.Linear`` / ``nnx.Embed`` (no bridge), so the nnx adapters attach to
it like to any Tunix model. The math is the linen model's, using its pure helpers (rotary tables with
their scaling, masks, segment positions): RMSNorm with float32 statistics, RoPE (rotate-half),
grouped-query attention with float32 softmax (the XLA einsum path), SwiGLU MLP, the families'
projection biases (``qkv_bias`` / ``o_bias`` / ``mlp_bias``) and Mistral's sliding window, optional tied
embeddings, float32 logits.

Parameter paths differ from linen's only where nnx names list items by index::

    linen  model/layers_0/self_attn/q_proj/kernel
    nnx    model/layers/0/self_attn/q_proj/kernel

so :func:`load_linen_params` / :func:`to_linen_params` move weights between the two (and
``mora_jax.hf.load_llama``'s params load into this model), and the nnx adapters convert to the linen
adapter tree with the default path map. Unrolled layers only (``scan_layers=False``), no remat, no
KV-cache decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import filterlib

from mora_jax.adapters import flatten, path_str, unflatten
from mora_jax.models.config import LlamaConfig
from mora_jax.models.llama import make_attention_mask, segment_positions
from mora_jax.models.rope import apply_rope, rope_cos_sin
from mora_jax.nnx.attach import iter_params
from mora_jax.nnx.convert import linen_path


def _linear(config: LlamaConfig, in_features: int, out_features: int, rngs: nnx.Rngs,
            use_bias: bool = False) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.param_dtype,
                      kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x²) + eps)``, the statistics in float32."""

    def __init__(self, dim: int, eps: float, dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x_BxTxD):
        x32_BxTxD = x_BxTxD.astype(jnp.float32)
        var_BxTx1 = jnp.mean(jnp.square(x32_BxTxD), axis=-1, keepdims=True)
        normed_BxTxD = (x32_BxTxD * jax.lax.rsqrt(var_BxTx1 + self.eps)).astype(self.dtype)
        return normed_BxTxD * self.weight[...].astype(self.dtype)


class LlamaAttention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        H, N, K = c.resolved_head_dim, c.num_attention_heads, c.resolved_kv_heads
        self.q_proj = _linear(c, c.hidden_size, N * H, rngs, c.qkv_bias)
        self.k_proj = _linear(c, c.hidden_size, K * H, rngs, c.qkv_bias)
        self.v_proj = _linear(c, c.hidden_size, K * H, rngs, c.qkv_bias)
        self.o_proj = _linear(c, N * H, c.hidden_size, rngs, c.o_bias)
        # Only with a non-zero rate, so that a model without dropout holds no random state.
        self.dropout = nnx.Dropout(c.attention_dropout, rngs=rngs) if c.attention_dropout > 0 else None

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic: bool = True):
        c = self.config
        H, N, K = c.resolved_head_dim, c.num_attention_heads, c.resolved_kv_heads
        G = N // K
        B, T, _ = x_BxTxD.shape
        q_BxTxNxH = apply_rope(self.q_proj(x_BxTxD).reshape(B, T, N, H), cos_BxTxH, sin_BxTxH)
        k_BxSxKxH = apply_rope(self.k_proj(x_BxTxD).reshape(B, T, K, H), cos_BxTxH, sin_BxTxH)
        v_BxSxKxH = self.v_proj(x_BxTxD).reshape(B, T, K, H)
        q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, G, H)
        scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH) * (H**-0.5)
        scores_BxKxGxTxS = jnp.where(mask_Bx1x1xTxS, scores_BxKxGxTxS.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(c.dtype)
        if self.dropout is not None:
            probs_BxKxGxTxS = self.dropout(probs_BxKxGxTxS, deterministic=deterministic)
        out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH)
        return self.o_proj(out_BxTxKxGxH.reshape(B, T, N * H))


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.gate_proj = _linear(c, c.hidden_size, c.intermediate_size, rngs, c.mlp_bias)
        self.up_proj = _linear(c, c.hidden_size, c.intermediate_size, rngs, c.mlp_bias)
        self.down_proj = _linear(c, c.intermediate_size, c.hidden_size, rngs, c.mlp_bias)

    def __call__(self, x_BxTxD):
        return self.down_proj(jax.nn.silu(self.gate_proj(x_BxTxD)) * self.up_proj(x_BxTxD))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm residual block: attention then MLP."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype)
        self.self_attn = LlamaAttention(c, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype)
        self.mlp = LlamaMLP(c, rngs=rngs)

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic: bool = True):
        x_BxTxD = x_BxTxD + self.self_attn(self.input_layernorm(x_BxTxD), cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS,
                                           deterministic)
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))


class LlamaModel(nnx.Module):
    """Embeddings, decoder layers and final norm; returns hidden states."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                                      embedding_init=nnx.initializers.normal(c.initializer_range), rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.dtype, c.param_dtype)

    def __call__(self, input_ids_BxT, attention_mask=None, segment_ids=None, positions=None, deterministic=True):
        c = self.config
        B, T = input_ids_BxT.shape
        if positions is None:
            positions = segment_positions(segment_ids) if segment_ids is not None else jnp.arange(T)[None]
        cos_BxTxH, sin_BxTxH = rope_cos_sin(jnp.broadcast_to(positions, (B, T)), c.resolved_head_dim, c.rope_theta,
                                            c.rope_scaling, c.max_position_embeddings)
        mask_Bx1x1xTxS = make_attention_mask(T, attention_mask, segment_ids, sliding_window=c.sliding_window)
        x_BxTxD = self.embed_tokens(input_ids_BxT)
        for layer in self.layers:
            x_BxTxD = layer(x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic)
        return self.norm(x_BxTxD)


class LlamaForCausalLM(nnx.Module):
    """``model(input_ids, attention_mask=None, segment_ids=None, positions=None, deterministic=True)`` ->
    float32 logits ``(B, T, V)``, as the linen ``LlamaForCausalLM``. Random init like linen's
    (normal(initializer_range) weights, unit norms) from ``rngs``."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        if config.scan_layers or config.remat_policy != "none":
            raise NotImplementedError(
                "the nnx LLaMA has unrolled layers without remat; use scan_layers=False, remat_policy='none'"
            )
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.hidden_size, config.vocab_size, rngs)

    def __call__(self, input_ids, attention_mask=None, segment_ids=None, positions=None, deterministic=True):
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be an integer (batch, length) array, got {input_ids.dtype}{input_ids.shape}"
            )
        h_BxTxD = self.model(input_ids, attention_mask, segment_ids, positions, deterministic)
        if self.config.tie_word_embeddings:
            logits_BxTxV = self.model.embed_tokens.attend(h_BxTxD)
        else:
            logits_BxTxV = self.lm_head(h_BxTxD)
        return logits_BxTxV.astype(jnp.float32)


# ---- Weights from and to the linen model ---------------------------------------------------------------


def load_linen_params(model: nnx.Module, params) -> nnx.Module:
    """Copy a linen parameter tree (e.g. ``mora_jax.models.init_params`` or ``mora_jax.hf.load_llama``) into
    ``model``, matching ``model/layers/0/...`` to ``model/layers_0/...``. Every parameter of each side must
    have its counterpart with the same shape. In place; returns the model."""
    flat = {path_str(p): v for p, v in flatten(params).items()}
    seen = set()
    for path, variable in iter_params(model):
        name = path_str(linen_path(path))
        if name not in flat:
            raise ValueError(f"{path_str(path)} has no counterpart {name!r} in the linen params")
        value = flat[name]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"{name}: linen shape {tuple(value.shape)} but nnx shape {tuple(variable.shape)}")
        variable.set_value(jnp.asarray(value, dtype=variable.dtype))
        seen.add(name)
    missing = sorted(set(flat) - seen)
    if missing:
        raise ValueError(f"linen params {missing[:10]} have no counterpart in the nnx model")
    return model


def to_linen_params(model: nnx.Module, variables=nnx.Param) -> dict:
    """The linen parameter tree of ``model``'s parameters that the nnx filter ``variables`` selects (default
    every ``nnx.Param``, adapters included if attached: pass ``mora_jax.nnx.FROZEN`` for the base alone)."""
    keep = filterlib.to_predicate(variables)
    return unflatten({linen_path(path): v[...] for path, v in iter_params(model) if keep(path, v)})


def from_linen(config: LlamaConfig, params, *, rngs: nnx.Rngs | None = None) -> LlamaForCausalLM:
    """An nnx ``LlamaForCausalLM`` holding the linen ``params``. Without attention dropout it is built
    abstractly (``nnx.eval_shape``: no random init, no extra memory); with it, ``rngs`` seeds the dropout."""
    if config.attention_dropout > 0:
        model = LlamaForCausalLM(config, rngs=rngs if rngs is not None else nnx.Rngs(0))
    else:
        model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return load_linen_params(model, params)


__all__ = [
    "LlamaAttention",
    "LlamaDecoderLayer",
    "LlamaForCausalLM",
    "LlamaMLP",
    "LlamaModel",
    "RMSNorm",
    "from_linen",
    "load_linen_params",
    "to_linen_params",
]

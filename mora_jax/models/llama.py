"""LLaMA-family causal language model in Flax linen, numerically matching HF ``LlamaForCausalLM``,
``MistralForCausalLM`` and ``Qwen2ForCausalLM`` (``LlamaConfig.model_type``).

Layout contract (the adapter system and the Hugging Face I/O rely on it):

* every projection is a plain ``nn.Dense`` whose 2-D kernel is ``(in, out)``, i.e. the HF ``weight``
  transposed: ``self_attn/{q,k,v,o}_proj``, ``mlp/{gate,up,down}_proj`` and ``lm_head`` (absent
  when the embeddings are tied; then ``embed_tokens.attend`` is used). A projection has a ``bias``
  leaf only where the family has one (Qwen2: q/k/v; Llama with ``attention_bias`` / ``mlp_bias``);
  biases are base weights like the kernels (frozen unless ``unfreeze`` names them);
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

Generation runs the same modules with a key/value cache (:class:`KVCache`, :func:`init_kv_cache`,
:meth:`LlamaForCausalLM.decode`): new tokens' keys and values are written into the cache at
``cache_index`` and the queries attend over the whole cache under a mask, so a decode step costs
the same whatever the prefix. ``mora_jax.generate`` drives it.

The configuration lives in ``models/config.py``, RoPE in ``models/rope.py`` and the tree helpers in
``models/params.py``; every name stays importable from here.

Shape suffixes: B batch, T query length, S key length, D hidden, N query heads, K key/value heads,
G query heads per key/value head (N = K·G), H head dim, F intermediate (MLP) size, V vocabulary,
L layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mora_jax.models import attention as attention_lib
from mora_jax.models.config import PROJECTION_NAME, LlamaConfig
from mora_jax.models.rope import apply_rope, rope_cos_sin


# ---- Building blocks ---------------------------------------------------------------------------
def _dense(config: LlamaConfig, features: int, name: str | None = None, use_bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
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


def make_attention_mask(
    length: int,
    attention_mask_BxS: jax.Array | None = None,
    segment_ids_BxT: jax.Array | None = None,
    *,
    sliding_window: int | None = None,
    query_offset=0,
    key_length: int | None = None,
) -> jax.Array:
    """Boolean ``(B or 1, 1, 1, T, S)`` mask: causal, keys not padding, same non-zero segment, and
    (Mistral) at most ``sliding_window - 1`` positions back.

    Queries sit at sequence indices ``query_offset + [0, length)`` (``query_offset`` may be traced:
    a KV-cache step) and keys at ``[0, key_length)`` (default ``length``). As in HF, causality and
    the window are over sequence indices, not RoPE positions.
    """
    q_T = query_offset + jnp.arange(length)
    k_S = jnp.arange(length if key_length is None else key_length)
    mask_BxTxS = (q_T[:, None] >= k_S[None, :])[None]
    if sliding_window is not None:
        mask_BxTxS = mask_BxTxS & (q_T[:, None] - k_S[None, :] < sliding_window)[None]
    if attention_mask_BxS is not None:
        mask_BxTxS = mask_BxTxS & (attention_mask_BxS != 0)[:, None, :]
    if segment_ids_BxT is not None:
        same_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
        mask_BxTxS = mask_BxTxS & same_BxTxS & (segment_ids_BxT != 0)[:, None, :]
    return mask_BxTxS[:, None, None]


class KVCache(NamedTuple):
    """Keys and values of one layer, ``(B, S, K, H)`` each, in the compute dtype (after RoPE); with a
    leading layer axis ``(L, B, S, K, H)`` for an ``nn.scan`` model."""

    k: jax.Array
    v: jax.Array


def init_kv_cache(config: LlamaConfig, batch_size: int, length: int, dtype=None):
    """An empty cache for ``batch_size`` sequences of up to ``length`` tokens: a tuple of one
    :class:`KVCache` per layer, or one stacked :class:`KVCache` when ``config.scan_layers``."""
    shape = (batch_size, length, config.resolved_kv_heads, config.resolved_head_dim)
    dtype = config.dtype if dtype is None else dtype
    if config.scan_layers:
        stacked = (config.num_hidden_layers, *shape)
        return KVCache(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype))
    return tuple(KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_hidden_layers))


def kv_cache_logical_axes(config: LlamaConfig):
    """Logical axis names of each cache leaf (for sharding: batch over data axes, heads over tensor)."""
    axes = ("batch", "length", "kv_heads", "head_dim")
    if config.scan_layers:
        return KVCache(("layers", *axes), ("layers", *axes))
    return tuple(KVCache(axes, axes) for _ in range(config.num_hidden_layers))


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary embeddings (HF eager-attention numerics)."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        H, N, K = c.resolved_head_dim, c.num_attention_heads, c.resolved_kv_heads
        self.q_proj = _dense(c, N * H, use_bias=c.qkv_bias)
        self.k_proj = _dense(c, K * H, use_bias=c.qkv_bias)
        self.v_proj = _dense(c, K * H, use_bias=c.qkv_bias)
        self.o_proj = _dense(c, c.hidden_size, use_bias=c.o_bias)
        self.dropout = nn.Dropout(c.attention_dropout)

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic: bool = True,
                 kv_cache: KVCache | None = None, cache_index=None):
        c = self.config
        H, N, K = c.resolved_head_dim, c.num_attention_heads, c.resolved_kv_heads
        B, T, _ = x_BxTxD.shape
        q_BxTxNxH = _projected(self.q_proj, x_BxTxD).reshape(B, T, N, H)
        k_BxSxKxH = _projected(self.k_proj, x_BxTxD).reshape(B, T, K, H)
        v_BxSxKxH = _projected(self.v_proj, x_BxTxD).reshape(B, T, K, H)
        q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("batch", "length", "heads", "head_dim"))
        k_BxSxKxH = nn.with_logical_constraint(k_BxSxKxH, ("batch", "length", "kv_heads", "head_dim"))
        v_BxSxKxH = nn.with_logical_constraint(v_BxSxKxH, ("batch", "length", "kv_heads", "head_dim"))
        q_BxTxNxH = apply_rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH)
        k_BxSxKxH = apply_rope(k_BxSxKxH, cos_BxTxH, sin_BxTxH)
        if kv_cache is not None:  # write the T new keys/values at cache_index; attend over the whole cache
            k_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(
                kv_cache.k, k_BxSxKxH.astype(kv_cache.k.dtype), cache_index, axis=1)
            v_BxSxKxH = jax.lax.dynamic_update_slice_in_dim(
                kv_cache.v, v_BxSxKxH.astype(kv_cache.v.dtype), cache_index, axis=1)
            k_BxSxKxH = nn.with_logical_constraint(k_BxSxKxH, ("batch", "length", "kv_heads", "head_dim"))
            v_BxSxKxH = nn.with_logical_constraint(v_BxSxKxH, ("batch", "length", "kv_heads", "head_dim"))
            kv_cache = KVCache(k_BxSxKxH, v_BxSxKxH)
            k_BxSxKxH, v_BxSxKxH = k_BxSxKxH.astype(c.dtype), v_BxSxKxH.astype(c.dtype)

        # The core (einsum, Pallas TPU kernel or cuDNN by c.attention); a KV-cache step's dense
        # mask, and init (shapes only, on any host), go to whichever can take it ("auto").
        dropout = None if deterministic or not c.attention_dropout else lambda p: self.dropout(p, deterministic=False)
        out_BxTxNxH = attention_lib.dot_product_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1x1xTxS, dropout=dropout, dtype=c.dtype,
            implementation="auto" if kv_cache is not None or self.is_initializing() else c.attention)
        out_BxTxNxH = nn.with_logical_constraint(out_BxTxNxH, ("batch", "length", "heads", "head_dim"))
        y_BxTxD = _projected(self.o_proj, out_BxTxNxH.reshape(B, T, N * H))
        y_BxTxD = nn.with_logical_constraint(y_BxTxD, ("batch", "length", "embed"))
        return y_BxTxD if kv_cache is None else (y_BxTxD, kv_cache)


def _projected(dense: nn.Dense, x):
    """``dense(x)`` (with its adapter's ``Δy`` when one is in effect) named for the "projections"
    remat policy: the backward pass keeps this one array per projection and recomputes everything
    else, so an adapter's intermediates (LoRA's ``x·A``, ``x·A·B``; MoRA's ``compress(x)·M``) are
    never saved beside it, as ``dots_saveable`` saves every matmul output."""
    return checkpoint_name(dense(x), PROJECTION_NAME)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.gate_proj = _dense(c, c.intermediate_size, use_bias=c.mlp_bias)
        self.up_proj = _dense(c, c.intermediate_size, use_bias=c.mlp_bias)
        self.down_proj = _dense(c, c.hidden_size, use_bias=c.mlp_bias)

    def __call__(self, x_BxTxD):
        h_BxTxF = nn.silu(_projected(self.gate_proj, x_BxTxD)) * _projected(self.up_proj, x_BxTxD)
        h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "length", "mlp"))
        return nn.with_logical_constraint(_projected(self.down_proj, h_BxTxF), ("batch", "length", "embed"))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: attention then MLP. With ``kv_cache`` returns ``(x, updated cache)``."""

    config: LlamaConfig

    def setup(self):
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
        self.mlp = LlamaMLP(c)

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic: bool = True,
                 kv_cache: KVCache | None = None, cache_index=None):
        h_BxTxD = self.self_attn(self.input_layernorm(x_BxTxD), cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic,
                                 kv_cache, cache_index)
        if kv_cache is not None:
            h_BxTxD, kv_cache = h_BxTxD
        x_BxTxD = x_BxTxD + h_BxTxD
        x_BxTxD = x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
        x_BxTxD = nn.with_logical_constraint(x_BxTxD, ("batch", "length", "embed"))
        return x_BxTxD if kv_cache is None else (x_BxTxD, kv_cache)


class _ScanDecoderLayer(LlamaDecoderLayer):
    """``nn.scan`` body: returns ``(carry, this layer's updated cache or None)``."""

    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic: bool = True,
                 kv_cache: KVCache | None = None, cache_index=None):
        out = super().__call__(x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic, kv_cache, cache_index)
        return out if kv_cache is not None else (out, None)


def _layer_class(config: LlamaConfig):
    """Decoder layer class with remat and/or scan applied per the config."""
    cls = _ScanDecoderLayer if config.scan_layers else LlamaDecoderLayer
    if config.remat_policy != "none":
        if config.remat_policy == "full":
            policy = None
        elif config.remat_policy == "projections":
            policy = jax.checkpoint_policies.save_only_these_names(PROJECTION_NAME)
        else:
            policy = getattr(jax.checkpoint_policies, config.remat_policy)
        # static_argnums counts `self` as 0: `deterministic` is argument 5.
        cls = nn.remat(cls, policy=policy, prevent_cse=not config.scan_layers, static_argnums=(5,))
    if config.scan_layers:
        cls = nn.scan(
            cls,
            variable_axes={"params": 0, "adapters": 0},
            split_rngs={"params": True, "dropout": True},
            # cos, sin, mask, deterministic broadcast; the cache is scanned over its layer axis.
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
            length=config.num_hidden_layers,
        )
    return cls


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm (HF ``LlamaModel``); returns hidden states, and the
    updated cache when ``kv_cache`` is given."""

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

    def __call__(self, input_ids_BxT, attention_mask=None, segment_ids=None, positions=None, deterministic=True,
                 kv_cache=None, cache_index=None):
        c = self.config
        B, T = input_ids_BxT.shape
        if positions is None:
            positions = segment_positions(segment_ids) if segment_ids is not None else jnp.arange(T)[None]
        positions_BxT = jnp.broadcast_to(positions, (B, T))
        cos_BxTxH, sin_BxTxH = rope_cos_sin(
            positions_BxT, c.resolved_head_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        if kv_cache is None and not self.is_initializing() and attention_lib.takes_segment_mask(c.attention):
            # a kernel: segment ids, no (T, S) matrix
            mask_Bx1x1xTxS = attention_lib.SegmentMask.from_inputs(
                (B, T), attention_mask, segment_ids, sliding_window=c.sliding_window)
        elif kv_cache is None:
            mask_Bx1x1xTxS = make_attention_mask(T, attention_mask, segment_ids, sliding_window=c.sliding_window)
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            S = jax.tree_util.tree_leaves(kv_cache)[0].shape[-3]
            mask_Bx1x1xTxS = make_attention_mask(T, attention_mask, sliding_window=c.sliding_window,
                                                 query_offset=cache_index, key_length=S)

        x_BxTxD = nn.with_logical_constraint(self.embed_tokens(input_ids_BxT), ("batch", "length", "embed"))
        if c.scan_layers:
            x_BxTxD, kv_cache = self.layers(x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic,
                                            kv_cache, cache_index)
        elif kv_cache is None:
            for layer in self.layers:
                x_BxTxD = layer(x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic)
        else:
            updated = []
            for layer, layer_cache in zip(self.layers, kv_cache, strict=True):
                x_BxTxD, layer_cache = layer(x_BxTxD, cos_BxTxH, sin_BxTxH, mask_Bx1x1xTxS, deterministic,
                                             layer_cache, cache_index)
                updated.append(layer_cache)
            kv_cache = tuple(updated)
        h_BxTxD = self.norm(x_BxTxD)
        return h_BxTxD if kv_cache is None else (h_BxTxD, kv_cache)

    def attend(self, x_BxTxD):
        """Tied LM head: ``x @ embedding.T``."""
        return self.embed_tokens.attend(x_BxTxD)


class LlamaForCausalLM(nn.Module):
    """HF ``LlamaForCausalLM``: ``apply({'params': p}, input_ids, ...) -> logits (B, T, V) float32``.

    ``attention_mask`` (B, T): 1 for real tokens, 0 for padding keys (positions stay ``arange``,
    as in HF's forward; pass ``positions`` for left padding). ``segment_ids`` (B, T): packed
    sequences, attention only within a segment, 0 = padding; positions then restart at each segment
    unless ``positions`` is given. ``deterministic=False`` enables attention dropout (rng 'dropout').
    ``method="decode"`` runs new tokens against a KV cache (:meth:`decode`).
    """

    config: LlamaConfig

    def setup(self):
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = _dense(self.config, self.config.vocab_size)

    def _logits(self, h_BxTxD):
        logits_BxTxV = self.model.attend(h_BxTxD) if self.config.tie_word_embeddings else self.lm_head(h_BxTxD)
        return nn.with_logical_constraint(logits_BxTxV.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, input_ids, attention_mask=None, segment_ids=None, positions=None, deterministic=True):
        return self._logits(self.hidden(input_ids, attention_mask, segment_ids, positions, deterministic))

    def hidden(self, input_ids, attention_mask=None, segment_ids=None, positions=None, deterministic=True):
        """The final hidden states ``(B, T, D)``, before the LM head (``method="hidden"``; a loss that
        runs the head chunk by chunk, :mod:`mora_jax.chunked_loss`, starts here)."""
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer (batch, length) array, got {input_ids.dtype}{input_ids.shape}")
        return self.model(input_ids, attention_mask, segment_ids, positions, deterministic)

    def head(self, h_BxTxD):
        """The LM head on hidden states: float32 logits ``(..., V)`` (``method="head"``)."""
        return self._logits(h_BxTxD)

    def decode(self, input_ids_BxT, positions_BxT, attention_mask_BxS, kv_cache, cache_index):
        """Run ``T`` new tokens, at cache slots ``cache_index + [0, T)``, against ``kv_cache``.

        ``attention_mask_BxS`` covers all ``S`` cache slots (0 = padding, never attended);
        ``positions_BxT`` are the new tokens' RoPE positions. Returns ``(logits of the last new
        token (B, V) float32, updated cache)``: the LM head runs on that one position only.
        """
        h_BxTxD, kv_cache = self.model(input_ids_BxT, attention_mask_BxS, None, positions_BxT, True,
                                       kv_cache, cache_index)
        return self._logits(h_BxTxD[:, -1:])[:, 0], kv_cache


# ---- Parameter helpers ----------------------------------------------------------------------------
def _dummy_ids(config: LlamaConfig):
    return jnp.zeros((1, min(8, config.max_position_embeddings)), jnp.int32)


def init_params(config: LlamaConfig, rng: jax.Array) -> dict:
    """Randomly initialised parameters (HF-style: normal(initializer_range) weights, unit norms, zero biases)."""
    model = LlamaForCausalLM(config)
    return jax.jit(model.init)(rng, _dummy_ids(config))["params"]


def abstract_params(config: LlamaConfig) -> dict:
    """Parameter tree of ``jax.ShapeDtypeStruct`` (no memory allocated)."""
    model = LlamaForCausalLM(config)
    return jax.eval_shape(model.init, jax.random.key(0), _dummy_ids(config))["params"]

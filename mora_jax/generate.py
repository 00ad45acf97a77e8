"""Text generation from a (fine-tuned) LLaMA-family model: one jit-compiled program with a KV cache.

:func:`generate` runs the prompt once (the *prefill*: every prompt token's keys and values go into
the cache, and the logits of the last one give the first new token), then one *decode step* per
further token inside a ``lax.while_loop``: the step embeds the one new token, writes its key and
value at the next cache slot and attends over the cache. The prefix is never re-encoded, so a step
costs the same for a prompt of 10 or 10 000 tokens, up to the attention read of the cache
(:func:`lower_decode_step` and :func:`lower_prefill` expose the step and the prefill for inspection
and timing).

* **Batches** are left-padded (``attention_mask`` 0 on the left, as a HF tokenizer with
  ``padding_side='left'`` gives them); a token's RoPE position counts only the real tokens before
  it, as Hugging Face ``generate`` does, so each row continues exactly as it would alone.
* **Decoding**: greedy at ``temperature == 0``; otherwise sampling after temperature, top-k and
  top-p (HF's order). A row that emits an EOS id is finished: later positions hold the pad id; the
  loop stops when every row is finished.
* **Adapters** as trained (unmerged, the training-time view: ``adapters=``) or folded in first
  (``merge_adapters=True``); ``nn.scan`` models work with their stacked parameters and cache.
* **Sharding**: with ``mesh=``, parameters are laid out by the training rules
  (:mod:`mora_jax.sharding`), batch rows over the data axes and heads over ``tensor``, the cache
  like the keys and values; the new tokens come back replicated.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mora_jax import adapters as adapters_lib
from mora_jax import sharding
from mora_jax.intercept import apply_model
from mora_jax.models.config import LlamaConfig
from mora_jax.models.llama import LlamaForCausalLM, init_kv_cache, kv_cache_logical_axes


def _check_inputs(config: LlamaConfig, input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an integer (batch, length) array, got {input_ids.dtype}{input_ids.shape}")
    B, P = input_ids.shape
    if B == 0 or P == 0:
        raise ValueError(f"input_ids {input_ids.shape} is empty: give at least one prompt token per row")
    if attention_mask is not None and tuple(attention_mask.shape) != (B, P):
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must have input_ids' shape {(B, P)}")
    limit = config.max_position_embeddings
    extends = config.rope_scaling is not None and config.rope_scaling.rope_type == "dynamic"
    if P > limit and not extends:
        raise ValueError(
            f"the prompt has {P} tokens, longer than the model's maximum length {limit} "
            "(max_position_embeddings); shorten or truncate it"
        )
    if P + max_new_tokens > limit and not extends:
        raise ValueError(
            f"{P} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's maximum length {limit} "
            f"(max_position_embeddings); ask for at most {limit - P} new tokens"
        )
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no top-k filtering), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filtering), got {top_p!r}")
    _check_concrete(input_ids, attention_mask, config.vocab_size)


def _check_concrete(input_ids, attention_mask, vocab_size: int) -> None:
    """Value checks, on concrete inputs only (inside a caller's jit the values are unknown)."""
    try:
        ids = np.asarray(input_ids)
        mask = None if attention_mask is None else np.asarray(attention_mask)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    real = ids if mask is None else ids[mask != 0]
    if real.size and (real.min() < 0 or real.max() >= vocab_size):
        raise ValueError(
            f"input_ids hold token ids outside [0, {vocab_size}) (found {real.min()}..{real.max()}): the tokenizer "
            "does not fit this model; use the checkpoint's own tokenizer"
        )
    if mask is None:
        return
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("attention_mask must hold 0 (padding) and 1 (token) only")
    if (mask.sum(axis=1) == 0).any():
        raise ValueError(f"rows {np.flatnonzero(mask.sum(axis=1) == 0).tolist()} of attention_mask are all padding")
    if (np.diff(mask, axis=1) < 0).any():
        raise ValueError(
            "attention_mask has padding after a token: generation needs left padding (padding on the left, e.g. "
            "tokenizer padding_side='left' or mora_jax.generate.left_pad)"
        )


def _eos_ids(config: LlamaConfig, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        return config.eos_token_ids
    ids = (eos_token_id,) if isinstance(eos_token_id, (int, np.integer)) else tuple(eos_token_id)
    if not all(isinstance(i, (int, np.integer)) and 0 <= i < config.vocab_size for i in ids):
        raise ValueError(f"eos_token_id must be token ids in [0, {config.vocab_size}), got {eos_token_id!r}")
    return tuple(int(i) for i in ids)


def _select(logits_BxV, key, temperature: float, top_k: int, top_p: float):
    """The next token of each row: argmax at temperature 0, else a sample (temperature, top-k, top-p)."""
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / temperature
    neg_inf = jnp.finfo(logits_BxV.dtype).min
    if top_k and top_k < logits_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, neg_inf, logits_BxV)
    if top_p < 1.0:  # keep the most probable tokens whose cumulative probability reaches top_p
        order_BxV = jnp.argsort(-logits_BxV, axis=-1)
        sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        drop_sorted = (jnp.cumsum(probs_BxV, axis=-1) - probs_BxV) >= top_p
        drop_BxV = jnp.zeros_like(drop_sorted).at[jnp.arange(logits_BxV.shape[0])[:, None], order_BxV].set(drop_sorted)
        logits_BxV = jnp.where(drop_BxV, neg_inf, logits_BxV)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


def _constrain_cache(config: LlamaConfig, cache):
    axes = kv_cache_logical_axes(config)
    return jax.tree_util.tree_map(lambda x, a: nn.with_logical_constraint(x, a), cache, axes,
                                  is_leaf=lambda a: isinstance(a, tuple) and all(isinstance(n, str) for n in a))


def _decode(model, params, adapters, tokens_BxT, positions_BxT, kv_mask_BxS, cache, cache_index):
    """One call of the model on new tokens against the cache: ``(last logits (B, V), cache)``."""
    return apply_model(model, params, tokens_BxT, positions_BxT, kv_mask_BxS, cache, cache_index,
                       adapters=adapters, method="decode")


def _cache_length(prompt_length: int, max_new_tokens: int) -> int:
    """Cache slots of a generation: every prompt token and every new token but the last."""
    return prompt_length + max_new_tokens - 1


def _prefill(config: LlamaConfig, model, params, adapters, ids_BxP, mask_BxP, cache_length: int):
    """The prompt through the model once, into a fresh cache of ``cache_length`` slots:
    ``(logits of the last prompt token (B, V), cache, kv_mask (B, cache_length))``."""
    B, P = ids_BxP.shape
    cache = _constrain_cache(config, init_kv_cache(config, B, cache_length))
    kv_mask_BxS = jnp.concatenate([mask_BxP, jnp.ones((B, cache_length - P), mask_BxP.dtype)], axis=1)
    positions_BxP = jnp.where(mask_BxP != 0, jnp.cumsum(mask_BxP, axis=1) - 1, 1)  # HF's position_ids
    logits_BxV, cache = _decode(model, params, adapters, ids_BxP, positions_BxP, kv_mask_BxS, cache, 0)
    return logits_BxV, cache, kv_mask_BxS


@functools.lru_cache(maxsize=32)
def _compiled(config: LlamaConfig, max_new_tokens: int, temperature: float, top_k: int, top_p: float,
              eos_ids: tuple[int, ...], pad_id: int, merge_adapters: bool, out_sharding):
    model = LlamaForCausalLM(config)
    eos_E = jnp.asarray(eos_ids or (-1,), jnp.int32)

    def run(params, adapters, ids_BxP, mask_BxP, rng):
        if merge_adapters and adapters:
            params, adapters = adapters_lib.merge(params, adapters), None
        B, P = ids_BxP.shape
        logits_BxV, cache, kv_mask_BxS = _prefill(config, model, params, adapters, ids_BxP, mask_BxP,
                                                  _cache_length(P, max_new_tokens))
        token_B = _select(logits_BxV, jax.random.fold_in(rng, 0), temperature, top_k, top_p)
        out_BxN = jnp.full((B, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)
        done_B = jnp.isin(token_B, eos_E)
        next_position_B = jnp.sum(mask_BxP != 0, axis=1).astype(jnp.int32)

        def cond(carry):
            i, _, _, _, done_B, _ = carry
            return (i < max_new_tokens) & ~jnp.all(done_B)

        def body(carry):
            i, cache, token_B, position_B, done_B, out_BxN = carry
            logits_BxV, cache = _decode(model, params, adapters, token_B[:, None], position_B[:, None], kv_mask_BxS,
                                        cache, P + i - 1)
            token_B = _select(logits_BxV, jax.random.fold_in(rng, i), temperature, top_k, top_p)
            token_B = jnp.where(done_B, pad_id, token_B)
            out_BxN = jax.lax.dynamic_update_slice_in_dim(out_BxN, token_B[:, None], i, axis=1)
            return i + 1, cache, token_B, position_B + 1, done_B | jnp.isin(token_B, eos_E), out_BxN

        carry = (jnp.int32(1), cache, token_B, next_position_B, done_B, out_BxN)
        out_BxN = jax.lax.while_loop(cond, body, carry)[-1]
        if out_sharding is not None:
            out_BxN = jax.lax.with_sharding_constraint(out_BxN, out_sharding)
        return out_BxN

    return jax.jit(run)


def _place(mesh: Mesh | None, rules, params, adapters, ids, mask):
    """Inputs laid out over ``mesh`` like training (params by the rules, rows over the data axes)."""
    rules = rules or sharding.DEFAULT_RULES
    batch = sharding.batch_sharding(mesh, rules)
    shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, rules))
    if ids.shape[0] % shards:
        raise ValueError(
            f"{ids.shape[0]} prompts cannot be split over the mesh's {shards} batch shards: give a multiple of "
            f"{shards} rows (pad with copies of a prompt) or a mesh with fewer data-parallel devices"
        )
    params = jax.device_put(params, sharding.tree_shardings(params, mesh, rules))
    if adapters:
        adapters = jax.device_put(adapters, sharding.tree_shardings(adapters, mesh, rules))
    ids, mask = np.asarray(ids), np.asarray(mask)
    ids = jax.make_array_from_callback(ids.shape, batch, lambda index: ids[index])
    mask = jax.make_array_from_callback(mask.shape, batch, lambda index: mask[index])
    return rules, params, adapters, ids, mask


def generate(
    model: LlamaForCausalLM,
    params,
    input_ids,
    *,
    max_new_tokens: int,
    attention_mask=None,
    adapters=None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    rng: jax.Array | None = None,
    pad_token_id: int | None = None,
    merge_adapters: bool = False,
    mesh: Mesh | None = None,
    rules=None,
) -> jax.Array:
    """The ``(batch, max_new_tokens)`` int32 tokens generated after each prompt row.

    Args:
      model, params: a ``LlamaForCausalLM`` and its parameters (unrolled or, for a scanned model,
        stacked), e.g. from ``mora_jax.hf.load_llama``.
      input_ids: ``(batch, length)`` prompt token ids, left-padded when rows differ in length.
      max_new_tokens: how many tokens to generate (> 0); prompt + new tokens must fit the model's
        ``max_position_embeddings`` (not enforced for ``dynamic`` RoPE scaling, which extends it).
      attention_mask: ``(batch, length)``, 0 for left padding; default all tokens.
      adapters: an adapter tree (``init_adapters`` / ``load_adapter`` / a training state's), applied
        unmerged; with ``merge_adapters=True`` folded into the weights once first.
      temperature, top_k, top_p: greedy at ``temperature == 0``, else sampling with HF's filters.
      eos_token_id: id(s) ending a row; None = the model config's (an empty list: never stop).
      rng: key for sampling (default ``jax.random.key(0)``).
      pad_token_id: written after a row's EOS; default the config's pad id, else the first EOS id.
      mesh, rules: run sharded over ``mesh`` with :class:`mora_jax.sharding.ShardingRules`.
    """
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"model must be a mora_jax LlamaForCausalLM, got {type(model).__name__}")
    config = model.config.replace(remat_policy="none")  # same parameters; nothing to rematerialise
    input_ids = input_ids if isinstance(input_ids, jax.Array) else np.asarray(input_ids)
    if attention_mask is not None and not isinstance(attention_mask, jax.Array):
        attention_mask = np.asarray(attention_mask)
    _check_inputs(config, input_ids, attention_mask, max_new_tokens, float(temperature), top_k, float(top_p))
    eos_ids = _eos_ids(config, eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
    rng = jax.random.key(0) if rng is None else rng
    adapters = adapters or None
    if mesh is None:
        fn = _compiled(config, int(max_new_tokens), float(temperature), int(top_k), float(top_p), eos_ids,
                       int(pad_token_id), bool(merge_adapters), None)
        return fn(params, adapters, jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32), rng)

    rules, params, adapters, ids, mask = _place(mesh, rules, params, adapters, np.asarray(input_ids, np.int32),
                                                np.asarray(mask, np.int32))
    out_sharding = NamedSharding(mesh, PartitionSpec())
    fn = _compiled(config, int(max_new_tokens), float(temperature), int(top_k), float(top_p), eos_ids,
                   int(pad_token_id), bool(merge_adapters), out_sharding)
    with sharding.use_mesh(mesh, rules):
        out = fn(params, adapters, ids, mask, rng)
    return out if out.is_fully_addressable else out.addressable_data(0)


def lower_decode_step(model: LlamaForCausalLM, params, *, batch_size: int, cache_length: int, adapters=None):
    """The lowered (``jax.stages.Lowered``) decode step of :func:`generate`: one new token per row
    against a cache of ``cache_length`` slots. ``.compile().cost_analysis()`` gives its FLOPs."""
    config = model.config.replace(remat_policy="none")
    gen_model = LlamaForCausalLM(config)
    cache = jax.eval_shape(lambda: init_kv_cache(config, batch_size, cache_length))
    token = jax.ShapeDtypeStruct((batch_size, 1), jnp.int32)
    kv_mask = jax.ShapeDtypeStruct((batch_size, cache_length), jnp.int32)

    def step(params, adapters, token, position, kv_mask, cache, index):
        return _decode(gen_model, params, adapters, token, position, kv_mask, cache, index)

    return jax.jit(step).lower(params, adapters or None, token, token, kv_mask, cache, jnp.int32(cache_length - 1))


def lower_prefill(model: LlamaForCausalLM, params, *, batch_size: int, prompt_length: int, max_new_tokens: int,
                  adapters=None):
    """The lowered prefill of :func:`generate` (the same function its program runs first): a
    ``(batch_size, prompt_length)`` prompt into a fresh cache sized as :func:`generate` sizes it for
    ``max_new_tokens``. Call the compiled program as ``f(params, adapters, input_ids, attention_mask)``
    (int32 arrays); it returns ``(logits of the last prompt token (B, V), cache)``."""
    config = model.config.replace(remat_policy="none")
    gen_model = LlamaForCausalLM(config)
    cache_length = _cache_length(prompt_length, max_new_tokens)

    def prefill(params, adapters, ids_BxP, mask_BxP):
        logits_BxV, cache, _ = _prefill(config, gen_model, params, adapters, ids_BxP, mask_BxP, cache_length)
        return logits_BxV, cache

    prompt = jax.ShapeDtypeStruct((batch_size, prompt_length), jnp.int32)
    return jax.jit(prefill).lower(params, adapters or None, prompt, prompt)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int32 ``(batch, longest)`` of token-id lists, padded on the left."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("left_pad needs at least one sequence, none of them empty")
    width = max(len(s) for s in sequences)
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = seq
        mask[row, width - len(seq):] = 1
    return ids, mask


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool = False,
                   system_prompt: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``(input_ids, attention_mask)`` of text prompts: BOS (when the tokenizer adds one)
    + the text, or with ``chat=True`` the prompt as a user turn of the tokenizer's chat template
    followed by the assistant header (the template writes its own BOS)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    rows = []
    for prompt in prompts:
        if chat:
            system = [{"role": "system", "content": system_prompt}] if system_prompt else []
            text = tokenizer.apply_chat_template([*system, {"role": "user", "content": prompt}],
                                                 add_generation_prompt=True)
            rows.append(tokenizer.encode(text))
        else:
            rows.append(([tokenizer.bos_id] if tokenizer.adds_bos else []) + tokenizer.encode(prompt))
    return left_pad(rows, pad_id=max(tokenizer.pad_id, 0))


__all__ = ["encode_prompts", "generate", "left_pad", "lower_decode_step", "lower_prefill"]

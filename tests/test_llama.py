"""LLaMA model: layout contract, numerics against a NumPy reference and the HF golden logits,
scan / remat / bf16 equivalences, masking and packing, and the 'adapters' collection plumbing."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from mora_jax.models import (
    LLAMA_CONFIGS,
    LlamaConfig,
    LlamaForCausalLM,
    abstract_params,
    count_params,
    init_params,
    stack_layers,
    unstack_layers,
)
from mora_jax.models.llama import segment_positions

TINY = LLAMA_CONFIGS["tiny"]
PROJ = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}


@functools.lru_cache(maxsize=None)
def _random_params(config: LlamaConfig, seed: int = 0):
    """Random parameters with non-trivial norm weights (so a wrong norm placement shows).

    Drawn with NumPy on the abstract tree: much faster to build than ``init_params`` on CPU.
    """
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(abstract_params(config))
    return traverse_util.unflatten_dict({
        path: jnp.asarray(
            rng.uniform(0.5, 1.5, x.shape) if path[-1] == "weight" else rng.normal(0.0, 0.1, x.shape), x.dtype
        )
        for path, x in flat.items()
    })  # fmt: skip


def _ids(config: LlamaConfig, shape=(2, 12), seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, config.vocab_size, shape), jnp.int32)


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: LlamaConfig):
    return jax.jit(LlamaForCausalLM(config).apply, static_argnames=("deterministic",))


def _logits(config, params, ids, **kw):
    """Jitted forward (op-by-op dispatch would dominate the test time)."""
    return _jitted_apply(config)({"params": params}, ids, **kw)


def numpy_reference(config: LlamaConfig, params, ids) -> np.ndarray:
    """HF LlamaForCausalLM forward in float64 NumPy (written independently of the Flax model)."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)["model"]
    N, K, H = config.num_attention_heads, config.resolved_kv_heads, config.resolved_head_dim
    ids = np.asarray(ids)
    B, T = ids.shape

    def rms(x, w):
        return x / np.sqrt(np.mean(x**2, -1, keepdims=True) + config.rms_norm_eps) * w

    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, H, 2) / H)
    ang = np.arange(T)[:, None] * inv_freq
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # (B, T, n, H)
        x1, x2 = x[..., : H // 2], x[..., H // 2 :]
        return x * cos[None, :, None] + np.concatenate([-x2, x1], -1) * sin[None, :, None]

    x = p["embed_tokens"]["embedding"][ids]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(config.num_hidden_layers):
        lp = p[f"layers_{i}"]
        att, mlp = lp["self_attn"], lp["mlp"]
        h = rms(x, lp["input_layernorm"]["weight"])
        q = rope((h @ att["q_proj"]["kernel"]).reshape(B, T, N, H))
        k = np.repeat(rope((h @ att["k_proj"]["kernel"]).reshape(B, T, K, H)), N // K, axis=2)
        v = np.repeat((h @ att["v_proj"]["kernel"]).reshape(B, T, K, H), N // K, axis=2)
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(H)
        s = np.where(causal, s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + np.einsum("bnts,bsnh->btnh", s, v).reshape(B, T, N * H) @ att["o_proj"]["kernel"]
        h = rms(x, lp["post_attention_layernorm"]["weight"])
        g = h @ mlp["gate_proj"]["kernel"]
        x = x + (g / (1 + np.exp(-g)) * (h @ mlp["up_proj"]["kernel"])) @ mlp["down_proj"]["kernel"]
    x = rms(x, p["norm"]["weight"])
    if config.tie_word_embeddings:
        return x @ p["embed_tokens"]["embedding"].T
    return x @ np.asarray(params["lm_head"]["kernel"], np.float64)


# ---- Layout ----------------------------------------------------------------------------------------
def test_param_tree_layout():
    params = abstract_params(TINY)
    assert set(params) == {"model", "lm_head"}
    assert set(params["model"]) == {"embed_tokens", "layers_0", "layers_1", "norm"}
    assert params["model"]["embed_tokens"]["embedding"].shape == (256, 64)
    assert params["lm_head"]["kernel"].shape == (64, 256)
    layer = params["model"]["layers_0"]
    assert set(layer) == {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
    shapes = {(sub, n): layer[sub][n]["kernel"].shape for sub, names in PROJ.items() for n in names}
    assert shapes == {
        ("self_attn", "q_proj"): (64, 64), ("self_attn", "k_proj"): (64, 32), ("self_attn", "v_proj"): (64, 32),
        ("self_attn", "o_proj"): (64, 64), ("mlp", "gate_proj"): (64, 172), ("mlp", "up_proj"): (64, 172),
        ("mlp", "down_proj"): (172, 64),
    }  # fmt: skip
    assert all(set(layer[sub][n]) == {"kernel"} for sub, names in PROJ.items() for n in names)
    assert layer["input_layernorm"]["weight"].shape == (64,)
    assert count_params(params) == 123_712


def test_init_params():
    config = TINY.replace(num_hidden_layers=1)  # init compiles a threefry per leaf: keep it small
    params = init_params(config, jax.random.key(0))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract_params(config))
    np.testing.assert_array_equal(params["model"]["norm"]["weight"], 1.0)  # HF init: unit norms,
    assert 0.015 < float(jnp.std(params["model"]["embed_tokens"]["embedding"])) < 0.025  # N(0, 0.02)


def test_tied_has_no_lm_head_and_scan_stacks():
    tied = abstract_params(TINY.replace(tie_word_embeddings=True))
    assert "lm_head" not in tied
    scanned = abstract_params(TINY.replace(scan_layers=True))
    assert set(scanned["model"]) == {"embed_tokens", "layers", "norm"}
    assert scanned["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
    assert scanned["model"]["layers"]["input_layernorm"]["weight"].shape == (2, 64)


def test_presets():
    assert count_params(abstract_params(LLAMA_CONFIGS["llama2-7b"])) == 6_738_415_616
    c250 = LLAMA_CONFIGS["mora-250m"]
    assert (c250.hidden_size, c250.intermediate_size, c250.num_hidden_layers, c250.num_attention_heads,
            c250.vocab_size, c250.max_position_embeddings) == (768, 2560, 24, 16, 32100, 1024)  # fmt: skip
    c1b = LLAMA_CONFIGS["mora-1b"]
    assert (c1b.hidden_size, c1b.intermediate_size, c1b.num_hidden_layers, c1b.num_attention_heads,
            c1b.vocab_size) == (2048, 5461, 24, 32, 32100)  # fmt: skip


# ---- Numerics ----------------------------------------------------------------------------------------
def test_golden_base_logits(fixtures_dir):
    from mora_jax.hf import load_llama

    expected = np.load(fixtures_dir / "e2e_public" / "expected.npz")
    model, params = load_llama(fixtures_dir / "e2e_public" / "base")
    logits = model.apply({"params": params}, jnp.asarray(expected["input_ids"]))
    assert logits.dtype == jnp.float32 and logits.shape == (2, 24, 256)
    np.testing.assert_allclose(logits, expected["logits_base"], atol=2e-4, rtol=0)


@pytest.mark.parametrize(
    "changes",
    [
        {},  # GQA: 4 query heads, 2 key/value heads
        {"num_key_value_heads": 1},  # multi-query
        {"num_key_value_heads": None},  # multi-head
        {"head_dim": 8, "num_attention_heads": 6, "num_key_value_heads": 3},  # head_dim != hidden/heads
        {"tie_word_embeddings": True, "rope_theta": 500.0, "rms_norm_eps": 1e-5},
    ],
    ids=["gqa", "mqa", "mha", "head_dim", "tied"],
)
def test_matches_numpy_reference(changes):
    config = TINY.replace(**changes)
    params = _random_params(config)
    ids = _ids(config)
    np.testing.assert_allclose(_logits(config, params, ids), numpy_reference(config, params, ids), atol=2e-5)


def test_scan_matches_unrolled():
    params = _random_params(TINY)
    ids = _ids(TINY)
    stacked = stack_layers(params)
    scanned = _logits(TINY.replace(scan_layers=True), stacked, ids)
    np.testing.assert_allclose(scanned, _logits(TINY, params, ids), atol=1e-5)
    back = unstack_layers(stacked)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), back, params))


@functools.lru_cache(maxsize=None)
def _reference_loss_and_grads():
    return _loss_and_grads(TINY, _random_params(TINY), _ids(TINY))


def _loss_and_grads(config, params, ids):
    def loss(p):
        return jnp.mean(jax.nn.log_softmax(_logits(config, p, ids))[..., 0])

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy,scan", [("full", False), ("dots_saveable", True), ("projections", True), ("projections", False)])
def test_remat_same_logits_and_grads(policy, scan):
    params = _random_params(TINY)
    ids = _ids(TINY)
    ref_loss, ref_grads = _reference_loss_and_grads()
    config = TINY.replace(remat_policy=policy, scan_layers=scan)
    p = stack_layers(params) if scan else params
    loss, grads = _loss_and_grads(config, p, ids)
    grads = unstack_layers(grads) if scan else grads
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_bf16_compute_and_params():
    params = _random_params(TINY)
    ids = _ids(TINY)
    ref = _logits(TINY, params, ids)
    bf16 = _logits(TINY.replace(dtype="bfloat16"), params, ids)
    assert bf16.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(bf16 - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 1e-2
    cfg = TINY.replace(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(abstract_params(cfg))} == {jnp.dtype(jnp.bfloat16)}
    p16 = _random_params(cfg)
    assert _logits(cfg, p16, ids).dtype == jnp.float32


# ---- Masks, padding, packing ---------------------------------------------------------------------------
def test_right_padding_mask():
    params = _random_params(TINY)
    ids = _ids(TINY, (1, 9))
    padded = jnp.concatenate([ids, jnp.zeros((1, 5), jnp.int32)], axis=1)
    mask = jnp.concatenate([jnp.ones((1, 9)), jnp.zeros((1, 5))], axis=1).astype(jnp.int32)
    out = _logits(TINY, params, padded, attention_mask=mask)
    np.testing.assert_allclose(out[:, :9], _logits(TINY, params, ids), atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_left_padding_with_positions():
    params = _random_params(TINY)
    ids = _ids(TINY, (1, 9))
    padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), ids], axis=1)
    mask = (jnp.arange(13) >= 4).astype(jnp.int32)[None]
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    out = _logits(TINY, params, padded, attention_mask=mask, positions=positions)
    np.testing.assert_allclose(out[:, 4:], _logits(TINY, params, ids), atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(out)))  # fully masked padding rows stay finite


def test_segment_positions():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(
        segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 7]]
    )


def test_packed_segments_equal_separate():
    params = _random_params(TINY)
    a, b = _ids(TINY, (1, 10), seed=1), _ids(TINY, (1, 9), seed=2)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 5), jnp.int32)], axis=1)
    seg = jnp.array([[1] * 10 + [2] * 9 + [0] * 5])
    out = _logits(TINY, params, packed, segment_ids=seg)
    np.testing.assert_allclose(out[:, :10], _logits(TINY, params, a), atol=1e-5)
    np.testing.assert_allclose(out[:, 10:19], _logits(TINY, params, b), atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_attention_dropout_needs_rng_only_when_training():
    config = TINY.replace(attention_dropout=0.5)
    params = _random_params(config)
    ids = _ids(config)
    np.testing.assert_allclose(_logits(config, params, ids), _logits(TINY, params, ids), atol=1e-6)
    train = _jitted_apply(config)({"params": params}, ids, deterministic=False, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(train, _logits(TINY, params, ids), atol=1e-3)


def test_rejects_bad_input_ids():
    params = _random_params(TINY)
    with pytest.raises(ValueError, match="integer"):
        LlamaForCausalLM(TINY).apply({"params": params}, jnp.zeros((2, 4), jnp.float32))


# ---- Integration contracts -------------------------------------------------------------------------------
def _delta_interceptor(next_fun, args, kwargs, context):
    """Minimal stand-in for the adapter system: y += x @ adapters/kernel on every nn.Dense."""
    y = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense) and module.has_variable("adapters", "kernel"):
        y = y + args[0] @ module.get_variable("adapters", "kernel")
    return y


@pytest.mark.parametrize("policy,scan", [("none", False), ("none", True), ("full", True)])
def test_adapters_collection_reaches_every_dense(policy, scan):
    params = _random_params(TINY)
    ids = _ids(TINY)
    rng = np.random.default_rng(3)
    flat = traverse_util.flatten_dict(params)
    delta_flat = {k: jnp.asarray(rng.normal(0, 0.02, v.shape), v.dtype) for k, v in flat.items() if k[-1] == "kernel"}
    deltas = traverse_util.unflatten_dict(delta_flat)  # every projection and the LM head
    merged = traverse_util.unflatten_dict({k: v + delta_flat.get(k, 0) for k, v in flat.items()})
    config = TINY.replace(remat_policy=policy, scan_layers=scan)
    p, a = (stack_layers(params), stack_layers(deltas)) if scan else (params, deltas)
    with nn.intercept_methods(_delta_interceptor):
        out = jax.jit(lambda p, a: LlamaForCausalLM(config).apply({"params": p, "adapters": a}, ids))(p, a)
    np.testing.assert_allclose(out, _logits(TINY, merged, ids), atol=1e-5)


def test_logical_axis_rules_under_mesh():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py forces 8 CPU devices)")
    params = _random_params(TINY)
    ids = _ids(TINY)
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 2), ("data", "model"), axis_types=(auto, auto), devices=jax.devices()[:4])
    rules = (("batch", "data"), ("heads", "model"), ("kv_heads", "model"), ("mlp", "model"), ("vocab", "model"))
    forward = jax.jit(lambda p, x: LlamaForCausalLM(TINY).apply({"params": p}, x))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        hlo = forward.lower(params, ids).as_text()
        out = forward(params, ids)
    assert hlo.count("sharding_constraint") + hlo.count("@Sharding") >= 10  # annotations took effect
    np.testing.assert_allclose(out, _logits(TINY, params, ids), atol=1e-5)


# ---- Config ------------------------------------------------------------------------------------------------
def test_config_hf_round_trip(fixtures_dir):
    import json

    hf = json.loads((fixtures_dir / "e2e_public" / "base" / "config.json").read_text())
    config = LlamaConfig.from_hf_dict(hf)
    assert config == TINY.replace(head_dim=16, bos_token_id=1, eos_token_id=2)
    assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
    assert LlamaConfig.from_hf_dict(hf, dtype="bfloat16", scan_layers=True).dtype == jnp.bfloat16
    old = {k: v for k, v in hf.items() if k != "max_position_embeddings"} | {"max_sequence_length": 1024}
    assert LlamaConfig.from_hf_dict(old).max_position_embeddings == 1024
    assert config.resolved_head_dim == 16 and config.resolved_kv_heads == 2


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
        ({"hidden_size": 66}, "not divisible"),
        ({"remat_policy": "sometimes"}, "unknown remat_policy"),
        ({"dtype": "int8"}, "not supported"),
        ({"num_hidden_layers": 0}, "positive int"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)

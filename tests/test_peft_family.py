"""DoRA, PiSSA and HiRA in the adapter framework (CPU, no torch): init, apply, merge, gradients,
partition, sharding, ReLoRA-style restarts, FLOP model and PEFT files."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mora_jax as mj
from mora_jax import adapters as adapters_lib
from mora_jax import dora, flops, hira, pissa, remora, sharding, training
from mora_jax.cli import describe_adapter
from mora_jax.errors import ConfigError
from mora_jax.hf import AdapterFormatError, load_adapter, load_llama, save_adapter
from mora_jax.hf.peft_files import read_adapter_tensors
from mora_jax.methods import METHODS, DoRAConfig, HiRAConfig, MoRAConfig, PiSSAConfig, make_config
from mora_jax.models.config import LLAMA_CONFIGS, LlamaConfig
from mora_jax.optim import partition
from mora_jax.run_config import ExportConfig, RunConfig

BASE = pathlib.Path(__file__).parent / "fixtures" / "e2e_public" / "base"


@pytest.fixture(scope="module")
def base():
    return load_llama(BASE)


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)))


def _perturbed(adapters, scale=0.05, seed=1):
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _max_diff(a, b):
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# ---- DoRA ---------------------------------------------------------------------------------------
def test_dora_registered_and_validated():
    assert METHODS["dora"] is DoRAConfig
    assert make_config("dora", r=2, alpha=4.0).alpha == 4.0
    with pytest.raises(ValueError, match="alpha must be positive"):
        DoRAConfig(alpha=0.0)
    with pytest.raises(ValueError, match="r must be a positive int"):
        DoRAConfig(r=0)


def test_dora_init_is_identity_and_magnitude_is_column_norm(base, ids):
    model, params = base
    adapters = mj.init_adapters(params, DoRAConfig(r=4), jax.random.key(0))
    node = adapters["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    kernel = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(np.asarray(kernel), axis=0), rtol=1e-6)
    np.testing.assert_array_equal(mj.apply_model(model, params, ids, adapters=adapters), model.apply({"params": params}, ids))


def test_dora_weight_norm_expansion_matches_dense():
    rng = np.random.default_rng(0)
    k, a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((24, 20), (24, 3), (3, 20)))
    dense = np.linalg.norm(np.asarray(k) + 0.7 * np.asarray(a) @ np.asarray(b), axis=0)
    np.testing.assert_allclose(dora.weight_norm(k, a, b, 0.7), dense, rtol=1e-5)


def test_dora_forward_is_the_merged_kernel_and_merge_unmerge_exact(base, ids):
    model, params = base
    adapters = _perturbed(mj.init_adapters(params, DoRAConfig(r=4, alpha=8.0), jax.random.key(0)))
    ours = mj.apply_model(model, params, ids, adapters=adapters)
    merged = mj.merge(params, adapters)
    np.testing.assert_allclose(model.apply({"params": merged}, ids), ours, atol=2e-5)
    assert float(jnp.abs(ours - model.apply({"params": params}, ids)).max()) > 1e-2
    merged2, norms = adapters_lib.merge_with_norms(params, adapters)
    assert _max_diff(merged, merged2) == 0.0
    assert _max_diff(adapters_lib.unmerge_with_norms(merged2, adapters, norms), params) < 1e-6
    with pytest.raises(ValueError, match="merge_with_norms"):
        mj.unmerge(merged, adapters)


def test_dora_norm_is_detached(base, ids):
    """The gradient w.r.t. A, B equals the one with the norm frozen at its value (PEFT's and the paper's)."""
    model, params = base
    adapters = _perturbed(mj.init_adapters(params, DoRAConfig(r=2), jax.random.key(0)))
    kpath = ("model", "layers_1", "mlp", "up_proj", "kernel")
    node = adapters_lib.flatten(adapters)[kpath]
    kernel = adapters_lib.flatten(params)[kpath]
    x = jax.random.normal(jax.random.key(3), (5, node.in_features))

    def out(a, b, frozen_norm=None):
        n = jnp.linalg.norm(kernel + node.scale * a @ b, axis=0) if frozen_norm is None else frozen_norm
        w = kernel + node.scale * a @ b
        return jnp.sum(jnp.sin(x @ w * (node.magnitude / n)))

    n0 = dora.weight_norm(kernel, node.a, node.b, node.scale)
    g_ours = jax.grad(lambda a, b: jnp.sum(jnp.sin(node.replace(a=a, b=b).dense_output(
        x, kernel, base_fn=lambda: x @ kernel, bias_D=None, dropout_fn=None, dtype=jnp.float32))), argnums=(0, 1))(node.a, node.b)
    g_frozen = jax.grad(lambda a, b: out(a, b, n0), argnums=(0, 1))(node.a, node.b)
    g_live = jax.grad(out, argnums=(0, 1))(node.a, node.b)
    np.testing.assert_allclose(g_ours[0], g_frozen[0], atol=1e-5)
    np.testing.assert_allclose(g_ours[1], g_frozen[1], atol=1e-5)
    assert float(jnp.abs(g_live[0] - g_frozen[0]).max()) > 1e-4  # the detachment is visible


def test_dora_scanned_model_and_sharding(ids):
    config = LLAMA_CONFIGS["tiny"].replace(scan_layers=True)
    from mora_jax.models.llama import LlamaForCausalLM, init_params
    model = LlamaForCausalLM(config)
    params = init_params(config, jax.random.key(0))
    layout = mj.dense_layout(model, jnp.zeros((1, 8), jnp.int32))
    ids = ids % config.vocab_size
    adapters = _perturbed(mj.init_adapters(params, DoRAConfig(r=2), jax.random.key(0), layout=layout))
    node = adapters_lib.flatten(adapters)[("model", "layers", "mlp", "up_proj", "kernel")]
    assert node.magnitude.shape == (config.num_hidden_layers, config.intermediate_size)
    ours = mj.apply_model(model, params, ids, adapters=adapters)
    np.testing.assert_allclose(model.apply({"params": mj.merge(params, adapters)}, ids), ours, atol=3e-5)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 4), ("data", "fsdp", "tensor"))
    specs = sharding.specs_of(sharding.tree_shardings(jax.eval_shape(lambda: adapters), mesh))
    up = adapters_lib.flatten(specs)[("model", "layers", "mlp", "up_proj", "kernel")]
    assert up.magnitude == jax.sharding.PartitionSpec(None, "tensor") and up.b == jax.sharding.PartitionSpec(None, None, "tensor")


def test_dora_train_step_partition_and_restart(base, ids):
    model, params = base
    config = DoRAConfig(r=2, alpha=4.0)
    adapters = mj.init_adapters(params, config, jax.random.key(0))
    tx = optax.adam(1e-2)
    state = training.create_train_state(params, adapters, config, tx, jax.random.key(1))
    node = adapters_lib.flatten(state.opt_state["adapters"][0].mu)[("model", "layers_0", "mlp", "down_proj", "kernel")]
    assert isinstance(node, dora.DoRAAdapter)  # moments for a, b and the magnitude; none for the frozen kernels
    assert adapters_lib.count_params(state.opt_state["adapters"]) == 2 * adapters_lib.count_params(adapters) + 1
    batch = {"input_ids": ids}
    for _ in range(3):
        state, metrics = training.train_step(state, batch, model=model, tx=tx, schedule=lambda s: 1e-2)
    moved = adapters_lib.flatten(state.adapters)[("model", "layers_0", "mlp", "down_proj", "kernel")]
    assert float(jnp.abs(moved.b).max()) > 0 and float(jnp.abs(moved.magnitude - node.magnitude).max()) >= 0
    before = training.logits_fn(model, state, ids)
    restarted = remora.merge_and_reset(state, tx=tx, next_type=None)
    fresh = adapters_lib.flatten(restarted.adapters)[("model", "layers_0", "mlp", "down_proj", "kernel")]
    assert not np.any(fresh.b)
    np.testing.assert_allclose(training.logits_fn(model, restarted, ids), before, atol=3e-5)


def test_dora_flops():
    config = LLAMA_CONFIGS["tiny"]
    lora = flops.flop_breakdown(config, 2, 16, "lora", 4)
    dora_ = flops.flop_breakdown(config, 2, 16, "dora", 4)
    per_step = sum(flops.adapter_flops_per_step(k, d, "dora", 4) for k, d in flops.llama_kernel_shapes(config).values())
    assert dora_["adapter"] - lora["adapter"] == pytest.approx(config.num_hidden_layers * per_step)
    k, d = 64, 96
    assert flops.adapter_flops_per_step(k, d, "dora", 4) == 2 * k * d * 4 + 2 * k * 16 + 2 * 16 * d


def test_dora_peft_files_round_trip(tmp_path, base, ids):
    model, params = base
    config = DoRAConfig(r=2, alpha=4.0, rslora=True)
    adapters = _perturbed(mj.init_adapters(params, config, jax.random.key(0)))
    save_adapter(tmp_path / "a", config, adapters)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["use_dora"] is True and raw["use_rslora"] is True
    loaded_config, loaded = load_adapter(tmp_path / "a", params)
    assert isinstance(loaded_config, DoRAConfig) and loaded_config.rslora
    assert _max_diff(loaded, adapters) == 0.0
    with pytest.raises(AdapterFormatError, match="does not match the LoRAConfig"):
        save_adapter(tmp_path / "b", mj.LoRAConfig(r=2, alpha=4.0, rslora=True), adapters)
    raw["use_dora"] = False
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterFormatError, match="use_dora is not set"):
        load_adapter(tmp_path / "a", params)


# ---- PiSSA --------------------------------------------------------------------------------------
def test_pissa_init_is_the_principal_part_and_keeps_the_model(base, ids):
    model, params = base
    config = PiSSAConfig(r=3, alpha=6.0)
    with pytest.raises(TypeError, match="pissa.init"):
        mj.init_adapters(params, config, jax.random.key(0))
    residual, adapters = pissa.init(params, config, jax.random.key(0))
    path = ("model", "layers_0", "mlp", "gate_proj", "kernel")
    kernel = np.asarray(adapters_lib.flatten(params)[path])
    node = adapters_lib.flatten(adapters)[path]
    u, s, vt = np.linalg.svd(kernel, full_matrices=False)
    np.testing.assert_allclose(node.scale * np.asarray(node.a @ node.b), (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(adapters_lib.flatten(residual)[path]), compute_uv=False)[:-3],
                               s[3:], atol=1e-5)
    np.testing.assert_allclose(mj.apply_model(model, residual, ids, adapters=adapters), model.apply({"params": params}, ids),
                               atol=2e-5)
    # the randomized SVD (niter subspace iterations) finds the same principal part of a kernel with a decaying spectrum
    rng = np.random.default_rng(0)
    q1, _ = np.linalg.qr(rng.standard_normal((64, 64)))
    q2, _ = np.linalg.qr(rng.standard_normal((48, 48)))
    k = (q1[:, :48] * (0.5 ** np.arange(48))) @ q2.T
    exact = pissa.principal_init(jnp.asarray(k), 3, 2.0, None, jax.random.key(0))
    fast = pissa.principal_init(jnp.asarray(k), 3, 2.0, 4, jax.random.key(0))
    np.testing.assert_allclose(fast[0] @ fast[1], exact[0] @ exact[1], atol=1e-4)


def test_pissa_export_is_a_rank_2r_lora_on_the_original_base(base, ids, tmp_path):
    model, params = base
    config = PiSSAConfig(r=2, alpha=4.0, rslora=True)
    residual, initial = pissa.init(params, config, jax.random.key(0))
    trained = _perturbed(initial, scale=0.02)
    ours = mj.apply_model(model, residual, ids, adapters=trained)
    lora_config, lora = pissa.to_lora(trained, initial, config)
    assert lora_config.r == 4 and lora_config.alpha == pytest.approx(4.0 * np.sqrt(2))
    np.testing.assert_allclose(mj.apply_model(model, params, ids, adapters=lora), ours, atol=3e-5)
    save_adapter(tmp_path / "lora", lora_config, lora)
    _, loaded = load_adapter(tmp_path / "lora", params)
    np.testing.assert_allclose(mj.apply_model(model, params, ids, adapters=loaded), ours, atol=3e-5)


def test_pissa_run_state_and_restart_reruns_the_svd(base, ids):
    model, params = base
    config = PiSSAConfig(r=2, alpha=4.0)
    residual, adapters = pissa.init(params, config, jax.random.key(0))
    tx = optax.adam(1e-2)
    state = training.create_train_state(residual, adapters, config, tx, jax.random.key(1))
    for _ in range(2):
        state, _ = training.train_step(state, {"input_ids": ids}, model=model, tx=tx, schedule=lambda s: 1e-2)
    before = training.logits_fn(model, state, ids)
    restarted = remora.merge_and_reset(state, tx=tx, next_type=None)
    path = ("model", "layers_1", "self_attn", "o_proj", "kernel")
    node = adapters_lib.flatten(restarted.adapters)[path]
    merged = np.asarray(adapters_lib.flatten(mj.merge(state.frozen, state.adapters))[path])
    u, s, vt = np.linalg.svd(merged, full_matrices=False)
    np.testing.assert_allclose(node.scale * np.asarray(node.a @ node.b), (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)
    np.testing.assert_allclose(training.logits_fn(model, restarted, ids), before, atol=3e-5)
    assert flops.model_flops_per_step(LLAMA_CONFIGS["tiny"], 2, 8, "pissa", 4) == flops.model_flops_per_step(
        LLAMA_CONFIGS["tiny"], 2, 8, "lora", 4)


# ---- HiRA ---------------------------------------------------------------------------------------
def test_hira_registered_and_validated():
    assert METHODS["hira"] is HiRAConfig
    assert make_config("hira", r=3).r == 3
    with pytest.raises(ValueError, match="r must be a positive int"):
        HiRAConfig(r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        HiRAConfig(dropout=1.0)
    with pytest.raises(ValueError, match="no field"):
        make_config("hira", alpha=4.0)  # HiRA has no scale


def test_hira_init_is_identity_forward_is_the_merged_kernel_and_unmerge_exact(base, ids):
    model, params = base
    frozen_logits = model.apply({"params": params}, ids)
    adapters = mj.init_adapters(params, HiRAConfig(r=4), jax.random.key(0))
    np.testing.assert_allclose(mj.apply_model(model, params, ids, adapters=adapters), frozen_logits, atol=1e-6)
    adapters = _perturbed(adapters, scale=0.1)
    ours = mj.apply_model(model, params, ids, adapters=adapters)
    merged = mj.merge(params, adapters)
    np.testing.assert_allclose(model.apply({"params": merged}, ids), ours, atol=2e-5)
    assert float(jnp.abs(ours - frozen_logits).max()) > 1e-2
    assert _max_diff(mj.unmerge(merged, adapters), params) < 1e-6
    # the update K ⊙ A·B is high-rank though A·B has rank 4
    path = ("model", "layers_0", "mlp", "up_proj", "kernel")
    node, kernel = adapters_lib.flatten(adapters)[path], adapters_lib.flatten(params)[path]
    update = np.asarray(mj.merge({"k": kernel}, {"k": node})["k"] - kernel)
    np.testing.assert_allclose(update, np.asarray(kernel) * np.asarray(node.a @ node.b), atol=1e-6)
    assert np.linalg.matrix_rank(update, tol=1e-5) > 4 * 4


def test_hira_gradients_and_dropout_match_the_definition():
    rng = np.random.default_rng(0)
    kernel, x = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((24, 20), (5, 24)))
    node = _perturbed(hira.init_adapter((), 24, 20, HiRAConfig(r=3), jax.random.key(0)), scale=0.1)
    bias = jnp.asarray(rng.standard_normal(20), jnp.float32)

    def ours(a, b, dropout_fn=None):
        y = node.replace(a=a, b=b).dense_output(x, kernel, base_fn=lambda: x @ kernel + bias, bias_D=bias,
                                                dropout_fn=dropout_fn, dtype=jnp.float32)
        return jnp.sum(jnp.sin(y))

    def definition(a, b, drop=lambda v: v):
        return jnp.sum(jnp.sin(x @ kernel + bias + drop(x) @ (kernel * (a @ b))))

    for got, want in zip(jax.grad(ours, argnums=(0, 1))(node.a, node.b),
                         jax.grad(definition, argnums=(0, 1))(node.a, node.b)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours(node.a, node.b), definition(node.a, node.b), rtol=1e-6)
    mask = jnp.asarray(rng.random((5, 24)) < 0.7)
    drop = lambda v: jnp.where(mask, v / 0.7, 0.0)  # noqa: E731
    np.testing.assert_allclose(ours(node.a, node.b, drop), definition(node.a, node.b, drop), rtol=1e-5)


def test_hira_scanned_model_and_sharding(ids):
    config = LLAMA_CONFIGS["tiny"].replace(scan_layers=True)
    from mora_jax.models.llama import LlamaForCausalLM, init_params
    model = LlamaForCausalLM(config)
    params = init_params(config, jax.random.key(0))
    layout = mj.dense_layout(model, jnp.zeros((1, 8), jnp.int32))
    ids = ids % config.vocab_size
    adapters = _perturbed(mj.init_adapters(params, HiRAConfig(r=2), jax.random.key(0), layout=layout), scale=0.2)
    ours = mj.apply_model(model, params, ids, adapters=adapters)
    np.testing.assert_allclose(model.apply({"params": mj.merge(params, adapters)}, ids), ours, atol=3e-5)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 4), ("data", "fsdp", "tensor"))
    specs = sharding.specs_of(sharding.tree_shardings(jax.eval_shape(lambda: adapters), mesh))
    up = adapters_lib.flatten(specs)[("model", "layers", "mlp", "up_proj", "kernel")]
    assert isinstance(up, hira.HiRAAdapter) and up.b == jax.sharding.PartitionSpec(None, None, "tensor")


def test_hira_train_step_partition_and_restart(base, ids):
    model, params = base
    config = HiRAConfig(r=2)
    adapters = mj.init_adapters(params, config, jax.random.key(0))
    tx = optax.adam(1e-2)
    state = training.create_train_state(params, adapters, config, tx, jax.random.key(1))
    path = ("model", "layers_0", "mlp", "down_proj", "kernel")
    assert isinstance(adapters_lib.flatten(state.opt_state["adapters"][0].mu)[path], hira.HiRAAdapter)
    assert adapters_lib.count_params(state.opt_state["adapters"]) == 2 * adapters_lib.count_params(adapters) + 1
    for _ in range(3):
        state, _ = training.train_step(state, {"input_ids": ids}, model=model, tx=tx, schedule=lambda s: 1e-2)
    assert float(jnp.abs(adapters_lib.flatten(state.adapters)[path].b).max()) > 0
    before = training.logits_fn(model, state, ids)
    restarted = remora.merge_and_reset(state, tx=tx, next_type=None)
    fresh = adapters_lib.flatten(restarted.adapters)[path]
    assert not np.any(fresh.b) and float(jnp.abs(fresh.a - adapters_lib.flatten(state.adapters)[path].a).max()) > 0
    np.testing.assert_allclose(training.logits_fn(model, restarted, ids), before, atol=3e-5)


def test_hira_flops_floor():
    """HiRA's FLOPs are full fine-tuning's (its A, B gradients need the dense xᵀ·dy of each kernel) plus
    6·k·r·d per kernel and step; on Llama-3.2-3B's shapes about 1.4x LoRA's."""
    config = LLAMA_CONFIGS["tiny"]
    per_step = sum(6 * k * 4 * d for k, d in flops.llama_kernel_shapes(config).values())
    assert flops.model_flops_per_step(config, 2, 16, "hira", 4) == pytest.approx(
        flops.model_flops_per_step(config, 2, 16, "full") + config.num_hidden_layers * per_step)
    assert flops.adapter_flops_per_token(64, 96, "hira", 4) == (0.0, 0.0)
    llama32_3b = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                             num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=True)
    ratio = (flops.model_flops_per_step(llama32_3b, 4, 1024, "hira", 16)
             / flops.model_flops_per_step(llama32_3b, 4, 1024, "lora", 16))
    assert 1.3 < ratio < 1.45


def test_hira_peft_files_round_trip(tmp_path, base):
    _, params = base
    config = HiRAConfig(r=2, dropout=0.1)
    adapters = _perturbed(mj.init_adapters(params, config, jax.random.key(0)))
    save_adapter(tmp_path / "a", config, adapters)
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "HIRA" and raw["hira_dropout"] == 0.1 and "lora_alpha" not in raw
    names = set(read_adapter_tensors(tmp_path / "a"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.hira_A" in names
    loaded_config, loaded = load_adapter(tmp_path / "a", params)
    assert isinstance(loaded_config, HiRAConfig) and loaded_config.r == 2 and loaded_config.dropout == 0.1
    assert _max_diff(loaded, adapters) == 0.0
    info = describe_adapter(tmp_path / "a")
    assert "method: HiRA, r=2" in info and "hira_dropout: 0.1" in info and "adapted modules: 14" in info
    with pytest.raises(AdapterFormatError, match="does not match the LoRAConfig"):
        save_adapter(tmp_path / "b", mj.LoRAConfig(r=2), adapters)
    with pytest.raises(AdapterFormatError, match="does not match the HiRAConfig"):
        save_adapter(tmp_path / "b", config, mj.init_adapters(params, mj.LoRAConfig(r=2), jax.random.key(0)))
    raw["peft_type"] = "LORA"
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(AdapterFormatError, match='set "peft_type": "HIRA"'):
        load_adapter(tmp_path / "a", params)


# ---- MoRA with a DoRA-style magnitude -----------------------------------------------------------
def test_mora_magnitude_is_off_by_default_and_changes_nothing(base):
    _, params = base
    node = adapters_lib.flatten(mj.init_adapters(params, MoRAConfig(r=4), jax.random.key(0)))[
        ("model", "layers_0", "mlp", "up_proj", "kernel")]
    assert node.magnitude is None and not node.uses_kernel and not node.merge_needs_norms
    assert jax.tree_util.tree_leaves(node) == [node.m]  # the same pytree leaves (checkpoints, optimizer state)
    with pytest.raises(ValueError, match="magnitude must be True or False"):
        MoRAConfig(magnitude=1)


@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_magnitude_init_identity_merge_equals_apply_and_unmerge(base, ids, mora_type):
    model, params = base
    frozen_logits = model.apply({"params": params}, ids)
    adapters = mj.init_adapters(params, MoRAConfig(r=4, mora_type=mora_type, magnitude=True), jax.random.key(0))
    path = ("model", "layers_1", "self_attn", "o_proj", "kernel")
    node = adapters_lib.flatten(adapters)[path]
    np.testing.assert_allclose(node.magnitude, np.linalg.norm(np.asarray(adapters_lib.flatten(params)[path]), axis=0),
                               rtol=1e-6)
    np.testing.assert_allclose(mj.apply_model(model, params, ids, adapters=adapters), frozen_logits, atol=1e-5)
    adapters = _perturbed(adapters, scale=0.05)
    ours = mj.apply_model(model, params, ids, adapters=adapters)
    assert float(jnp.abs(ours - frozen_logits).max()) > 1e-2
    merged, norms = adapters_lib.merge_with_norms(params, adapters)
    assert _max_diff(merged, mj.merge(params, adapters)) == 0.0
    np.testing.assert_allclose(model.apply({"params": merged}, ids), ours, atol=3e-5)
    assert _max_diff(adapters_lib.unmerge_with_norms(merged, adapters, norms), params) < 1e-6
    with pytest.raises(ValueError, match="merge_with_norms"):
        mj.unmerge(merged, adapters)


def test_mora_magnitude_gradients_detach_the_norm(base):
    _, params = base
    path = ("model", "layers_1", "mlp", "down_proj", "kernel")
    node = adapters_lib.flatten(_perturbed(mj.init_adapters(params, MoRAConfig(r=2, mora_type=1, magnitude=True),
                                                            jax.random.key(0)), scale=0.05))[path]
    kernel = adapters_lib.flatten(params)[path]
    x = jax.random.normal(jax.random.key(3), (5, node.in_features))

    def ours(m, mag):
        y = node.replace(m=m, magnitude=mag).dense_output(x, kernel, base_fn=lambda: x @ kernel, bias_D=None,
                                                          dropout_fn=None, dtype=jnp.float32)
        return jnp.sum(jnp.sin(y))

    def definition(m, mag, frozen_norm=None):
        w = kernel + node.replace(m=m).delta_weight()
        n = jnp.linalg.norm(w, axis=0) if frozen_norm is None else frozen_norm
        return jnp.sum(jnp.sin(x @ w * (mag / n)))

    n0 = node.weight_norm(kernel)
    np.testing.assert_allclose(ours(node.m, node.magnitude), definition(node.m, node.magnitude), rtol=1e-5)
    g_ours = jax.grad(ours, argnums=(0, 1))(node.m, node.magnitude)
    g_frozen = jax.grad(lambda m, mag: definition(m, mag, n0), argnums=(0, 1))(node.m, node.magnitude)
    g_live = jax.grad(definition, argnums=(0, 1))(node.m, node.magnitude)
    for got, want in zip(g_ours, g_frozen):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(g_ours[1]).max()) > 1e-3  # the magnitude is trained
    assert float(jnp.abs(g_live[0] - g_frozen[0]).max()) > 1e-5  # the detachment is visible


def test_mora_magnitude_partition_restart_sharding_and_export(base, ids, tmp_path):
    model, params = base
    config = MoRAConfig(r=2, mora_type=1, magnitude=True)
    adapters = mj.init_adapters(params, config, jax.random.key(0))
    tx = optax.adam(1e-2)
    state = training.create_train_state(params, _perturbed(adapters, scale=0.05), config, tx, jax.random.key(1))
    path = ("model", "layers_0", "mlp", "down_proj", "kernel")
    assert adapters_lib.count_params(state.opt_state["adapters"]) == 2 * adapters_lib.count_params(adapters) + 1
    before = training.logits_fn(model, state, ids)
    restarted = remora.merge_and_reset(state, tx=tx, next_type=2)  # ReMoRA: the next type, magnitude re-based
    fresh = adapters_lib.flatten(restarted.adapters)[path]
    assert fresh.mora_type == 2 and not np.any(fresh.m)
    np.testing.assert_allclose(fresh.magnitude, np.linalg.norm(np.asarray(adapters_lib.flatten(restarted.frozen)[path]),
                                                               axis=0), rtol=1e-6)
    np.testing.assert_allclose(training.logits_fn(model, restarted, ids), before, atol=3e-5)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(1, 1, 4), ("data", "fsdp", "tensor"))
    specs = adapters_lib.flatten(sharding.specs_of(sharding.tree_shardings(jax.eval_shape(lambda: adapters), mesh)))
    assert specs[("model", "layers_0", "mlp", "up_proj", "kernel")].magnitude == jax.sharding.PartitionSpec("tensor")
    with pytest.raises(AdapterFormatError, match="no PEFT file format"):
        save_adapter(tmp_path / "a", config, adapters)
    with pytest.raises(ConfigError, match="export.adapter=False"):
        RunConfig(adapter=config)
    assert RunConfig(adapter=config, export=ExportConfig(adapter=False, merged=True)).adapter.magnitude

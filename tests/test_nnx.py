"""MoRA / LoRA / full fine-tuning on flax.nnx models (mora_jax.nnx), checked against the linen path."""

import contextlib
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import mora_jax as mj
import mora_jax.nnx as mnx
from mora_jax import pissa
from mora_jax.hf import peft
from mora_jax.methods import DoRAConfig, HiRAConfig, PiSSAConfig
from mora_jax.models import RopeScaling
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, init_params
from mora_jax.nnx import llama as nnx_llama
from mora_jax.remora import RemoraConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CFG = LLAMA_CONFIGS["tiny"].replace(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
LINEN = LlamaForCausalLM(CFG)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _random_like(adapters, seed=3, scale=0.1):
    """The same adapter tree with random values (zero M would hide the adapter's effect)."""
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _next_token_loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


@nnx.jit
def _logits(model, ids):
    return model(ids)


CONFIGS = [mj.MoRAConfig(r=2, mora_type=t) for t in (1, 2, 3, 4, 6)] + [mj.LoRAConfig(r=3, alpha=6.0), HiRAConfig(r=3)]
IDS_OF = lambda c: f"{c.method}{getattr(c, 'mora_type', '')}"  # noqa: E731


# ---------------------------------------------------------------------------------------------
# The nnx LLaMA and adapters give the linen model's logits.
# ---------------------------------------------------------------------------------------------


def test_nnx_llama_matches_linen_and_attach_mirrors_init_adapters(params):
    model = nnx_llama.from_linen(CFG, params)
    assert all(isinstance(layer, nnx.Linear) for layer in mnx.adaptable_layers(model).values())
    np.testing.assert_allclose(_logits(model, IDS), LINEN.apply({"params": params}, IDS), rtol=0, atol=1e-5)
    # the weights round-trip
    back = nnx_llama.to_linen_params(model)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)
    # attach selects the kernels init_adapters selects, with the same shapes and metadata
    for config in (mj.MoRAConfig(r=2, mora_type=6), mj.LoRAConfig(r=3, alpha=6.0)):
        model = mnx.attach(nnx_llama.from_linen(CFG, params), config)
        ours, theirs = mnx.to_linen_adapters(model), mj.init_adapters(params, config, jax.random.key(1))
        flat_ours, flat_theirs = mj.adapters.flatten(ours), mj.adapters.flatten(theirs)
        assert set(flat_ours) == set(flat_theirs) and len(flat_ours) == 14
        for path, adapter in flat_theirs.items():
            mine = flat_ours[path]
            assert type(mine) is type(adapter)
            assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(adapter)  # static metadata too
            assert [x.shape for x in jax.tree_util.tree_leaves(mine)] == [x.shape for x in jax.tree_util.tree_leaves(adapter)]
            if config.method == "mora":
                assert not np.any(mine.m)
            else:
                assert not np.any(mine.b) and 0 < np.abs(mine.a).max() <= 1 / np.sqrt(adapter.in_features)
        # zero-initialised adapters do not change the function
        np.testing.assert_allclose(_logits(model, IDS), LINEN.apply({"params": params}, IDS), rtol=0, atol=1e-5)


FAMILIES = {  # what the linen model supports beyond LLaMA 2, on the same tiny shapes
    "qwen2_biases_tied": CFG.replace(model_type="qwen2", tie_word_embeddings=True),
    "llama_all_biases_llama3_rope": CFG.replace(attention_bias=True, mlp_bias=True,
                                                rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16)),
    "mistral_window_linear_rope": CFG.replace(model_type="mistral", sliding_window=3,
                                              rope_scaling=RopeScaling("linear", 2.0)),
}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_model_families_match_linen_with_mora(name):
    cfg = FAMILIES[name]
    params = init_params(cfg, jax.random.key(0))
    params = jax.tree_util.tree_map(lambda x: x + 0.01, params)  # non-zero biases
    adapters = _random_like(mj.init_adapters(params, mj.MoRAConfig(r=2, mora_type=6), jax.random.key(1)))
    expected = mj.apply_model(LlamaForCausalLM(cfg), params, IDS, adapters=adapters)
    model = mnx.load_linen_adapters(nnx_llama.from_linen(cfg, params), adapters)
    np.testing.assert_allclose(_logits(model, IDS), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS_OF)
def test_same_adapters_same_logits_as_linen(params, config):
    # HiRA's update is K ⊙ (a·b): a product of two small random matrices times a small kernel needs larger values
    adapters = _random_like(mj.init_adapters(params, config, jax.random.key(1)), scale=0.4 if config.method == "hira" else 0.1)
    expected = mj.apply_model(LINEN, params, IDS, adapters=adapters)
    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    got = _logits(model, IDS)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(expected - LINEN.apply({"params": params}, IDS))).max() > 1e-2  # adapters matter
    # M is a MoRAParam (an nnx.LoRAParam); the kernels stay nnx.Param and are the frozen base
    trainable = nnx.state(model, nnx.LoRAParam)
    kinds = {type(v) for v in jax.tree_util.tree_leaves(trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert kinds == ({mnx.MoRAParam} if config.method == "mora" else {nnx.LoRAParam})
    frozen = nnx.state(model, mnx.FROZEN)
    assert mj.count_params(frozen) == mj.count_params(params)


# ---------------------------------------------------------------------------------------------
# Training M with nnx.Optimizer(wrt=nnx.LoRAParam) follows the linen step.
# ---------------------------------------------------------------------------------------------


def _linen_losses(params, adapters, tx, steps):
    opt_state = tx.init(adapters)

    @jax.jit
    def step(adapters, opt_state):
        loss, grads = jax.value_and_grad(
            lambda a: _next_token_loss(mj.apply_model(LINEN, params, IDS, adapters=a), IDS))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        adapters, opt_state, loss = step(adapters, opt_state)
        losses.append(float(loss))
    return losses, adapters


@nnx.jit
def _nnx_step(model, optimizer, ids):
    loss, grads = nnx.value_and_grad(lambda m: _next_token_loss(m(ids), ids),
                                     argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss, grads


@pytest.mark.parametrize("config", [mj.MoRAConfig(r=2, mora_type=6), mj.MoRAConfig(r=2, mora_type=1),
                                    mj.LoRAConfig(r=3, alpha=6.0), HiRAConfig(r=2)], ids=IDS_OF)
def test_training_matches_linen(params, config):
    tx = optax.adamw(1e-2)
    adapters = mj.init_adapters(params, config, jax.random.key(1))  # M = 0 (LoRA: random a, b = 0)
    expected, trained = _linen_losses(params, adapters, tx, steps=3)

    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    kernel_before = model.model.layers[0].self_attn.q_proj.kernel[...]
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    # optimizer state: its step, adam's count and two moments per adapter entry, nothing for frozen weights
    assert mj.count_params(nnx.state(optimizer, nnx.optimizer.OptState)) == 2 + 2 * mj.count_params(adapters)
    losses = []
    for _ in range(3):
        loss, grads = _nnx_step(model, optimizer, IDS)
        losses.append(float(loss))
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert expected[-1] < expected[0]
    # gradients exist for the adapters alone; the frozen kernels did not move
    grad_types = {type(v) for v in jax.tree_util.tree_leaves(grads, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert grad_types <= {mnx.MoRAParam, nnx.LoRAParam}
    assert mj.count_params(grads) == mj.count_params(adapters)
    np.testing.assert_array_equal(model.model.layers[0].self_attn.q_proj.kernel[...], kernel_before)
    # the same adapters (Adam divides by tiny second moments early on: float32 noise shows at ~1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(mnx.to_linen_adapters(model)), jax.tree_util.tree_leaves(trained)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_full_finetuning_and_unfreeze_train_only_what_they_name(params):
    model = mnx.attach(nnx_llama.from_linen(CFG, params), mj.FullConfig(targets=(r".*/q_proj/kernel",),
                                                                           unfreeze=(r"model/norm/weight",)))
    assert isinstance(model.model.layers[1].self_attn.q_proj.kernel, mnx.TrainedParam)
    assert isinstance(model.model.norm.weight, mnx.TrainedParam)
    assert type(model.model.layers[1].self_attn.k_proj.kernel) is nnx.Param
    assert not mnx.adapted_layers(model)
    before = nnx.state(model, mnx.FROZEN)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    loss0, grads = _nnx_step(model, optimizer, IDS)
    loss1, _ = _nnx_step(model, optimizer, IDS)
    assert float(loss1) < float(loss0)
    assert mj.count_params(grads) == 2 * 32 * 32 + 32
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model, mnx.FROZEN)), jax.tree_util.tree_leaves(before)):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(model.model.layers[1].self_attn.q_proj.kernel[...],
                           params["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"])
    assert "full: trainable 2,080 / total" in mnx.summary(model)
    # MoRA with unfreeze: M and the final norm train
    model = mnx.attach(nnx_llama.from_linen(CFG, params), mj.MoRAConfig(r=2, mora_type=6, unfreeze=(r".*norm/weight",)))
    trained = jax.tree_util.tree_leaves(nnx.state(model, nnx.LoRAParam), is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert sum(isinstance(v, mnx.TrainedParam) for v in trained) == 5 and sum(isinstance(v, mnx.MoRAParam) for v in trained) == 14


# ---------------------------------------------------------------------------------------------
# nnx's functional form, jit, and the static metadata.
# ---------------------------------------------------------------------------------------------


def test_split_merge_and_functional_grad(params):
    config = mj.MoRAConfig(r=2, mora_type=1)
    adapters = _random_like(mj.init_adapters(params, config, jax.random.key(1)))
    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    graphdef, trainable, frozen = nnx.split(model, nnx.LoRAParam, ...)
    assert mj.count_params(trainable) == mj.count_params(adapters)
    rebuilt = nnx.merge(graphdef, trainable, frozen)
    assert type(rebuilt.model.layers[0].mlp.up_proj) is mnx.AdaptedLinear
    np.testing.assert_array_equal(_logits(rebuilt, IDS), _logits(model, IDS))

    @jax.jit
    def loss_fn(trainable, frozen):
        return _next_token_loss(nnx.merge(graphdef, trainable, frozen)(IDS), IDS)

    grads = jax.grad(loss_fn)(trainable, frozen)
    nnx_grads = nnx.jit(nnx.grad(lambda m: _next_token_loss(m(IDS), IDS), argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(nnx_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # the type is static: another type is another graph definition, and the function changes
    other = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params),
                                    jax.tree_util.tree_map(lambda x: x, adapters, is_leaf=mj.is_adapter))
    layer = other.model.layers[0].mlp.up_proj
    layer.mora_spec = layer.mora_spec.replace(mora_type=2)
    assert nnx.graphdef(other) != graphdef
    assert not np.allclose(_logits(other, IDS), _logits(model, IDS))


def test_adapted_linear_general_and_einsum_fold_consistently():
    """LinearGeneral with several input/output axes and a non-trailing input axis, an Einsum whose kernel puts
    its output axis between its input axes: the adapter's forward equals running the merged kernel."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.heads = nnx.LinearGeneral((6, 5), (3, 4), axis=(1, -1), rngs=rngs)  # x (B, 6, T, 5)
            self.mix = nnx.Einsum("btnh,ndh->bdt", (3, 7, 4), (7, 1), rngs=rngs)

        def __call__(self, x):
            h = self.heads(x)  # (B, T, 3, 4)
            return self.mix(jnp.tanh(h))

    x = jax.random.normal(jax.random.key(0), (2, 6, 3, 5))
    call = nnx.jit(lambda net, x: net(x))
    for config in (mj.MoRAConfig(r=2, mora_type=6, targets=(".*kernel",)), mj.MoRAConfig(r=3, mora_type=3, targets=(".*kernel",)),
                   mj.LoRAConfig(r=2, alpha=4.0, targets=(".*kernel",))):
        net = mnx.attach(Net(nnx.Rngs(0)), config)
        base = Net(nnx.Rngs(0))(x)
        for var in jax.tree_util.tree_leaves(nnx.state(net, nnx.LoRAParam), is_leaf=lambda v: isinstance(v, nnx.Variable)):
            var[...] = 0.3 * jax.random.normal(jax.random.key(var.size), var.shape)
        spec = net.heads.mora_spec
        assert (spec.in_shape, spec.out_shape, spec.in_features, spec.out_features) == ((6, 5), (3, 4), 30, 12)
        assert net.mix.mora_spec.perm == (0, 2, 1) and net.mix.mora_spec.in_shape == (3, 4)
        adapted = call(net, x)
        assert adapted.shape == base.shape == (2, 7, 3)
        assert np.abs(np.asarray(adapted - base)).max() > 1e-2
        mnx.merge_adapters(net)
        assert net.heads.mora_spec.merged
        np.testing.assert_allclose(call(net, x), adapted, rtol=1e-5, atol=1e-5)
        mnx.unmerge(net)
        np.testing.assert_allclose(call(net, x), adapted, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(net.mix.kernel[...], Net(nnx.Rngs(0)).mix.kernel[...], atol=1e-6)
        np.testing.assert_allclose(net.heads.kernel[...], Net(nnx.Rngs(0)).heads.kernel[...], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Merge / unmerge, ReMoRA.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [mj.MoRAConfig(r=2, mora_type=6), mj.MoRAConfig(r=2, mora_type=1),
                                    mj.LoRAConfig(r=3, alpha=6.0), HiRAConfig(r=3)], ids=IDS_OF)
def test_merge_unmerge_round_trip(params, config):
    adapters = _random_like(mj.init_adapters(params, config, jax.random.key(1)))
    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    adapted = _logits(model, IDS)
    mnx.merge_adapters(model)
    assert mnx.is_merged(model)
    # the merged kernels are the linen merge's, and the merged model computes the adapted function
    merged_params = mj.merge(params, adapters)
    for a, b in zip(jax.tree_util.tree_leaves(nnx_llama.to_linen_params(model, mnx.FROZEN)),
                    jax.tree_util.tree_leaves(merged_params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_logits(model, IDS), adapted, rtol=0, atol=1e-5)
    mnx.merge_adapters(model)  # idempotent
    mnx.unmerge(model)
    assert not mnx.is_merged(model)
    for a, b in zip(jax.tree_util.tree_leaves(nnx_llama.to_linen_params(model, mnx.FROZEN)),
                    jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_logits(model, IDS), adapted, rtol=0, atol=1e-5)
    # merge_and_unload: a plain nnx model with the adapted function
    plain = mnx.merge_and_unload(model)
    assert type(plain.model.layers[0].self_attn.q_proj) is nnx.Linear
    assert not nnx.state(plain, nnx.LoRAParam) and not mnx.adapted_layers(plain)
    np.testing.assert_allclose(_logits(plain, IDS), adapted, rtol=0, atol=1e-5)


def _lr_clock(count):
    """A restarting learning rate keyed on the optimizer's step count (as mora_jax.schedules' are)."""
    return jnp.where(count % 2 == 0, 1e-3, 1e-2)


def test_remora_step_merges_zeroes_m_advances_type_and_resets_its_optimizer_state(params):
    config = mj.MoRAConfig(r=2, mora_type=1, unfreeze=(r"model/norm/weight",))
    model = mnx.attach(nnx_llama.from_linen(CFG, params), config)
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=_lr_clock)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    remora = RemoraConfig(every=2, type_cycle=(1, 2, 3, 4))
    for step in (1, 2):
        _nnx_step(model, optimizer, IDS)
        assert mnx.remora_step(model, optimizer, remora, step) == (step == 2)
    assert all(layer.mora_spec.mora_type == remora.type_at(2) == 2 for layer in mnx.adapted_layers(model).values())
    assert not any(np.any(m) for m in jax.tree_util.tree_leaves(nnx.state(model, mnx.MoRAParam)))

    state = nnx.as_pure(optimizer.opt_state)
    inner = state.inner_state[0]  # adam's ScaleByAdamState
    mu = inner.mu
    for path, layer in mnx.adapted_layers(model).items():
        node_mu = mu
        for key in (*path, "kernel_mora_m"):
            node_mu = node_mu[key]
        assert not np.any(node_mu)
    assert np.any(mu["model"]["norm"]["weight"])  # the fully trained norm keeps its moments
    assert int(inner.count) == 2  # shared with the norm: not reset
    assert int(state.count) == 2 and int(optimizer.step[...]) == 2  # the learning-rate clock runs on


def test_remora_merge_equals_linen_merge_and_keeps_the_function(params):
    model = mnx.attach(nnx_llama.from_linen(CFG, params), mj.MoRAConfig(r=2, mora_type=1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    for _ in range(2):
        _nnx_step(model, optimizer, IDS)
    adapters = mnx.to_linen_adapters(model)
    before = _logits(model, IDS)
    assert mnx.remora_step(model, optimizer, RemoraConfig(every=2, type_cycle=(1, 2)), 2)
    for a, b in zip(jax.tree_util.tree_leaves(nnx_llama.to_linen_params(model, mnx.FROZEN)),
                    jax.tree_util.tree_leaves(mj.merge(params, adapters))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_logits(model, IDS), before, rtol=0, atol=1e-5)
    adam = nnx.as_pure(optimizer.opt_state)[0]
    assert int(adam.count) == 0  # every trainable is an adapter: adam's bias correction restarts
    assert not any(np.any(x) for x in jax.tree_util.tree_leaves((adam.mu, adam.nu)))
    # training goes on with type 2 from the merged model, and the loss keeps falling
    losses = [float(_nnx_step(model, optimizer, IDS)[0]) for _ in range(3)]
    np.testing.assert_allclose(losses[0], _next_token_loss(before, IDS), rtol=1e-5)
    assert losses[2] < losses[0]
    # LoRA (ReLoRA): a re-initialised, b zero
    model = mnx.attach(nnx_llama.from_linen(CFG, params), mj.LoRAConfig(r=2, alpha=4.0))
    a_before = model.model.layers[0].mlp.up_proj.kernel_lora_a[...]
    model.model.layers[0].mlp.up_proj.kernel_lora_b[...] += 0.1
    mnx.merge_and_reset(model, rng=7)
    assert not np.any(model.model.layers[0].mlp.up_proj.kernel_lora_b[...])
    assert not np.allclose(model.model.layers[0].mlp.up_proj.kernel_lora_a[...], a_before)
    # HiRA: the merge is the linen one (K ⊙ (1 + a·b)), then a re-initialised, b zero, the function kept
    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), _random_like(
        mj.init_adapters(params, HiRAConfig(r=2), jax.random.key(1)), scale=0.4))
    adapters, before = mnx.to_linen_adapters(model), _logits(model, IDS)
    mnx.merge_and_reset(model, rng=7)
    for a, b in zip(jax.tree_util.tree_leaves(nnx_llama.to_linen_params(model, mnx.FROZEN)),
                    jax.tree_util.tree_leaves(mj.merge(params, adapters))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    assert not np.any(model.model.layers[0].mlp.up_proj.kernel_hira_b[...])
    np.testing.assert_allclose(_logits(model, IDS), before, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Linen <-> nnx conversion and PEFT files.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [mj.MoRAConfig(r=2, mora_type=6), mj.LoRAConfig(r=3, alpha=6.0, rslora=True),
                                    HiRAConfig(r=2), DoRAConfig(r=2, alpha=4.0)], ids=IDS_OF)
def test_converter_round_trip(params, config):
    adapters = _random_like(mj.init_adapters(params, config, jax.random.key(1)))
    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    back = mnx.to_linen_adapters(model)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(adapters)
    for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(adapters)):
        np.testing.assert_array_equal(a, b)
    # nnx -> linen -> another nnx model: identical adapter state
    other = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), back)
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(other, nnx.LoRAParam)),
                    jax.tree_util.tree_leaves(nnx.state(model, nnx.LoRAParam))):
        np.testing.assert_array_equal(a, b)
    # loading into a model that already carries adapters replaces their values (and metadata)
    attached = mnx.attach(nnx_llama.from_linen(CFG, params), config)
    mnx.load_linen_adapters(attached, adapters)
    np.testing.assert_array_equal(_logits(attached, IDS), _logits(model, IDS))
    with pytest.raises(ValueError, match="maps to no adaptable layer"):
        mnx.load_linen_adapters(model, {"model": {"nope": {"kernel": mj.adapters.flatten(adapters)[
            ("model", "layers_0", "mlp", "up_proj", "kernel")]}}})


@pytest.mark.parametrize("config", [mj.MoRAConfig(r=2, mora_type=6), mj.LoRAConfig(r=3, alpha=6.0), HiRAConfig(r=2)],
                         ids=IDS_OF)
def test_peft_export_from_nnx_loads_on_the_linen_side(params, config, tmp_path):
    adapters = _random_like(mj.init_adapters(params, config, jax.random.key(1)))
    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    files = mnx.save_adapter(tmp_path / "adapter", model)
    assert {f.name for f in files} == {"adapter_config.json", "adapter_model.safetensors"}
    loaded_config, loaded = peft.load_adapter(tmp_path / "adapter", params)
    assert (loaded_config.method, loaded_config.r) == (config.method, config.r)
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(adapters)
    for a, b in zip(jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(adapters)):
        np.testing.assert_array_equal(a, b)
    # and back into a fresh nnx model
    fresh = nnx_llama.from_linen(CFG, params)
    nnx_config = mnx.load_adapter(tmp_path / "adapter", fresh)
    assert re.fullmatch(nnx_config.targets[0], "model/layers/0/mlp/down_proj/kernel")
    np.testing.assert_array_equal(_logits(fresh, IDS), _logits(model, IDS))


# ---------------------------------------------------------------------------------------------
# Sharding: M replicated, LoRA a/b follow the kernel, under nnx.jit.
# ---------------------------------------------------------------------------------------------


class _ShardedMLP(nnx.Module):
    def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(16, 32, use_bias=False, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("fsdp", "tensor")))
        self.down = nnx.Linear(32, 16, use_bias=False, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("tensor", "fsdp")))
        self.head = nnx.Linear(16, 8, rngs=rngs, kernel_init=nnx.with_partitioning(init, ("fsdp", None)))

    def __call__(self, x):
        return self.head(x + self.down(jax.nn.gelu(self.up(x))))


def _sharded_run(mesh, steps=2):
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        net = _ShardedMLP(nnx.Rngs(0)) if mesh is not None else _unsharded_net()
        mnx.attach(net, mj.MoRAConfig(r=2, mora_type=6, targets=(r"up/kernel", r"head/kernel")))
        mnx.attach(net, mj.LoRAConfig(r=2, alpha=4.0, targets=(r"down/kernel",)), rng=1)
        optimizer = nnx.Optimizer(net, optax.adam(1e-2), wrt=nnx.LoRAParam)
        x = jax.random.normal(jax.random.key(1), (8, 16))

        @nnx.jit
        def step(net, optimizer, x):
            loss, grads = nnx.value_and_grad(lambda n: jnp.mean((n(x) - 1.0) ** 2),
                                             argnums=nnx.DiffState(0, nnx.LoRAParam))(net)
            optimizer.update(net, grads)
            return loss

        losses = [float(step(net, optimizer, x)) for _ in range(steps)]
    return net, losses


def _unsharded_net():
    with nnx.use_eager_sharding(False):
        return _ShardedMLP(nnx.Rngs(0))


def test_sharded_adapters_follow_their_kernel_under_jit():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake CPU) devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto, AxisType.Auto))
    net, losses = _sharded_run(mesh)
    def placed(x, *spec):
        return x.sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), x.ndim)

    assert placed(net.up.kernel[...], "fsdp", "tensor")
    for m in (net.up.kernel_mora_m, net.head.kernel_mora_m):
        assert m[...].sharding.is_fully_replicated and placed(m[...], None, None)
        assert m.get_metadata("out_sharding") == (None, None)
    a, b = net.down.kernel_lora_a, net.down.kernel_lora_b
    assert placed(a[...], "tensor", None) and placed(b[...], None, "fsdp")
    assert not placed(a[...], None, None)
    assert a.get_metadata("out_sharding") == ("tensor", None) and b.get_metadata("out_sharding") == (None, "fsdp")
    assert nnx.get_partition_spec(nnx.state(net, nnx.LoRAParam))["down"]["kernel_lora_a"].get_value() == P("tensor", None)
    # the same training, unsharded
    _, expected = _sharded_run(None)
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    # merging keeps the kernel's sharding
    mnx.merge_adapters(net)
    assert placed(net.down.kernel[...], "tensor", "fsdp")


# ---------------------------------------------------------------------------------------------
# Tunix-style models: einsum modules with a `w` parameter, the PeftTrainer's filters.
# ---------------------------------------------------------------------------------------------


class TunixEinsum(nnx.Module):
    """The einsum module of Tunix's LLaMA 3 / Qwen / Gemma ports (not nnx.Einsum)."""

    def __init__(self, einsum_str, shape, *, rngs):
        self.einsum_str, self.shape = einsum_str, shape
        self.w = nnx.Param(nnx.initializers.normal()(rngs.params(), shape))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


class TunixStyleBlock(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = TunixEinsum("BTD,DNH->BTNH", (16, 2, 8), rngs=rngs)
        self.o_proj = TunixEinsum("BTNH,NHD->BTD", (2, 8, 16), rngs=rngs)
        self.gate_proj = nnx.Linear(16, 24, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(24, 16, use_bias=False, rngs=rngs)

    def __call__(self, x):
        x = x + self.o_proj(jnp.tanh(self.q_proj(x)))
        return x + self.down_proj(jax.nn.silu(self.gate_proj(x)))


class TunixStyleLM(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(32, 16, rngs=rngs)
        self.layers = nnx.List([TunixStyleBlock(rngs) for _ in range(2)])
        self.lm_head = nnx.Linear(16, 32, rngs=rngs)

    def __call__(self, tokens):
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def test_tunix_style_model_and_peft_trainer_loop():
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 32, (4, 10)), jnp.int32)
    model = TunixStyleLM(nnx.Rngs(0))
    with pytest.raises(ValueError, match="register_einsum_layer"):
        mnx.attach(model, mj.MoRAConfig(r=2, mora_type=6, targets=(r".*/(q|o|gate|down)_proj/(w|kernel)",)))
    mnx.register_einsum_layer(TunixEinsum, kernel="w")
    base = model(tokens)
    mnx.attach(model, mj.MoRAConfig(r=2, mora_type=6, targets=(r".*/(q|o|gate|down)_proj/(w|kernel)",)))
    assert type(model.layers[0].q_proj).__name__ == "AdaptedTunixEinsum"
    assert model.layers[0].q_proj.mora_spec.in_shape == (16,) and model.layers[0].o_proj.mora_spec.in_shape == (2, 8)
    np.testing.assert_array_equal(model(tokens), base)
    # PeftTrainer's train step, verbatim in substance: LoRA mode because the model has LoRAParams
    assert any(isinstance(v, nnx.LoRAParam) for _, v in nnx.iter_graph(model))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def train_step(model, optimizer, tokens):
        def loss_fn(model):
            return _next_token_loss(model(tokens), tokens)
        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    w_before = model.layers[0].q_proj.w[...]
    losses = [float(train_step(model, optimizer, tokens)) for _ in range(4)]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(model.layers[0].q_proj.w[...], w_before)
    assert np.any(model.layers[0].q_proj.w_mora_m[...])
    # the trained adapters export through the linen tree (keys end in 'kernel', as PEFT names modules)
    flat = mj.adapters.flatten(mnx.to_linen_adapters(model))
    assert ("layers_1", "o_proj", "kernel") in flat and flat[("layers_1", "o_proj", "kernel")].in_features == 16
    adapted = model(tokens)
    mnx.merge_adapters(model)
    np.testing.assert_allclose(model(tokens), adapted, rtol=1e-5, atol=1e-5)


def test_tunix_peft_trainer_trains_mora_on_its_llama3():
    """Runs when google-tunix is installed (the `nnx` extra): its PeftTrainer trains MoRA unchanged."""
    pytest.importorskip("tunix")
    from tunix.models.llama3 import model as llama3
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    no_sharding = llama3.ShardingConfig(
        emb_vd=(None, None), emb_dv=(None, None), q_weight_dnh=(None,) * 3, kv_weight_dnh=(None,) * 3,
        o_weight_nhd=(None,) * 3, ffw_weight_df=(None, None), ffw_weight_fd=(None, None), rms_norm_weight=(None,),
        act_btd=(None,) * 3, act_btf=(None,) * 3, act_btnh=(None,) * 4)
    config = llama3.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=48, num_heads=4, head_dim=8,
                                num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5, shd_config=no_sharding)
    mnx.register_einsum_layer(llama3.Einsum, kernel="w")

    def make():
        with nnx.use_eager_sharding(False):
            model = llama3.Llama3(config, rngs=nnx.Rngs(0))
        # Tunix initialises the MLP kernels to zero (checkpoints overwrite them): stand-in pretrained weights
        params = nnx.state(model, nnx.Param)
        keys = iter(jax.random.split(jax.random.key(5), len(jax.tree_util.tree_leaves(params))))
        nnx.update(model, jax.tree_util.tree_map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape), params))
        # the one line a Tunix user changes (instead of qwix.apply_lora_to_model):
        return mnx.attach(model, mj.MoRAConfig(r=2, mora_type=6, targets=(r".*/(q|k|v|o|gate|up|down)_proj/(w|kernel)",)))

    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 12)), jnp.int32)
    inputs = peft_trainer.TrainingInput(input_tokens=tokens, input_mask=jnp.ones_like(tokens))

    def gen_model_input(x):
        mask = x.input_tokens != 0
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(mask),
                "attention_mask": sft_utils.make_causal_attn_mask(mask)}

    tx = optax.adamw(1e-2)
    model = make()
    w_before = model.layers[0].attn.q_proj.w[...]
    trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=3))
    trainer = trainer.with_gen_model_input_fn(gen_model_input)
    trainer.train([inputs] * 3)
    assert trainer._lora_enabled
    assert np.any(model.layers[0].attn.q_proj.w_mora_m[...]) and np.any(model.layers[1].mlp.down_proj.kernel_mora_m[...])
    np.testing.assert_array_equal(model.layers[0].attn.q_proj.w[...], w_before)

    # the same three steps by hand with nnx.Optimizer(wrt=nnx.LoRAParam) reach the same M
    reference = make()
    optimizer = nnx.Optimizer(reference, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer, batch):
        grads = nnx.grad(lambda m: peft_trainer._default_loss_fn(m, **batch), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)

    for _ in range(3):
        step(reference, optimizer, gen_model_input(inputs))
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model, nnx.LoRAParam)),
                    jax.tree_util.tree_leaves(nnx.state(reference, nnx.LoRAParam))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors, dropout, packaging.
# ---------------------------------------------------------------------------------------------


def test_selection_errors_name_the_fix(params):
    model = nnx_llama.from_linen(CFG, params)
    with pytest.raises(ValueError, match="(?s)matches no adaptable kernel.*model/layers/0/mlp/down_proj/kernel"):
        mnx.attach(model, mj.MoRAConfig(r=2, targets=(r".*/qq_proj/kernel",)))
    with pytest.raises(ValueError, match="not the kernel of a layer adapters can attach to"):
        mnx.attach(model, mj.MoRAConfig(r=2, targets=(r".*(q_proj/kernel|embedding)",)))
    with pytest.raises(ValueError, match="unfreeze pattern"):
        mnx.attach(model, mj.MoRAConfig(r=2, unfreeze=(r"nothing/.*",)))
    assert not mnx.adapted_layers(model) and not nnx.state(model, nnx.LoRAParam)  # a failed attach changes nothing
    mnx.attach(model, mj.MoRAConfig(r=2, targets=(r".*/q_proj/kernel",)))
    with pytest.raises(ValueError, match="already carries an adapter"):
        mnx.attach(model, mj.LoRAConfig(r=2, targets=(r".*/q_proj/kernel",)))
    with pytest.raises(ValueError, match="needs random streams"):
        mnx.attach(model, mj.LoRAConfig(r=2, targets=(r".*/k_proj/kernel",), dropout=0.1))


def test_adapter_dropout_is_on_in_training_and_off_in_eval():
    model = mnx.attach(_unsharded_net(), mj.LoRAConfig(r=2, alpha=4.0, targets=(r"up/kernel",), dropout=0.5),
                       rngs=nnx.Rngs(dropout=1))
    model.up.kernel_lora_b[...] = jnp.ones_like(model.up.kernel_lora_b[...])
    x = jax.random.normal(jax.random.key(0), (4, 16))
    assert not np.allclose(model(x), model(x))  # a new mask each call
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))
    nodrop = mnx.attach(_unsharded_net(), mj.LoRAConfig(r=2, alpha=4.0, targets=(r"up/kernel",)))
    nnx.update(nodrop, nnx.state(model, nnx.LoRAParam))
    np.testing.assert_allclose(model(x), nodrop(x), rtol=1e-6)


def test_core_package_does_not_import_nnx():
    code = "import sys, mora_jax, mora_jax.hf, mora_jax.hf.peft, mora_jax.remora; assert 'mora_jax.nnx' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"JAX_PLATFORMS": "cpu", "PATH": ""})


def test_merge_is_a_deprecated_alias_of_merge_adapters_that_warns_once(params, monkeypatch):
    """``mnx.merge(model)`` read like ``nnx.merge(graphdef, state)``; ``merge_adapters`` is its name now."""
    import importlib
    import warnings

    merge_lib = importlib.import_module("mora_jax.nnx.merge")  # the module (the package's `merge` is the function)
    monkeypatch.setattr(merge_lib, "_merge_warned", False)
    adapters = _random_like(mj.init_adapters(params, mj.MoRAConfig(r=2, mora_type=6), jax.random.key(1)))
    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    other = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    with pytest.warns(DeprecationWarning, match="merge_adapters"):
        assert mnx.merge(model) is model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call does not warn again
        mnx.merge(model)
    assert mnx.is_merged(model)
    mnx.merge_adapters(other)
    for a, b in zip(jax.tree_util.tree_leaves(nnx.state(model)), jax.tree_util.tree_leaves(nnx.state(other))):
        np.testing.assert_array_equal(a, b)


class _NetWithABatchEinsum(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 24, use_bias=False, rngs=rngs)
        self.heads = nnx.Einsum("bnd,ndf->bnf", (3, 24, 16), rngs=rngs)  # n is a batch axis: no adapter fits it

    def __call__(self, x_BxD):
        h_BxF = jnp.tanh(self.up(x_BxD))
        return self.heads(jnp.broadcast_to(h_BxF[:, None], (x_BxD.shape[0], 3, 24)))


def test_load_adapter_inspects_only_the_layers_the_file_adapts(tmp_path):
    x = jax.random.normal(jax.random.key(0), (2, 16))
    model = mnx.attach(_NetWithABatchEinsum(nnx.Rngs(0)), mj.MoRAConfig(r=2, mora_type=6, targets=(r"up/kernel",)))
    model.up.kernel_mora_m[...] = 0.3 * jax.random.normal(jax.random.key(1), model.up.kernel_mora_m.shape)
    mnx.save_adapter(tmp_path / "adapter", model)
    fresh = _NetWithABatchEinsum(nnx.Rngs(0))
    config = mnx.load_adapter(tmp_path / "adapter", fresh)
    assert config.targets == (r"up/kernel",) and list(mnx.adapted_layers(fresh)) == [("up",)]
    np.testing.assert_allclose(fresh(x), model(x), rtol=1e-6, atol=1e-6)
    # targeting the batch einsum itself still says why it cannot carry an adapter
    with pytest.raises(NotImplementedError, match="batch axes"):
        mnx.attach(_NetWithABatchEinsum(nnx.Rngs(0)), mj.MoRAConfig(r=2, targets=(r"heads/kernel",)))


# ---------------------------------------------------------------------------------------------
# Layers stacked with nnx.vmap and run with nnx.scan (how MaxText and Tunix scan their models).
# ---------------------------------------------------------------------------------------------

N_STACKED = 3


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 24, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(24, 16, use_bias=False, rngs=rngs)
        self.heads = nnx.Einsum("btd,dnh->btnh", (16, 2, 8), rngs=rngs)  # output axes after the input's

    def __call__(self, x_BxTxD):
        h_BxTxD = x_BxTxD + self.down(jax.nn.silu(self.up(x_BxTxD)))
        return h_BxTxD + jnp.tanh(self.heads(h_BxTxD)).reshape(h_BxTxD.shape)


class _ScannedModel(nnx.Module):
    """The blocks' parameters stacked on a leading axis by nnx.vmap; nnx.scan runs them in turn."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=N_STACKED)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _Block(rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x)

        return body(x, self.layers)


class _UnrolledModel(nnx.Module):
    def __init__(self, scanned: _ScannedModel):
        self.layers = nnx.List([_Block(nnx.Rngs(0)) for _ in range(N_STACKED)])
        for i, block in enumerate(self.layers):
            for name in ("up", "down", "heads"):
                getattr(block, name).kernel[...] = getattr(scanned.layers, name).kernel[...][i]

    def __call__(self, x):
        for block in self.layers:
            x = block(x)
        return x


STACKED_CONFIGS = [mj.MoRAConfig(r=2, mora_type=6, targets=(r".*/(up|down|heads)/kernel",)),
                   mj.MoRAConfig(r=3, mora_type=1, targets=(r".*/(up|down|heads)/kernel",)),
                   mj.LoRAConfig(r=2, alpha=4.0, targets=(r".*/(up|down|heads)/kernel",))]


@pytest.mark.parametrize("config", STACKED_CONFIGS, ids=IDS_OF)
def test_layers_stacked_with_vmap_and_run_with_scan_match_the_unrolled_model(config, tmp_path):
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    scanned = _ScannedModel(nnx.Rngs(0))
    unrolled = _UnrolledModel(scanned)
    base = scanned(x)
    np.testing.assert_allclose(unrolled(x), base, rtol=1e-5, atol=1e-5)
    mnx.attach(scanned, config)
    mnx.attach(unrolled, config)
    up = scanned.layers.up
    assert up.mora_spec.stack_shape == (N_STACKED,) and up.mora_spec.in_shape == (16,)
    assert scanned.layers.heads.mora_spec.out_shape == (2, 8) and unrolled.layers[0].heads.mora_spec.stack_shape == ()
    # the adapters are stacked like their kernels: layer i of the stack is layer i of the unrolled model
    seeds = iter(range(100))
    for name in ("up", "down", "heads"):
        for var_name in getattr(scanned.layers, name).mora_spec.names:
            stacked = getattr(getattr(scanned.layers, name), var_name)
            assert stacked.shape[0] == N_STACKED
            stacked[...] = 0.05 * jax.random.normal(jax.random.key(next(seeds)), stacked.shape)
            for i, block in enumerate(unrolled.layers):
                getattr(getattr(block, name), var_name)[...] = stacked[...][i]
    adapted = nnx.jit(lambda m, x: m(x))(scanned, x)
    assert np.abs(np.asarray(adapted - base)).max() > 1e-2
    np.testing.assert_allclose(adapted, unrolled(x), rtol=1e-5, atol=1e-5)

    # backward: the stacked adapters' gradients are the unrolled layers' gradients, the kernels get none
    def loss(model):
        return jnp.mean(model(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(scanned)
    unrolled_grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(unrolled)
    for name in ("up", "down", "heads"):
        for var_name in getattr(scanned.layers, name).mora_spec.names:
            g = grads["layers"][name][var_name][...]
            for i in range(N_STACKED):
                np.testing.assert_allclose(g[i], unrolled_grads["layers"][i][name][var_name][...], rtol=1e-4,
                                           atol=1e-5 * float(np.abs(g).max()))
    optimizer = nnx.Optimizer(scanned, optax.sgd(1e-2), wrt=nnx.LoRAParam)
    kernel_before = scanned.layers.up.kernel[...]
    optimizer.update(scanned, grads)
    np.testing.assert_array_equal(scanned.layers.up.kernel[...], kernel_before)
    trained = scanned(x)

    # merge folds each layer's adapter into its slice of the stacked kernel
    mnx.merge_adapters(scanned)
    np.testing.assert_allclose(scanned(x), trained, rtol=1e-5, atol=1e-5)
    mnx.unmerge(scanned)
    np.testing.assert_allclose(scanned.layers.up.kernel[...], kernel_before, atol=2e-5)

    # PEFT files: one tensor per layer (model.layers.i...), read back into a fresh stacked model
    flat = mj.adapters.flatten(mnx.to_linen_adapters(scanned))
    first = flat[("layers", "up", "kernel")]
    assert jax.tree_util.tree_leaves(first)[0].shape[0] == N_STACKED
    mnx.save_adapter(tmp_path / "adapter", scanned)
    names = peft.read_adapter_tensors(tmp_path / "adapter")
    assert any(".layers.2.up.lora_A" in n for n in names)
    fresh = _ScannedModel(nnx.Rngs(0))
    mnx.load_adapter(tmp_path / "adapter", fresh)
    np.testing.assert_allclose(fresh(x), trained, rtol=1e-5, atol=1e-5)


def test_a_stacked_layer_called_whole_or_stacked_on_another_axis_is_a_clear_error():
    scanned = mnx.attach(_ScannedModel(nnx.Rngs(0)), mj.MoRAConfig(r=2, targets=(r"layers/up/kernel",)))
    with pytest.raises(ValueError, match=r"stacked over \(3,\).*inside the nnx.scan"):
        scanned.layers.up(jnp.ones((2, 16)))
    with pytest.raises(ValueError, match="would need random streams split per layer"):
        mnx.attach(_ScannedModel(nnx.Rngs(0)), mj.LoRAConfig(r=2, targets=(r"layers/up/kernel",), dropout=0.1),
                   rngs=nnx.Rngs(dropout=0))

    @nnx.split_rngs(splits=N_STACKED)
    @nnx.vmap(in_axes=(0,), out_axes=1)  # stacked on axis 1: (16, 3, 24)
    def make(rngs):
        return nnx.Linear(16, 24, rngs=rngs)

    with pytest.raises(ValueError, match=r"does not end in the layer's own kernel shape \(16, 24\)"):
        mnx.attach(make(nnx.Rngs(0)), mj.MoRAConfig(r=2, targets=(r"kernel",)))


def _check_merge_is_linen_and_unmerge_exact(model, params, adapters, expected):
    """``merge_adapters`` writes the linen merge's kernels (the same logits), ``unmerge`` gives back ``params``."""
    mnx.merge_adapters(model)
    for a, b in zip(jax.tree_util.tree_leaves(nnx_llama.to_linen_params(model, mnx.FROZEN)),
                    jax.tree_util.tree_leaves(mj.merge(params, adapters))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_logits(model, IDS), expected, rtol=0, atol=1e-5)
    mnx.unmerge(model)
    for a, b in zip(jax.tree_util.tree_leaves(nnx_llama.to_linen_params(model, mnx.FROZEN)),
                    jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mora_type", [1, 6])
def test_mora_with_a_magnitude_on_nnx_matches_linen_merges_exactly_and_restarts(params, tmp_path, mora_type):
    config = mj.MoRAConfig(r=2, mora_type=mora_type, magnitude=True)
    attached = mnx.attach(nnx_llama.from_linen(CFG, params), config)
    linen_init = mj.init_adapters(params, config, jax.random.key(1))
    for a, b in zip(jax.tree_util.tree_leaves(mnx.to_linen_adapters(attached)), jax.tree_util.tree_leaves(linen_init)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # M = 0, magnitude = ‖K‖_c
    np.testing.assert_allclose(_logits(attached, IDS), LINEN.apply({"params": params}, IDS), rtol=0, atol=1e-5)
    adapters = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), linen_init)
    expected = mj.apply_model(LINEN, params, IDS, adapters=adapters)
    assert np.abs(np.asarray(expected - LINEN.apply({"params": params}, IDS))).max() > 1e-2
    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    layer = model.model.layers[1].mlp.down_proj
    assert layer.mora_spec.magnitude and layer.mora_spec.names == ("kernel_mora_m", "kernel_mora_magnitude")
    np.testing.assert_allclose(_logits(model, IDS), expected, rtol=0, atol=1e-5)
    # gradients of M and of the magnitude: the linen path's (the norm detached on both sides)
    linen_grads = jax.grad(lambda a: _next_token_loss(mj.apply_model(LINEN, params, IDS, adapters=a), IDS))(adapters)
    nnx_grads = nnx.grad(lambda m: _next_token_loss(m(IDS), IDS), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert mj.count_params(nnx_grads) == mj.count_params(adapters)
    node = mj.adapters.flatten(linen_grads)[("model", "layers_1", "mlp", "down_proj", "kernel")]
    grads = nnx_grads["model"]["layers"][1]["mlp"]["down_proj"]
    np.testing.assert_allclose(grads["kernel_mora_magnitude"][...], node.magnitude, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["kernel_mora_m"][...], node.m, rtol=1e-4, atol=1e-6)
    # merge is the linen merge, undone with the kept norms
    _check_merge_is_linen_and_unmerge_exact(model, params, adapters, expected)
    # no PEFT format holds it: refused with the linen path's message, nothing written
    with pytest.raises(ValueError, match="MoRA with a magnitude"):
        mnx.save_adapter(tmp_path / "mora_mag", model)
    assert not (tmp_path / "mora_mag").exists()
    # a plain MoRA tree does not load into a layer with a magnitude (it would drop it silently)
    with pytest.raises(ValueError, match="is mora but the layer carries mora with a magnitude"):
        mnx.load_linen_adapters(model, mj.init_adapters(params, mj.MoRAConfig(r=2, mora_type=mora_type),
                                                        jax.random.key(0)))
    # ReMoRA restart: merged, M = 0, magnitude re-based to the merged norms: the function is kept
    mnx.merge_and_reset(model)
    assert not np.any(layer.kernel_mora_m[...]) and not hasattr(layer, "mora_dora_norm")
    np.testing.assert_allclose(_logits(model, IDS), expected, rtol=0, atol=1e-5)
    plain = mnx.merge_and_unload(model)
    np.testing.assert_allclose(_logits(plain, IDS), expected, rtol=0, atol=1e-5)


def test_dora_on_nnx_matches_linen_merges_exactly_and_restarts(params, tmp_path):
    config = DoRAConfig(r=2, alpha=4.0)
    attached = mnx.attach(nnx_llama.from_linen(CFG, params), config, rng=1)
    linen_init = mj.init_adapters(params, config, jax.random.key(1))
    for a, b in zip(jax.tree_util.tree_leaves(mnx.to_linen_adapters(attached)), jax.tree_util.tree_leaves(linen_init)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # a as linen draws it, b = 0, magnitude = ‖K‖_c
    adapters = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), linen_init)
    expected = mj.apply_model(LINEN, params, IDS, adapters=adapters)
    model = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, params), adapters)
    np.testing.assert_allclose(_logits(model, IDS), expected, rtol=0, atol=1e-5)
    assert np.abs(np.asarray(expected - LINEN.apply({"params": params}, IDS))).max() > 1e-2
    # gradients: the same as the linen path's (the norm detached on both sides)
    linen_grads = jax.grad(lambda a: _next_token_loss(mj.apply_model(LINEN, params, IDS, adapters=a), IDS))(adapters)
    nnx_grads = nnx.grad(lambda m: _next_token_loss(m(IDS), IDS), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert mj.count_params(nnx_grads) == mj.count_params(adapters)
    node = mj.adapters.flatten(linen_grads)[("model", "layers_1", "mlp", "down_proj", "kernel")]
    layer = model.model.layers[1].mlp.down_proj
    grads = nnx_grads["model"]["layers"][1]["mlp"]["down_proj"]
    np.testing.assert_allclose(grads["kernel_lora_magnitude"][...], node.magnitude, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(grads["kernel_lora_b"][...], node.b, rtol=1e-4, atol=1e-6)
    assert layer.kernel_lora_magnitude[...].shape == node.magnitude.shape
    # merge is exact and undone with the kept norms; merge_and_unload leaves a plain model
    _check_merge_is_linen_and_unmerge_exact(model, params, adapters, expected)
    # PEFT files (use_dora) from nnx load on the linen side
    mnx.save_adapter(tmp_path / "dora", model)
    _, loaded = peft.load_adapter(tmp_path / "dora", params)
    np.testing.assert_allclose(mj.apply_model(LINEN, params, IDS, adapters=loaded), expected, rtol=0, atol=1e-5)
    # ReLoRA-style restart: merged, a new, b = 0, magnitude re-based: the function is kept
    mnx.merge_and_reset(model, rng=3)
    assert not np.any(layer.kernel_lora_b[...]) and not hasattr(layer, "mora_dora_norm")
    np.testing.assert_allclose(_logits(model, IDS), expected, rtol=0, atol=1e-5)
    plain = mnx.merge_and_unload(model)
    np.testing.assert_allclose(_logits(plain, IDS), expected, rtol=0, atol=1e-5)


def test_pissa_on_nnx_is_the_linen_start_keeps_the_model_and_restarts_by_svd(params):
    config = PiSSAConfig(r=2, alpha=4.0)
    model = mnx.attach(nnx_llama.from_linen(CFG, params), config, rng=1)
    residual, initial = pissa.init(params, config, jax.random.key(1))
    for a, b in zip(jax.tree_util.tree_leaves(nnx_llama.to_linen_params(model, mnx.FROZEN)),
                    jax.tree_util.tree_leaves(residual)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)  # the kernels became the SVD residual
    ours = mnx.to_linen_adapters(model)
    assert isinstance(mj.adapters.flatten(ours)[("model", "layers_0", "mlp", "up_proj", "kernel")], pissa.PiSSAAdapter)
    for a, b in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(initial)):  # same principal part
        np.testing.assert_allclose(np.abs(a), np.abs(b), rtol=0, atol=1e-5)
    np.testing.assert_allclose(_logits(model, IDS), LINEN.apply({"params": params}, IDS), rtol=0, atol=1e-5)
    assert mnx.adapter_config(model) == PiSSAConfig(r=2, alpha=4.0, targets=mnx.adapter_config(model).targets)
    # a ReLoRA-style restart merges and runs the SVD again on the merged kernel; the function is kept
    layer = model.model.layers[1].self_attn.o_proj
    layer.kernel_lora_b[...] += 0.05
    before = _logits(model, IDS)
    mnx.merge_and_reset(model, rng=3)
    np.testing.assert_allclose(_logits(model, IDS), before, rtol=0, atol=2e-5)
    merged = np.asarray(layer.kernel[...]) + 2.0 * np.asarray(layer.kernel_lora_a[...] @ layer.kernel_lora_b[...])
    s_merged = np.linalg.svd(merged, compute_uv=False)
    np.testing.assert_allclose(np.linalg.svd(np.asarray(layer.kernel[...]), compute_uv=False)[:-2], s_merged[2:],
                               atol=1e-5)  # the residual lacks exactly the top-2 singular values
    # the linen tree (PiSSA nodes) loads into a model built from the residual params without a new SVD
    other = mnx.load_linen_adapters(nnx_llama.from_linen(CFG, residual), initial)
    assert getattr(other.model.layers[0].mlp.up_proj, "mora_spec").method == "pissa"
    np.testing.assert_allclose(_logits(other, IDS), LINEN.apply({"params": params}, IDS), rtol=0, atol=1e-5)

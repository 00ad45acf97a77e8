"""Trainable-only optimization: frozen parameters get no state and never change."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mora_jax as mj


class Net(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, x):
        x = nn.Embed(50, self.width, name="embed_tokens")(x)
        for i in range(2):
            x = x + nn.Dense(self.width, use_bias=False, name=f"layers_{i}_up_proj")(nn.LayerNorm(name=f"norm_{i}")(x))
        return nn.Dense(50, use_bias=False, name="lm_head")(x)


def _problem(width=64):
    model = Net(width)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, 9)), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]

    def loss_fn(params, adapters):
        logits = mj.apply_model(model, params, tokens[:, :-1], adapters=adapters)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return model, params, loss_fn


CONFIG = mj.MoRAConfig(r=4, mora_type=1, targets=(r".*up_proj/kernel",), unfreeze=(r"lm_head/.*", r"norm_.*"))


def test_partition_trains_only_trainables():
    _, params, loss_fn = _problem()
    adapters = mj.init_adapters(params, CONFIG, jax.random.key(1))
    trainables, frozen = mj.partition(params, adapters, CONFIG)
    assert set(trainables["params"]) == {"lm_head", "norm_0", "norm_1"}
    assert "lm_head" not in frozen and "embed_tokens" in frozen
    tx = mj.optim.adamw(1e-2, weight_decay=0.01)
    opt_state = tx.init(trainables)

    @jax.jit
    def step(trainables, opt_state):
        def loss(t):
            p, a = mj.unpartition(t, frozen)
            return loss_fn(p, a)

        value, grads = jax.value_and_grad(loss)(trainables)
        updates, opt_state = tx.update(grads, opt_state, trainables)
        return optax.apply_updates(trainables, updates), opt_state, value

    losses = []
    for _ in range(20):
        trainables, opt_state, value = step(trainables, opt_state)
        losses.append(float(value))
    assert losses[-1] < losses[0] - 0.1
    new_params, new_adapters = mj.unpartition(trainables, frozen)
    # frozen: bit-identical; trained: changed
    np.testing.assert_array_equal(new_params["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(new_params["layers_0_up_proj"]["kernel"], params["layers_0_up_proj"]["kernel"])
    assert not np.array_equal(new_params["lm_head"]["kernel"], params["lm_head"]["kernel"])
    assert np.any(new_adapters["layers_0_up_proj"]["kernel"].m)
    # optimizer state exists only for trainables, in float32
    state_leaves = [x for x in jax.tree_util.tree_leaves(opt_state) if hasattr(x, "shape") and x.ndim >= 1]
    state_shapes = sorted(x.shape for x in state_leaves)
    trainable_shapes = sorted(x.shape for x in jax.tree_util.tree_leaves(trainables))
    assert state_shapes == sorted(trainable_shapes * 2)  # Adam's mu and nu
    assert all(x.dtype == jnp.float32 for x in state_leaves)


def test_masked_multi_transform_freezes_bit_identically():
    _, params, loss_fn = _problem()
    adapters = mj.init_adapters(params, CONFIG, jax.random.key(1))
    # bf16 frozen weights are fine; trainables are float32
    params = jax.tree_util.tree_map(lambda p: p, params)
    variables = {"params": params, "adapters": adapters}
    tx = mj.masked(optax.adam(1e-2), CONFIG)
    opt_state = tx.init(variables)
    labels = mj.param_labels(variables, CONFIG)
    assert labels["params"]["embed_tokens"]["embedding"] == "frozen"
    assert labels["params"]["lm_head"]["kernel"] == "trainable"

    @jax.jit
    def step(variables, opt_state):
        grads = jax.grad(lambda v: loss_fn(v["params"], v["adapters"]))(variables)
        updates, opt_state = tx.update(grads, opt_state, variables)
        return optax.apply_updates(variables, updates), opt_state

    for _ in range(5):
        variables, opt_state = step(variables, opt_state)
    np.testing.assert_array_equal(variables["params"]["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(variables["params"]["layers_1_up_proj"]["kernel"], params["layers_1_up_proj"]["kernel"])
    assert not np.array_equal(variables["params"]["lm_head"]["kernel"], params["lm_head"]["kernel"])
    n_trainable = mj.count_params(adapters) + mj.count_params(mj.split(params, CONFIG.unfreeze)[0])
    assert mj.optim.state_bytes(opt_state) == pytest.approx(2 * 4 * n_trainable, abs=64)


def test_optimizer_memory_scales_with_trainables_not_model():
    config = mj.MoRAConfig(r=4, mora_type=1, targets=(r".*up_proj/kernel",))
    measured = {}
    for width in (64, 512):
        _, params, _ = _problem(width)
        adapters = mj.init_adapters(params, config, jax.random.key(1))
        trainables, _ = mj.partition(params, adapters, config)
        state = mj.optim.adamw(1e-3).init(trainables)
        n_adapter = mj.count_params(adapters)
        # two float32 moments per adapter parameter, plus a few scalars; nothing for the model
        assert 2 * 4 * n_adapter <= mj.optim.state_bytes(state) <= 2 * 4 * n_adapter + 64
        measured[width] = (mj.optim.state_bytes(state), mj.count_params(params))
    state_growth = measured[512][0] / measured[64][0]
    model_growth = measured[512][1] / measured[64][1]
    assert model_growth > 20 and state_growth < 10  # r̂ grows like sqrt(width): state ~ width, model ~ width²


def test_partition_casts_trainables_to_float32():
    _, params, _ = _problem()
    params16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    trainables, frozen = mj.partition(params16, {}, CONFIG)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(trainables))
    assert frozen["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    back, _ = mj.unpartition(trainables, frozen, params_dtypes=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(back))


def test_unfreeze_pattern_that_matches_nothing_is_an_error():
    _, params, _ = _problem()
    config = mj.MoRAConfig(r=4, mora_type=1, targets=(r".*up_proj/kernel",), unfreeze=(r"embeddings/.*",))
    with pytest.raises(ValueError, match=r"unfreeze pattern 'embeddings/\.\*' matches no parameter[\s\S]*lm_head/kernel"):
        mj.partition(params, {}, config)


def test_optimizer_by_name():
    params = {"w": jnp.ones((3,))}
    for name, kwargs in (("adamw", {"weight_decay": 0.1}), ("lion", {"b1": 0.9}), ("sgd", {"momentum": 0.9})):
        tx = mj.optim.from_name(name, 1e-2, **kwargs)
        state = tx.init(params)
        updates, _ = tx.update({"w": jnp.ones((3,))}, state, params)
        assert float(updates["w"][0]) < 0
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        mj.optim.from_name("adamx", 1e-3)
    with pytest.raises(ValueError, match="does not accept"):
        mj.optim.from_name("sgd", 1e-3, beta=3)

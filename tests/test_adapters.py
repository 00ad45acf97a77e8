"""Adapters as parameter-pytree transforms on plain Flax models (not the project's LLaMA)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mora_jax as mj


class MLP(nn.Module):
    """A user's model: Dense and DenseGeneral (3-D kernel), nothing adapter-aware."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(48, name="fc1")(x))
        x = nn.DenseGeneral((4, 12), name="heads")(x)  # kernel (48, 4, 12)
        x = nn.DenseGeneral(24, axis=(-2, -1), name="merge_heads")(x)  # kernel (4, 12, 24)
        return nn.Dense(10, name="out")(x)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + nn.Dense(16, name="proj")(nn.tanh(x)), None


class Scanned(nn.Module):
    """A model that scans over layers: kernels get a leading layer axis."""

    @nn.compact
    def __call__(self, x):
        layers = nn.scan(Block, variable_axes={"params": 0, "adapters": 0}, split_rngs={"params": True}, length=3)
        x, _ = layers(name="layers")(x, None)
        return nn.Dense(5, name="head")(x)


ALL_KERNELS = (r".*kernel",)


def _setup(config, model=None, x=None, randomize=True):
    model = model or MLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 20)).astype(np.float32)) if x is None else x
    params = model.init(jax.random.key(0), x)["params"]
    layout = mj.dense_layout(model, x)
    adapters = mj.init_adapters(params, config, jax.random.key(1), layout=layout)
    if randomize:  # non-zero adapters so that they have an effect
        leaves, tree = jax.tree_util.tree_flatten(adapters)
        keys = jax.random.split(jax.random.key(2), len(leaves))
        adapters = jax.tree_util.tree_unflatten(tree, [0.1 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])
    return model, params, adapters, x


CONFIGS = [mj.MoRAConfig(r=2, mora_type=t, targets=ALL_KERNELS) for t in (1, 2, 3, 4, 6)] + [
    mj.LoRAConfig(r=3, alpha=6.0, targets=ALL_KERNELS), mj.LoRAConfig(r=3, alpha=6.0, rslora=True, targets=ALL_KERNELS)
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}{getattr(c, 'mora_type', '')}")
def test_adapters_mirror_targets_and_dense_general_is_2d(config):
    _, params, adapters, _ = _setup(config, randomize=False)
    flat = mj.adapters.flatten(adapters)
    assert set(mj.adapters.path_str(p) for p in flat) == {"fc1/kernel", "heads/kernel", "merge_heads/kernel", "out/kernel"}
    heads = flat[("heads", "kernel")]
    merge_heads = flat[("merge_heads", "kernel")]
    assert (heads.in_features, heads.out_features) == (48, 48)
    assert (merge_heads.in_features, merge_heads.out_features) == (48, 24)
    if config.method == "mora":
        assert heads.m.shape == (mj.rank_hat(48, 48, 2, config.mora_type),) * 2
        assert all(not np.any(a.m) for a in flat.values()) and all(a.m.dtype == jnp.float32 for a in flat.values())
    else:
        assert heads.a.shape == (48, 3) and not np.any(heads.b)
        bound = 1 / np.sqrt(48)
        assert np.abs(heads.a).max() <= bound and np.abs(heads.a).max() > 0.5 * bound


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}{getattr(c, 'mora_type', '')}")
def test_apply_merge_unmerge(config):
    model, params, adapters, x = _setup(config)
    base = model.apply({"params": params}, x)
    adapted = mj.apply_model(model, params, x, adapters=adapters)
    assert float(jnp.abs(adapted - base).max()) > 1e-3  # the adapters do something
    merged = mj.merge(params, adapters)
    np.testing.assert_allclose(model.apply({"params": merged}, x), adapted, rtol=1e-4, atol=1e-4)
    restored = mj.unmerge(merged, adapters)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    # jit (with donation) gives the same merge
    merged_jit = jax.jit(mj.merge, donate_argnums=0)(jax.tree_util.tree_map(jnp.copy, params), adapters)
    for a, b in zip(jax.tree_util.tree_leaves(merged_jit), jax.tree_util.tree_leaves(merged)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_zero_adapters_are_identity_and_none_means_base():
    model, params, adapters, x = _setup(mj.MoRAConfig(r=2, mora_type=6, targets=ALL_KERNELS), randomize=False)
    base = model.apply({"params": params}, x)
    np.testing.assert_array_equal(mj.apply_model(model, params, x, adapters=adapters), base)
    np.testing.assert_array_equal(mj.apply_model(model, params, x), base)


def test_scanned_model_stacked_adapters():
    model = Scanned()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32))
    config = mj.MoRAConfig(r=2, mora_type=1, targets=ALL_KERNELS)
    _, params, adapters, _ = _setup(config, model=model, x=x)
    proj = adapters["layers"]["proj"]["kernel"]
    assert proj.m.shape[0] == 3 and (proj.in_features, proj.out_features) == (16, 16)
    adapted = mj.apply_model(model, params, x, adapters=adapters)
    np.testing.assert_allclose(model.apply({"params": mj.merge(params, adapters)}, x), adapted, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(adapted - model.apply({"params": params}, x)).max()) > 1e-3


def test_bf16_params_merge_in_float32_and_cast_back():
    model, params, adapters, x = _setup(mj.MoRAConfig(r=2, mora_type=1, targets=ALL_KERNELS))
    params16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
    merged = mj.merge(params16, adapters)
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree_util.tree_leaves(merged))
    expected = (params16["fc1"]["kernel"].astype(jnp.float32) + adapters["fc1"]["kernel"].delta_weight()).astype(jnp.bfloat16)
    np.testing.assert_array_equal(merged["fc1"]["kernel"], expected)
    # adapters on a bf16 model compute in the model's dtype
    y = mj.apply_model(model, params16, x.astype(jnp.bfloat16), adapters=adapters)
    assert y.dtype == jnp.bfloat16


def test_training_path_has_no_kernel_weight_gradient():
    """Differentiating w.r.t. the adapters never builds a (k, d) kernel-shaped array: no ΔK, no dL/dK."""

    class Odd(nn.Module):  # shapes chosen so that no activation is kernel-shaped
        @nn.compact
        def __call__(self, x):
            return nn.Dense(37, use_bias=False, name="big")(x)

    model = Odd()
    x = jnp.ones((3, 5, 29))
    params = model.init(jax.random.key(0), x)["params"]
    for config in (mj.MoRAConfig(r=2, mora_type=1, targets=ALL_KERNELS), mj.MoRAConfig(r=2, mora_type=6, targets=ALL_KERNELS)):
        adapters = mj.init_adapters(params, config, jax.random.key(1))

        def loss(adapters):
            return jnp.sum(mj.apply_model(model, params, x, adapters=adapters) ** 2)

        jaxpr = jax.make_jaxpr(jax.grad(loss))(adapters)
        shapes = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars}
        assert (29, 37) not in shapes  # would be ΔK or the kernel's gradient
        # and the full-model gradient does have it (the check can fail)
        full = jax.make_jaxpr(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)
        assert (29, 37) in {tuple(v.aval.shape) for e in full.jaxpr.eqns for v in e.outvars}


def test_compiled_flops_skip_weight_gradient():
    """cost_analysis: adapter training costs forward + input-gradient, not the weight gradient."""

    class Deep(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(3):
                x = nn.Dense(256, use_bias=False, name=f"l{i}")(x)
            return x

    model, x = Deep(), jnp.ones((64, 256))
    params = model.init(jax.random.key(0), x)["params"]
    adapters = mj.init_adapters(params, mj.MoRAConfig(r=8, mora_type=1, targets=ALL_KERNELS), jax.random.key(1))

    def flops(fn, arg):
        return jax.jit(jax.grad(fn)).lower(arg).compile().cost_analysis()["flops"]

    dense = 2 * 64 * 256 * 256  # one (64x256)@(256x256) matmul
    f_adapter = flops(lambda a: jnp.sum(mj.apply_model(model, params, x, adapters=a) ** 2), adapters)
    f_full = flops(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2), params)
    # full: 3 forward + 3 weight-grad + 2 input-grad (the first layer's input gradient is not needed)
    assert f_full == pytest.approx(8 * dense, rel=0.1)
    # adapters: 3 forward + 2 input-grad (the first layer's input-grad is unnecessary too); MoRA's own cost is small
    assert f_adapter == pytest.approx(5 * dense, rel=0.15)


def test_split_combine_and_summary():
    model, params, adapters, _ = _setup(mj.MoRAConfig(r=2, mora_type=1, targets=(r"fc1/kernel",), unfreeze=(r"out/.*",)))
    selected, rest = mj.split(params, (r"out/.*",))
    assert set(mj.adapters.path_str(p) for p in mj.adapters.flatten(selected)) == {"out/kernel", "out/bias"}
    assert "out" not in rest
    rebuilt = mj.combine(selected, rest)
    assert jax.tree_util.tree_structure(rebuilt) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="more than one tree"):
        mj.combine(selected, selected)
    line = mj.summary(params, adapters, mj.MoRAConfig(r=2, mora_type=1, targets=(r"fc1/kernel",), unfreeze=(r"out/.*",)))
    n_out = 24 * 10 + 10
    assert f"trainable {adapters['fc1']['kernel'].m.size + n_out:,}" in line


def test_full_config_has_no_adapters():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.ones((1, 20)))["params"]
    assert mj.init_adapters(params, mj.FullConfig(targets=ALL_KERNELS), jax.random.key(0)) == {}
    assert mj.trainable_patterns(mj.FullConfig(targets=ALL_KERNELS, unfreeze=("x",))) == (r".*kernel", "x")


def test_errors_are_clear():
    model = MLP()
    x = jnp.ones((1, 20))
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"matches no parameter[\s\S]*fc1/kernel"):
        mj.init_adapters(params, mj.MoRAConfig(targets=(r".*/q_proj/kernel",)), jax.random.key(0))
    with pytest.raises(ValueError, match="only kernels with >= 2 dims"):
        mj.init_adapters(params, mj.MoRAConfig(targets=(r"fc1/.*",)), jax.random.key(0))
    with pytest.raises(ValueError, match="positive int"):
        mj.MoRAConfig(r=0)
    with pytest.raises(ValueError, match="unknown mora_type 7"):
        mj.MoRAConfig(mora_type=7)
    with pytest.raises(ValueError, match="invalid regular expression"):
        mj.LoRAConfig(targets=("(",))
    with pytest.raises(ValueError, match="unknown method"):
        mj.make_config("vera")
    other = MLP().init(jax.random.key(0), jnp.ones((1, 30)))["params"]  # fc1 is 30 -> 48 there
    adapters = mj.init_adapters(other, mj.MoRAConfig(r=2, mora_type=1, targets=ALL_KERNELS), jax.random.key(0))
    with pytest.raises(ValueError, match=r"'fc1/kernel' does not fit the kernel.*30x48.*\(20, 48\)"):
        mj.merge(params, adapters)
    with pytest.raises(ValueError, match=r"adapter at fc1/kernel is 30x48 but the layer maps 20 -> 48"):
        mj.apply_model(model, params, x, adapters=adapters)
    with pytest.raises(ValueError, match="not in params"):
        mj.merge({"other": params["out"]}, adapters)


def test_adapter_dropout_only_with_dropout_rng():
    config = mj.MoRAConfig(r=2, mora_type=1, targets=ALL_KERNELS, dropout=0.5)
    model, params, adapters, x = _setup(config)
    deterministic = mj.apply_model(model, params, x, adapters=adapters)
    again = mj.apply_model(model, params, x, adapters=adapters)
    np.testing.assert_array_equal(deterministic, again)
    dropped = mj.apply_model(model, params, x, adapters=adapters, rngs={"dropout": jax.random.key(3)})
    assert float(jnp.abs(dropped - deterministic).max()) > 1e-4
    same_key = mj.apply_model(model, params, x, adapters=adapters, rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(dropped, same_key)

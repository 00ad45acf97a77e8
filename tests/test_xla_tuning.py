"""mora_jax.xla_tuning: which compiler options a training step gets, and that they take effect."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mora_jax import ops, xla_tuning


def test_cpu_gets_the_options_other_platforms_none(monkeypatch):
    monkeypatch.delenv(xla_tuning.DISABLE_ENV, raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert xla_tuning.train_step_compiler_options("cpu") == xla_tuning.CPU_TRAIN_STEP_OPTIONS
    assert xla_tuning.train_step_compiler_options("gpu") is None
    assert xla_tuning.train_step_compiler_options("tpu") is None


def test_opt_out_and_user_flags_win(monkeypatch):
    monkeypatch.setenv(xla_tuning.DISABLE_ENV, "0")
    assert xla_tuning.train_step_compiler_options("cpu") is None
    monkeypatch.delenv(xla_tuning.DISABLE_ENV)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    assert xla_tuning.train_step_compiler_options("cpu") is None


def test_unknown_option_is_dropped_not_fatal(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setattr(xla_tuning, "CPU_TRAIN_STEP_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
    assert xla_tuning.train_step_compiler_options("cpu") is None


def test_the_options_change_the_compiled_mora_backward_not_its_values(monkeypatch):
    """With the options, XLA:CPU keeps YNNPACK to single dots (fewer library fusions) and the
    gradient is unchanged."""
    monkeypatch.setenv("XLA_FLAGS", "")
    options = xla_tuning.train_step_compiler_options("cpu")
    k, d, r_hat = 96, 160, 32
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, k)), jnp.float32)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((k, d)), jnp.float32)
    m = jnp.asarray(np.random.default_rng(2).standard_normal((r_hat, r_hat)), jnp.float32)

    def loss(x, m):
        y = x @ w + ops.apply_mora(x, m, in_features=k, out_features=d, mora_type=1)
        return jnp.sum(jnp.tanh(y))

    grad = jax.grad(loss, argnums=(0, 1))
    plain = jax.jit(grad).lower(x, m).compile()
    tuned = jax.jit(grad, compiler_options=options).lower(x, m).compile()
    count = lambda c: len(re.findall(r"__ynn_fusion", c.as_text()))
    assert count(tuned) < count(plain)
    for a, b in zip(plain(x, m), tuned(x, m)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)


def test_the_step_builder_compiles_the_train_step_with_the_options(monkeypatch):
    """``build_steps(..., compiler_options="auto")`` (the loop's and the benchmark's default) picks the
    options for the mesh's platform; ``None`` compiles untuned."""
    from mora_jax import steps

    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.delenv(xla_tuning.DISABLE_ENV, raising=False)
    mesh = steps.default_mesh()
    want = xla_tuning.train_step_compiler_options(xla_tuning.mesh_platform(mesh))
    assert steps.build_steps(None, None, None, mesh=mesh).compiler_options == want
    assert steps.build_steps(None, None, None, mesh=mesh, compiler_options=None).compiler_options is None
    if jax.default_backend() == "cpu":
        assert want == xla_tuning.CPU_TRAIN_STEP_OPTIONS

"""Finite is not healthy: the health monitor's signs of a collapsed run and of a loss spike, when a
problem ends, which checkpoint it holds back from rotation, and what it tells the user."""

import math

import numpy as np
import pytest

from mora_jax import health
from mora_jax.checkpoint.integrity import steps_to_delete
from mora_jax.errors import ConfigError
from mora_jax.health import HealthConfig, HealthMonitor

LN_512 = math.log(512)


def _feed(monitor, losses, grad_norm=1.0, start=1):
    for i, loss in enumerate(losses):
        monitor.observe(start + i, {"loss": loss, "grad_norm": grad_norm, "tokens": 128.0})


def _pretraining_curve(steps, seed, noise=0.08, start=0):
    """A healthy run: fast then slow descent, batch-to-batch noise with heavy tails."""
    rng = np.random.default_rng(seed)
    s = np.arange(start, start + steps)
    return 6.3 * np.exp(-s / 150) + 2.5 + noise * rng.standard_t(3, steps)


@pytest.mark.parametrize("seed", range(5))
def test_healthy_runs_raise_nothing_with_the_defaults(seed):
    monitor = HealthMonitor(vocab_size=32000)
    _feed(monitor, _pretraining_curve(3000, seed))
    assert monitor.pop_events() == [] and monitor.bad_from() is None
    assert monitor.hold_before() == 3000  # only the checkpoints whose next step was seen are known good


def test_a_fresh_model_near_the_uniform_loss_is_not_pinned():
    monitor = HealthMonitor(vocab_size=512)
    _feed(monitor, [LN_512 + 0.03 - 0.002 * i for i in range(10)])  # the tiny preset's first steps
    assert monitor.pop_events() == []


def test_zero_gradients_for_collapse_steps_in_a_row_are_a_collapse():
    monitor = HealthMonitor(HealthConfig(collapse_steps=5), vocab_size=512)
    _feed(monitor, [6.27, 6.28], grad_norm=1.2)
    _feed(monitor, [LN_512] * 3, grad_norm=0.0, start=3)
    assert monitor.pop_events() == [] and monitor.bad_from() == 2  # suspected already: checkpoint 2 is held
    _feed(monitor, [LN_512] * 2, grad_norm=0.0, start=6)
    [(event, finding)] = monitor.pop_events()
    assert event == "detected" and finding.kind == "collapse" and finding.onset == 3 and finding.bad_from == 2
    assert finding.describe() == ("the run collapsed at step 3: the gradient norm has been 0 for 5 steps in a row "
                                  "(steps 3-7) and the loss is pinned at ln(vocab) = 6.2383, the loss of a uniform "
                                  "prediction")


def test_a_short_run_of_zero_gradients_is_not_a_collapse_and_is_forgotten():
    monitor = HealthMonitor(HealthConfig(collapse_steps=5), vocab_size=512)
    _feed(monitor, [5.0] * 3, grad_norm=0.0)
    _feed(monitor, [5.0], grad_norm=0.5, start=4)
    assert monitor.pop_events() == [] and monitor.bad_from() is None and monitor.hold_before() == 4


def test_a_loss_pinned_at_the_uniform_value_is_a_collapse_even_with_gradients():
    monitor = HealthMonitor(HealthConfig(collapse_steps=3), vocab_size=512)
    _feed(monitor, [LN_512 * (1 + 1e-5)] * 3, grad_norm=0.3)
    [(_, finding)] = monitor.pop_events()
    assert "the loss is pinned at ln(vocab)" in finding.detail and "for 3 steps in a row" in finding.detail


def test_batches_without_tokens_are_not_zero_gradients():
    monitor = HealthMonitor(HealthConfig(collapse_steps=2), vocab_size=512)
    for step in range(1, 6):
        monitor.observe(step, {"loss": 0.0, "grad_norm": 0.0, "tokens": 0.0})
    assert monitor.pop_events() == []


def test_one_hard_batch_is_not_a_spike():
    monitor = HealthMonitor(HealthConfig(spike_window=40), vocab_size=512)
    losses = list(_pretraining_curve(60, seed=0, noise=0.03, start=500))
    losses[45] += 3.0  # step 46 alone
    _feed(monitor, losses[:46])
    assert monitor.pop_events() == [] and monitor.bad_from() == 45  # suspected: checkpoint 44 is held
    _feed(monitor, losses[46:], start=47)
    assert monitor.pop_events() == [] and monitor.bad_from() is None


def test_a_spike_is_found_held_and_released_once_the_run_recovers():
    config = HealthConfig(spike_window=40)  # judged after 10 healthy losses; 10 healthy ones to recover
    monitor = HealthMonitor(config, vocab_size=512)
    losses = list(_pretraining_curve(70, seed=0, noise=0.03, start=500))
    for i in (45, 46, 47):  # steps 46-48: an update damaged the model for a while
        losses[i] += 3.0
    _feed(monitor, losses[:48])
    [(event, finding)] = monitor.pop_events()
    assert (event, finding.kind, finding.onset, monitor.bad_from()) == ("detected", "spike", 46, 45)
    assert finding.detail.startswith("3 losses in a row (steps 46-48) above train.spike_zscore=6 robust standard")
    _feed(monitor, losses[48:57], start=49)
    assert monitor.pop_events() == [] and monitor.hold_before() == 45  # 9 healthy steps: still held
    _feed(monitor, losses[57:58], start=58)
    assert monitor.pop_events() == [("recovered", finding)] and monitor.bad_from() is None


def test_a_spike_then_a_collapse_keeps_the_spikes_good_checkpoint():
    monitor = HealthMonitor(HealthConfig(collapse_steps=3, spike_window=20), vocab_size=512)
    _feed(monitor, [3.0 + 0.01 * (i % 3) for i in range(10)])
    _feed(monitor, [9.0] * 3, start=11)
    _feed(monitor, [LN_512] * 3, grad_norm=0.0, start=14)
    kinds = [f.kind for _, f in monitor.pop_events()]
    assert kinds == ["spike", "collapse"] and monitor.bad_from() == 10


def test_the_problem_going_on_survives_a_restart():
    monitor = HealthMonitor(HealthConfig(collapse_steps=2), vocab_size=512)
    _feed(monitor, [LN_512] * 2, grad_norm=0.0, start=7)
    restarted = HealthMonitor(HealthConfig(collapse_steps=2), vocab_size=512)
    restarted.load_state_dict(monitor.state_dict())
    assert restarted.finding == monitor.finding and restarted.bad_from() == 6
    restarted.load_state_dict(None)
    assert restarted.finding is None and restarted.bad_from() is None


def test_retention_keeps_the_held_checkpoint():
    steps = [2, 4, 6, 8, 10]
    assert steps_to_delete(steps, steps, 1) == [2, 4, 6, 8]
    assert steps_to_delete(steps, steps, 1, hold_before=7) == [2, 4, 8]  # 6: the newest before step 7
    assert steps_to_delete(steps, steps, 1, hold_before=2) == [2, 4, 6, 8]  # none before: nothing held
    assert steps_to_delete(steps, steps, 3, hold_before=9) == [2, 4]  # 8 is kept anyway


def test_the_advice_names_the_good_checkpoint_or_says_none_is_left():
    assert health.resume_advice("D", [1, 6], 2) == (
        "the last good checkpoint is step 1 in D (to resume from it, move the later ones aside "
        "(mkdir -p D/unhealthy && mv D/6 D/unhealthy/))")
    stop = health.resume_advice("D", [1, 6], 2, stopping=True)
    assert stop.startswith("the last good checkpoint is step 1 in D: to resume from it, move the later ones aside")
    assert stop.endswith("and run again with a lower learning rate (optim.lr), gradient clipping (optim.clip_norm) "
                         "or checked data")
    none = health.resume_advice("D", [3, 6], 2, stopping=True)
    assert none.startswith("no good checkpoint is left (the checkpoints kept, steps 3, 6, are from step 2 on")
    assert "--config.checkpoint.mode=overwrite" in none
    assert health.resume_advice("D", [3], None, pending=5) == "the last good checkpoint is step 5 in D"


@pytest.mark.parametrize("field, value", [("collapse_steps", -1), ("spike_window", 2.5), ("on_collapse", "panic"),
                                          ("spike_zscore", 0.0), ("spike_zscore", math.inf)])
def test_bad_health_settings_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        HealthConfig(**{field: value})


def test_first_non_finite_names_the_leaf():
    import jax.numpy as jnp

    tree = {"a": jnp.ones(3), "b": {"c": jnp.array([1.0, jnp.inf]), "d": jnp.arange(3)}}
    assert health.first_non_finite(tree) == "['b']['c']"
    assert health.first_non_finite({"a": jnp.ones(2), "i": jnp.arange(2)}) is None

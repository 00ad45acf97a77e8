"""The pure train step, schedules and ReMoRA on the tiny LLaMA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mora_jax as mj
from mora_jax import chunked_loss, remora, schedules, training
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, init_params
from mora_jax.run_config import OptimConfig

CFG = LLAMA_CONFIGS["tiny"]
MODEL = LlamaForCausalLM(CFG)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _batch(seed=0, b=8, t=16):
    ids = jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)), jnp.int32)
    return {"input_ids": ids, "loss_mask": jnp.ones_like(ids)}


def _state(params, config, tx, seed=1):
    adapters = mj.init_adapters(params, config, jax.random.key(seed))
    return training.create_train_state(params, adapters, config, tx, jax.random.key(seed + 1))


def test_grad_accumulation_equals_full_batch(params):
    config = mj.MoRAConfig(r=4, mora_type=6, unfreeze=(r".*norm/.*",))
    tx = mj.optim.adamw(1e-2)
    state = _state(params, config, tx)
    state = state.replace(trainables=jax.tree_util.tree_map(lambda x: x + 0.01, state.trainables))
    batch = _batch()
    batch["loss_mask"] = batch["loss_mask"].at[:3, :5].set(0)  # uneven token counts per micro-batch
    l1, g1, c1 = training.loss_and_grads(MODEL, state, batch, training.StepConfig(grad_accum=1))
    l4, g4, c4 = training.loss_and_grads(MODEL, state, batch, training.StepConfig(grad_accum=4))
    assert float(c1) == float(c4) == 8 * 15 - 15
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_loss_mask_excludes_positions(params):
    config = mj.MoRAConfig(r=4, mora_type=1)
    state = _state(params, config, mj.optim.adamw(1e-3))
    batch = _batch()
    logits = training.logits_fn(MODEL, state, batch["input_ids"])
    masked = dict(batch, loss_mask=batch["loss_mask"].at[:, 8:].set(0))
    total, count = training.next_token_loss(logits, masked)
    assert float(count) == 8 * 8
    # changing tokens only in the masked region (targets after position 8) leaves the loss unchanged
    altered = dict(masked, input_ids=masked["input_ids"].at[:, 10:].set(3))
    total2, _ = training.next_token_loss(logits, altered)
    np.testing.assert_allclose(total, total2, rtol=1e-6)


@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_next_token_loss_is_the_sliced_textbook_loss(z_loss):
    """Position t predicts token t+1; the last position counts for nothing, even with a
    non-finite logit there; the gradient reaches only the weighted positions."""
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.standard_normal((2, 6, 11)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 11, (2, 6)), jnp.int32)
    mask = jnp.asarray(rng.integers(0, 2, (2, 6)), jnp.int32).at[:, -1].set(1)
    batch = {"input_ids": ids, "loss_mask": mask}

    def textbook(logits):
        lg = logits[:, :-1]
        ce = optax.softmax_cross_entropy_with_integer_labels(lg, ids[:, 1:])
        ce = ce + z_loss * jax.nn.logsumexp(lg, axis=-1) ** 2
        return jnp.sum(ce * mask[:, :-1])

    total, count = training.next_token_loss(logits, batch, z_loss)
    assert float(count) == float(jnp.sum(mask[:, :-1]))
    np.testing.assert_allclose(total, textbook(logits), rtol=1e-6)
    grad = jax.grad(lambda lg: training.next_token_loss(lg, batch, z_loss)[0])(logits)
    np.testing.assert_allclose(grad, jax.grad(textbook)(logits), rtol=1e-6, atol=1e-7)
    inf_last = logits.at[:, -1, 0].set(jnp.inf)
    assert np.isfinite(float(training.next_token_loss(inf_last, batch, z_loss)[0]))


def test_train_step_trains_and_frozen_stay_bit_identical(params):
    config = mj.MoRAConfig(r=4, mora_type=1, unfreeze=mj.LLAMA_FULLY_TRAINED)
    tx = mj.optim.adamw(3e-3)
    state = _state(params, config, tx)
    frozen0 = state.frozen
    sched = schedules.make_schedule(OptimConfig(lr=3e-3, warmup_steps=0), total_steps=10)
    step = jax.jit(lambda s, b: training.train_step(s, b, model=MODEL, tx=tx, schedule=sched))
    losses = []
    for _ in range(8):
        state, metrics = step(state, _batch())
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.3
    for a, b in zip(jax.tree_util.tree_leaves(state.frozen), jax.tree_util.tree_leaves(frozen0)):
        np.testing.assert_array_equal(a, b)
    assert "embed_tokens" in state.trainables["params"]["model"] and "lm_head" in state.trainables["params"]


def test_schedule_warmup_cosine_and_restarts():
    base = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, restart_warmup=5)
    plain = schedules.make_schedule(base, total_steps=100)
    assert float(plain(0)) == 0.0 and float(plain(5)) == pytest.approx(0.5)
    assert float(plain(10)) == pytest.approx(1.0) and float(plain(100)) == pytest.approx(0.1)
    for flavour in schedules.FLAVOURS:
        cfg = dataclasses.replace(base, restart_flavour=flavour)
        schedule = schedules.make_schedule(cfg, total_steps=100, restart_every=30)
        lr = np.array([float(schedule(s)) for s in range(100)])
        np.testing.assert_allclose(lr[:30], [float(plain(s)) for s in range(30)], rtol=1e-6)
        for start in (30, 60, 90):  # restarts at the merge steps: back to 0, re-warm over 5 steps
            assert lr[start] == 0.0 and lr[start - 1] > 0.1
            assert np.all(np.diff(lr[start:start + 6]) > 0)
        if flavour == "cosine_restarts":  # rejoins the global cosine after the re-warm-up
            np.testing.assert_allclose(lr[40], float(plain(40)), rtol=1e-6)
        else:  # the reference: a new schedule whose peak is the lr reached at the merge
            np.testing.assert_allclose(lr[35], float(plain(30)), rtol=1e-5)
    with pytest.raises(ValueError, match="restart_flavour='x'"):
        OptimConfig(lr=1.0, restart_flavour="x")
    schedules.make_schedule(base, total_steps=10)  # 10 warm-up steps fit a 10-step run; 5 do not:
    with pytest.raises(ValueError, match=r"warmup_steps must be in \[0, 5\]"):
        schedules.make_schedule(base, total_steps=5)


def test_reference_restarts_are_looked_up_not_unrolled():
    """Thousands of merges: the schedule is the same program as with a few (a lookup of the cycle,
    not a branch per cycle that took minutes to compile), with each cycle's values."""
    cfg = OptimConfig(lr=1e-3, warmup_steps=20, min_lr_ratio=0.1, restart_warmup=3)
    many = schedules.make_schedule(cfg, total_steps=3000, restart_every=7)
    few = schedules.make_schedule(cfg, total_steps=3000, restart_every=700)
    size = lambda schedule: len(jax.jit(schedule).lower(0).as_text().splitlines())  # operations  # noqa: E731
    assert size(many) < 1.2 * size(few)
    # each cycle: warm-up from 0 over 3 steps to the lr the previous cycle had reached at its start
    lr = np.asarray(jax.vmap(many)(jnp.arange(3000)))
    for start in (7, 700, 2996):
        assert lr[start] == 0.0 and lr[start + 1] == pytest.approx(lr[start + 3] / 3, rel=1e-5)


def test_remora_cycle_and_merge_invariant(params):
    rc = remora.RemoraConfig(every=3)
    assert [rc.type_at(s) for s in range(0, 15, 3)] == [1, 2, 3, 4, 1]
    assert [s for s in range(10) if rc.is_merge_step(s)] == [3, 6, 9]
    config = mj.MoRAConfig(r=4, mora_type=1, unfreeze=(r".*norm/.*",))
    tx = mj.optim.adamw(1e-2)
    state = _state(params, config, tx)
    sched = lambda step: 1e-2
    step = jax.jit(lambda s, b: training.train_step(s, b, model=MODEL, tx=tx, schedule=sched))
    frozen_history = []
    for i in range(7):
        state, _ = step(state, _batch(i))
        if rc.is_merge_step(int(state.step)):
            ids = _batch(99)["input_ids"]
            before = training.logits_fn(MODEL, state, ids)
            params_count_before = int(state.opt_state["params"].count)
            next_type = rc.type_at(int(state.step))
            state = jax.jit(lambda s: remora.merge_and_reset(s, tx=tx, next_type=next_type), donate_argnums=0)(state)
            after = training.logits_fn(MODEL, state, ids)
            np.testing.assert_allclose(after, before, atol=2e-5)
            adapter = state.adapters["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
            assert adapter.mora_type == rc.type_at(int(state.step)) and not np.any(adapter.m)
            # adapters' optimizer state is fresh; fully trained params keep theirs
            assert int(state.opt_state["adapters"].count) == 0
            assert int(state.opt_state["params"].count) == params_count_before > 0
        frozen_history.append(np.asarray(state.frozen["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]))
    changed = [not np.array_equal(frozen_history[i], frozen_history[i - 1]) for i in range(1, 7)]
    # steps 1..7; the kernel changes exactly at the merges after steps 3 and 6
    assert changed == [False, True, False, False, True, False]


def test_relora_reinitialises_a_and_zeros_b(params):
    config = mj.LoRAConfig(r=4, alpha=8.0)
    tx = mj.optim.adamw(1e-2)
    state = _state(params, config, tx)
    state = state.replace(trainables=jax.tree_util.tree_map(lambda x: x + 0.05, state.trainables))
    old = state.adapters["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    new_state = remora.merge_and_reset(state, tx=tx, next_type=None)
    new = new_state.adapters["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert not np.any(new.b) and np.any(new.a) and not np.allclose(new.a, old.a)
    np.testing.assert_allclose(
        training.logits_fn(MODEL, new_state, _batch()["input_ids"]), training.logits_fn(MODEL, state, _batch()["input_ids"]), atol=2e-5)


def test_remora_config_errors():
    with pytest.raises(ValueError, match="mixes type 6"):
        remora.RemoraConfig(every=10, type_cycle=(1, 6))
    with pytest.raises(ValueError, match="unknown mora_type 5"):
        remora.RemoraConfig(every=10, type_cycle=(1, 5))


@pytest.mark.parametrize("z_loss,grad_accum", [(0.0, 1), (1e-3, 2)])
def test_chunked_loss_equals_the_plain_loss(params, z_loss, grad_accum):
    """train.loss_chunk: the loss and every gradient (adapters, a trained LM head, norms) are those of
    the plain loss over the full logits."""
    config = mj.MoRAConfig(r=4, mora_type=6, unfreeze=(r"lm_head/kernel", r".*norm/.*"))
    state = _state(params, config, mj.optim.adamw(1e-2))
    state = state.replace(trainables=jax.tree_util.tree_map(lambda x: x + 0.01, state.trainables))
    batch = _batch()
    batch["loss_mask"] = batch["loss_mask"].at[:3, 5:11].set(0)
    plain = training.loss_and_grads(MODEL, state, batch, training.StepConfig(grad_accum=grad_accum, z_loss=z_loss))
    chunked = training.loss_and_grads(MODEL, state, batch, training.StepConfig(
        grad_accum=grad_accum, z_loss=z_loss, loss_chunk=4))
    np.testing.assert_allclose(chunked[0], plain[0], rtol=1e-6)
    assert float(chunked[2]) == float(plain[2])
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(plain[1])]
    assert any("lm_head" in n for n in names) and any("adapters" in n for n in names)
    for name, a, b in zip(names, jax.tree_util.tree_leaves(chunked[1]), jax.tree_util.tree_leaves(plain[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)


def test_chunked_loss_never_builds_the_full_logits(params):
    """Neither the forward nor the backward pass of the chunked loss has a (B, T, V) float32 array, or
    the chunks' logits stacked (n, B, chunk, V): the chunk body is rematerialised."""
    config = mj.MoRAConfig(r=4, mora_type=6)
    state = _state(params, config, mj.optim.adamw(1e-2))
    batch = _batch()  # B=8, T=16, V=256

    def jaxpr(step_config):
        return str(jax.make_jaxpr(lambda s, b: training.loss_and_grads(MODEL, s, b, step_config))(state, batch))

    assert "f32[8,16,256]" in jaxpr(training.StepConfig())  # the check can see the full logits
    text = jaxpr(training.StepConfig(loss_chunk=4))
    assert "f32[8,4,256]" in text
    assert "f32[8,16,256]" not in text and "f32[4,8,4,256]" not in text


def test_chunked_loss_names_a_chunk_that_does_not_divide():
    with pytest.raises(ValueError, match=r"loss_chunk=5 must divide the sequence length 16.*e.g. 4"):
        chunked_loss.chunked_cross_entropy(lambda h, i: h, jnp.zeros((1, 16, 3)), jnp.zeros((1, 16), jnp.int32),
                                       jnp.ones((1, 16)), 5)

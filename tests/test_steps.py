"""The one builder of compiled steps: the default 1-device mesh, the donation rule, structure changes
at merges, and lowering for abstract arguments."""

import jax
import jax.numpy as jnp
import numpy as np

import mora_jax as mj
from mora_jax import training
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, init_params
from mora_jax.steps import abstract, build_steps, default_mesh

MODEL = LlamaForCausalLM(LLAMA_CONFIGS["tiny"])
TX = mj.optim.adamw(3e-3)


def _batch(seed=0):
    ids = np.random.default_rng(seed).integers(0, 256, (2, 16)).astype(np.int32)
    return {"input_ids": ids, "loss_mask": np.ones_like(ids)}


def _state(params, config):
    adapters = mj.init_adapters(params, config, jax.random.key(1))
    return training.create_train_state(params, adapters, config, TX, jax.random.key(2))


def test_default_mesh_is_the_default_device():
    mesh = default_mesh()
    assert mesh.devices.size == 1 and mesh.devices.flat[0] == jax.devices()[0]
    assert build_steps(MODEL, TX, lambda s: 1e-3).mesh.devices.size == 1


def test_steps_never_delete_the_callers_weights_and_match_the_pure_step():
    params = init_params(MODEL.config, jax.random.key(0))
    config = mj.FullConfig()  # float32 trainables that could alias the caller's arrays
    steps = build_steps(MODEL, TX, lambda s: 1e-3)
    state = steps.place(_state(params, config))
    reference = _state(params, config)
    for i in range(2):
        state, metrics = steps.train(state, steps.shard_batch(_batch(i)))
        reference, ref_metrics = jax.jit(lambda s, b: training.train_step(
            s, b, model=MODEL, tx=TX, schedule=lambda _: 1e-3))(reference, _batch(i))
        np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
        assert np.isfinite(float(metrics["trainables_norm"]))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(params))
    assert int(state.step) == 2


def test_merge_donates_only_the_frozen_weights_the_run_made():
    params = init_params(MODEL.config, jax.random.key(0))
    steps = build_steps(MODEL, TX, lambda s: 1e-3)
    state = steps.place(_state(params, mj.MoRAConfig(r=4, mora_type=1)))
    state, _ = steps.train(state, steps.shard_batch(_batch()))
    handed_in = state.frozen
    assert not steps.owns_frozen(state)
    state = steps.merge(state, next_type=2)
    assert steps.owns_frozen(state) and mj.adapters.current_mora_type(state.adapters) == 2
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(handed_in))
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(params))
    first_merge = state.frozen
    state, _ = steps.train(state, steps.shard_batch(_batch(1)))  # a step on the new structure
    state = steps.merge(state, next_type=3)
    assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(first_merge))  # merged in place


def test_lowering_takes_abstract_arguments():
    params = init_params(MODEL.config, jax.random.key(0))
    steps = build_steps(MODEL, TX, lambda s: 1e-3)
    state = steps.place(_state(params, mj.LoRAConfig(r=2)))
    abstract_state = abstract(state)
    batch = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32, sharding=steps.batch_sharding) for k, v in _batch().items()}
    compiled = steps.lower_train(abstract_state, batch).compile()
    assert compiled.memory_analysis() is not None
    assert steps.lower_eval(abstract_state, batch).compile() is not None
    assert steps.lower_merge(abstract_state, None).compile() is not None

"""The "projections" remat policy: the backward pass keeps one array per projection (its output with
the adapter's Δy added) and recomputes the rest, so adapter intermediates are never saved beside the
projection outputs (``dots_saveable`` saves every matmul output, MoRA's ``compress(x)·M`` and LoRA's
``x·A`` / ``x·A·B`` included). Same gradients as no remat; less saved memory than ``dots_saveable``."""

import jax
import numpy as np
import pytest

import mora_jax as mj
from mora_jax import training
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, init_params
from mora_jax.models.params import stack_layers
from mora_jax.steps import build_steps

# Wide adapters on a small model (r̂ close to the hidden size, as r=128 on the 250M model), a long
# enough batch that activations, not weights, decide the temporaries.
CONFIG = LLAMA_CONFIGS["tiny"].replace(num_hidden_layers=4, max_position_embeddings=256)
ADAPTERS = {"mora": mj.MoRAConfig(r=16, mora_type=1), "lora": mj.LoRAConfig(r=32)}
TX = mj.optim.adamw(1e-3)


def _batch():
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 256)).astype(np.int32)
    return {"input_ids": ids, "loss_mask": np.ones_like(ids)}


def _state(adapter_config, params):
    model = LlamaForCausalLM(CONFIG.replace(scan_layers=True))
    layout = mj.dense_layout(model, np.zeros((1, 8), np.int32))
    adapters = mj.init_adapters(params, adapter_config, jax.random.key(1), layout=layout)
    # a non-zero adapter, so that its gradient path is exercised in full
    adapters = jax.tree_util.tree_map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape, x.dtype),
                                      adapters)
    return training.create_train_state(params, adapters, adapter_config, TX, jax.random.key(2))


def _steps(policy):
    model = LlamaForCausalLM(CONFIG.replace(remat_policy=policy, scan_layers=True))
    return build_steps(model, TX, lambda s: 1e-3)


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_projections_policy_same_step_as_no_remat_and_saves_less_than_dots_saveable(method):
    params = stack_layers(init_params(CONFIG, jax.random.key(0)))
    state = _state(ADAPTERS[method], params)
    batch = _batch()
    results, temp_bytes = {}, {}
    for policy in ("none", "projections", "dots_saveable"):
        steps = _steps(policy)
        placed, sharded = steps.place(state), steps.shard_batch(batch)
        temp_bytes[policy] = steps.lower_train(placed, sharded).compile().memory_analysis().temp_size_in_bytes
        results[policy] = steps.train(placed, sharded)
    (ref_state, ref_metrics), (new_state, metrics) = results["none"], results["projections"]
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                           new_state.trainables, ref_state.trainables)
    # dots_saveable keeps the adapter's matmul outputs too: at these widths, clearly more
    assert temp_bytes["projections"] < 0.9 * temp_bytes["dots_saveable"], temp_bytes


def test_unknown_remat_policy_names_the_choices():
    with pytest.raises(ValueError, match="projections"):
        CONFIG.replace(remat_policy="projection")

"""Merges kept beside a quantized kernel (model.quantize.merge='residual', mora_jax.quant.residual):
exact, shape-stable, checkpointed, sharded, exported; the default chosen per format and method."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mora_jax import adapters as adapters_lib
from mora_jax import assembly
from mora_jax.checkpoint.checkpointer import Checkpointer
from mora_jax.errors import ConfigError
from mora_jax.methods import DoRAConfig, LoRAConfig, MoRAConfig
from mora_jax.quant import formats
from mora_jax.quant.config import QuantConfig
from mora_jax.quant.residual import merges_in_run
from mora_jax.quant.transform import dequantize_params
from mora_jax.run_config import RunConfig

UP = ("model", "layers_0", "mlp", "up_proj", "kernel")
UP_SCANNED = ("model", "layers", "mlp", "up_proj", "kernel")


def _config(fmt="nf4", method="mora", *, merge="auto", scan=False, every=2, cycle=(1, 2, 3, 4), mesh=None):
    c = {"method": method, "workdir": "/unused",
         "model": {"preset": "tiny", "overrides": {"intermediate_size": 128}, "scan_layers": scan,
                   "quantize": {"format": fmt, "block_size": 32, "merge": merge}},
         "adapter": {"r": 4, "mora_type": cycle[0]} if method == "mora" else {"r": 4},
         "remora": {"every": every, "type_cycle": cycle},
         "optim": {"lr": 1e-2, "warmup_steps": 0},
         "train": {"steps": 8, "batch_size": 8, "seq_len": 16}}
    if mesh:
        c["mesh"] = mesh
    return RunConfig.from_dict(c)


def _batch(a):
    return a.steps.shard_batch({"input_ids": np.tile(np.arange(16, dtype=np.int32), (8, 1))})


def _leaf(tree, scan):
    return adapters_lib.flatten(tree)[UP_SCANNED if scan else UP]


@pytest.mark.parametrize("method,scan,cycle", [
    ("mora", False, (1, 2, 3, 4)), pytest.param("mora", True, (1, 2, 3, 4), marks=pytest.mark.slow),
    ("mora", True, (6,)),  # one type: its only kept m rides on the live adapter, no slot is left to the layer
    pytest.param("lora", False, (1, 2, 3, 4), marks=pytest.mark.slow), ("lora", True, (1, 2, 3, 4))])
def test_merges_kept_beside_a_four_bit_kernel_are_exact_and_change_no_shape(method, scan, cycle):
    config = _config(method=method, scan=scan, cycle=cycle)
    assert merges_in_run(config.train.steps, config.remora.every) == 3
    a = assembly.assemble(config)
    state = a.steps.place(a.initial_state(a.load_params()))
    shapes = [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)]
    frozen_structure = jax.tree_util.tree_structure(state.frozen)
    leaf0 = _leaf(state.frozen, scan)
    assert leaf0.residual is not None and formats.nbytes(leaf0) > formats.nbytes(leaf0.replace(residual=None))
    batch = _batch(a)
    types = (None,) * 3 if method == "lora" else (2, 3, 4) if len(cycle) > 1 else (6, 6, 6)
    for i, next_type in enumerate(types):
        for _ in range(2):
            state, _ = a.steps.train(state, batch)
        before = float(a.steps.eval(state, batch)["loss_sum"])
        kernel_before = formats.dequantize(_leaf(state.frozen, scan))
        delta = adapters_lib.flatten(state.adapters)[UP_SCANNED if scan else UP].delta_weight()
        state = a.steps.merge(state, next_type)
        leaf = _leaf(state.frozen, scan)
        # the codes are untouched, the update is held exactly, the model is unchanged by the merge
        np.testing.assert_array_equal(np.asarray(leaf.q.qvalue), np.asarray(leaf0.q.qvalue))
        np.testing.assert_allclose(np.asarray(formats.dequantize(leaf)),
                                   np.asarray(kernel_before + delta.reshape(kernel_before.shape)), atol=2e-6)
        assert float(jnp.abs(delta).max()) > 1e-4  # a real update was merged (far above the tolerance)
        np.testing.assert_allclose(float(a.steps.eval(state, batch)["loss_sum"]), before, rtol=1e-5)
    # the same arrays (a checkpoint restores into them) and the same frozen tree: MoRA's type is the only change
    assert [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(state)] == shapes
    assert jax.tree_util.tree_structure(state.frozen) == frozen_structure
    if method == "lora":
        np.testing.assert_array_equal(np.asarray(leaf.residual.count), np.full(leaf.residual.count.shape, 3))
    elif len(cycle) > 1:
        assert [kept.mora_type for kept in leaf.residual.mora] == [1, 2, 3, 4]
        assert float(jnp.abs(leaf.residual.mora[3].m).max()) == 0.0  # type 4 not merged yet (cycle 1, 2, 3 done)
    else:
        assert [kept.mora_type for kept in leaf.residual.mora] == [6]


def test_requantizing_merges_lose_what_kept_merges_hold():
    """The same run, merge by merge: re-quantizing to NF4 moves the model at each merge; keeping does not."""
    changes = {}
    for merge in ("requantize", "residual"):
        a = assembly.assemble(_config(merge=merge))
        state = a.steps.place(a.initial_state(a.load_params()))
        batch = _batch(a)
        for _ in range(2):
            state, _ = a.steps.train(state, batch)
        before = float(a.steps.eval(state, batch)["loss_sum"])
        state = a.steps.merge(state, 2)
        changes[merge] = abs(float(a.steps.eval(state, batch)["loss_sum"]) - before)
        assert (_leaf(state.frozen, False).residual is None) == (merge == "requantize")
    assert changes["residual"] < 1e-3 < changes["requantize"], changes


def test_the_default_keeps_merges_on_four_bit_formats_where_the_method_allows():
    assert QuantConfig("nf4").keeps_merges(MoRAConfig()) and QuantConfig("q4_1").keeps_merges(LoRAConfig())
    assert not QuantConfig("int8").keeps_merges(MoRAConfig())  # int8 keeps an update whole when re-quantized
    assert QuantConfig("int8", merge="residual").keeps_merges(MoRAConfig())
    assert not QuantConfig("nf4").keeps_merges(MoRAConfig(magnitude=True))
    assert not QuantConfig("nf4").keeps_merges(DoRAConfig())
    assert not QuantConfig("nf4", merge="requantize").keeps_merges(MoRAConfig())
    assert not QuantConfig("none", merge="residual").keeps_merges(MoRAConfig())
    # the warning about rounded-away merges only where they are rounded away
    assert QuantConfig("nf4").merge_warning(10, MoRAConfig()) is None
    assert "merge='residual'" in QuantConfig("nf4").merge_warning(10, DoRAConfig())
    with pytest.raises(ConfigError, match=r"model.quantize.merge='sometimes': choose one of auto, residual, requantize"):
        QuantConfig("nf4", merge="sometimes")
    with pytest.raises(ConfigError, match=r"merge='residual' keeps LoRA and MoRA \(without a magnitude\) merges, not "
                                          r"dora's: set model.quantize.merge='requantize'"):
        _config(method="dora", merge="residual")
    _config(method="dora", merge="residual", every=0)  # no merges, nothing to keep: accepted


def test_kept_merges_are_checkpointed_and_restored(tmp_path):
    a = assembly.assemble(_config(method="lora", scan=True))
    state = a.steps.place(a.initial_state(a.load_params()))
    batch = _batch(a)
    state, _ = a.steps.train(state, batch)
    state = a.steps.merge(state, None)
    with Checkpointer(tmp_path / "ckpt", enable_async_checkpointing=False) as ckpt:
        ckpt.save(2, state, frozen_changed=True, force=True)
        restored, _, _ = ckpt.restore(2, abstract_state=a.abstract_state())
    leaf, back = _leaf(state.frozen, True), _leaf(restored.frozen, True)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(leaf)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))
    assert int(back.residual.count[0]) == 1
    np.testing.assert_allclose(float(a.steps.eval(restored, batch)["loss_sum"]),
                               float(a.steps.eval(state, batch)["loss_sum"]), rtol=1e-6)


def test_kept_merges_train_sharded_on_a_2x4_mesh():
    mesh = {"data": 2, "fsdp": 4}
    a = assembly.assemble(_config(scan=True, mesh=mesh))
    plain = assembly.assemble(_config(scan=True))
    results = []
    for asm in (a, plain):
        state = asm.steps.place(asm.initial_state(asm.load_params()))
        batch = _batch(asm)
        state, _ = asm.steps.train(state, batch)
        state = asm.steps.merge(state, 2)
        state, metrics = asm.steps.train(state, batch)
        results.append((float(metrics["loss"]), _leaf(state.frozen, True)))
    (sharded_loss, leaf), (plain_loss, _) = results
    assert len(leaf.residual.mora[0].m.sharding.device_set) == 8
    assert len(leaf.q.qvalue.sharding.device_set) == 8
    np.testing.assert_allclose(sharded_loss, plain_loss, rtol=1e-4)


def test_export_dequantizes_the_kept_merges_into_the_kernel():
    a = assembly.assemble(_config())
    state = a.steps.place(a.initial_state(a.load_params()))
    state, _ = a.steps.train(state, _batch(a))
    delta = adapters_lib.flatten(state.adapters)[UP].delta_weight()
    codes = formats.dequantize_codes(_leaf(state.frozen, False))
    merged = a.steps.merge(state, 2)
    exported = adapters_lib.flatten(dequantize_params(merged.frozen))[UP]
    assert not formats.is_quantized(exported)
    np.testing.assert_allclose(np.asarray(exported), np.asarray(codes + delta), atol=2e-6)
    # re-quantizing a leaf with kept merges folds them into the codes and empties the slots (same shapes)
    leaf = _leaf(merged.frozen, False)
    again = formats.requantize_like(leaf, formats.dequantize(leaf))
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(leaf)
    assert all(float(jnp.abs(k.m).max()) == 0.0 for k in again.residual.mora)


@pytest.mark.slow  # about a minute on two cores: two small ReMoRA runs
def test_the_merge_measurement_reports_both_merges(tmp_path):
    from mora_jax import data as data_lib
    from mora_jax.experiments.provenance import provenance
    from train import quant_merge

    data_lib.write_synthetic_corpus(tmp_path / "corpus.txt", 300, seed=0)
    data_lib.write_synthetic_corpus(tmp_path / "corpus_eval.txt", 40, seed=1)
    data_lib.train_tokenizer(str(tmp_path / "corpus.txt"), str(tmp_path / "tok"), vocab_size=512)
    kept = quant_merge.measure(tmp_path, "nf4", 6, 3, 1e-3, "residual")
    rounded = quant_merge.measure(tmp_path, "nf4", 6, 3, 1e-3, "requantize")
    assert [m["step"] for m in kept["merges"]] == [3, 6] and kept["merge"] == "residual"
    for m in kept["merges"]:
        assert abs(m["retained"] - 1) < 1e-4 and m["error_over_delta"] < 1e-3 and abs(m["eval_loss_change"]) < 1e-4
    assert all(m["retained"] < 0.9 for m in rounded["merges"])
    args = type("Args", (), {"steps": 6, "every": 3, "lr": 1e-3})()
    text = quant_merge.markdown([rounded, kept], [], provenance(seeds=[0]), args)
    assert kept["median_step_s"] > 0 and "| nf4, residual | 3 | 1.000 | 0.000 |" in text
    assert f"| nf4, residual | {kept['final_eval_loss']:.4f} | " in text and "| nf4, requantize | " in text


@pytest.mark.parametrize("method", ["mora", "lora"])
def test_a_layer_with_kept_merges_has_the_float_kernels_output_and_gradients(method):
    """The live type's kept m rides on the live adapter (one operator less): values and the live
    adapter's gradients equal those on the float kernel the leaf stands for."""
    from mora_jax.intercept import apply_model
    from mora_jax.models.config import LLAMA_CONFIGS
    from mora_jax.models.llama import LlamaForCausalLM, init_params
    from mora_jax.quant import residual
    from mora_jax.quant.transform import quantize

    config = LLAMA_CONFIGS["tiny"].replace(intermediate_size=128)
    params = quantize(init_params(config, jax.random.key(0)), QuantConfig("nf4", block_size=32))
    adapter_config = MoRAConfig(r=4, mora_type=2) if method == "mora" else LoRAConfig(r=4)
    adapters = adapters_lib.init_adapters(params, adapter_config, jax.random.key(1))
    params = residual.add_slots(params, adapters, type_cycle=(1, 2, 3, 4), merges=2)
    keys = iter(jax.random.split(jax.random.key(2), 1000))
    noise = lambda x: 0.05 * jax.random.normal(next(keys), x.shape, x.dtype)  # noqa: E731
    filled = jax.tree_util.tree_map(lambda x: noise(x) if x.dtype == jnp.float32 and x.ndim >= 2 else x, params)
    params = jax.tree_util.tree_map(lambda old, new: new, params, filled)  # random kept merges in every slot
    adapters = jax.tree_util.tree_map(noise, adapters)
    model, ids = LlamaForCausalLM(config), jnp.arange(12, dtype=jnp.int32)[None] % config.vocab_size

    def loss(a, p):
        return jnp.mean(apply_model(model, p, ids, adapters=a) ** 2)

    reference = dequantize_params(params)
    value, grads = jax.value_and_grad(loss)(adapters, params)
    ref_value, ref_grads = jax.value_and_grad(loss)(adapters, reference)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-4, atol=1e-6)
    leaf = adapters_lib.flatten(params)[UP]
    kept_delta = leaf.residual.delta_weight()
    assert float(jnp.abs(kept_delta).max()) > 1e-3  # the kept merges are not zero: the check has teeth

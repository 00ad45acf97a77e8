"""QMoRA: the quantized frozen base (mora_jax.quant) — formats, bounds, gradients, training, bytes."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_gguf  # tests/ helper: tiny GGUF files written with gguf's own writer
from jax._src.ad_checkpoint import saved_residuals  # the list jax.ad_checkpoint.print_saved_residuals prints
from jax.sharding import PartitionSpec

from mora_jax import assembly, sharding
from mora_jax.adapters import init_adapters
from mora_jax.checkpoint.checkpointer import Checkpointer
from mora_jax.errors import ConfigError
from mora_jax.gguf.weights import load_gguf
from mora_jax.intercept import apply_model
from mora_jax.mesh import MeshConfig, make_mesh
from mora_jax.methods import DoRAConfig, HiRAConfig, LoRAConfig, MoRAConfig
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, abstract_params, init_params
from mora_jax.quant import formats
from mora_jax.quant.config import QuantConfig
from mora_jax.quant.formats import QuantizedKernel, dequantize, quantize_kernel
from mora_jax.quant.gguf_blocks import kernel_from_blocks
from mora_jax.quant.transform import dequantize_params, frozen_bytes, has_quantized, quantize, quantized_paths
from mora_jax.run_config import RunConfig

# The tiny preset with an MLP width the block sizes divide (its 172 does not).
CONFIG = LLAMA_CONFIGS["tiny"].replace(intermediate_size=128)
NF4_HALF_GAP = float(np.max(np.diff(np.asarray(formats.get_nf4_buckets()))) / 2)


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


def _w(shape=(128, 48), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.05


def _per_block(x, block):
    """``(k, d)`` -> ``(k/block, block, d)``."""
    return x.reshape(x.shape[0] // block, block, x.shape[1])


# ---- Formats: quantize -> dequantize within each format's bound ---------------------------------
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_int8_error_at_most_half_a_scale_per_element(scale_dtype):
    w = _w()
    leaf = quantize_kernel(w, "int8", scale_dtype=scale_dtype)
    assert leaf.q.qvalue.dtype == jnp.int8 and leaf.q.scale.shape == (1, 48)
    scale = leaf.q.scale.astype(jnp.float32)
    err = jnp.abs(dequantize(leaf) - w)
    assert bool(jnp.all(err <= scale / 2 * (1 + 1e-6)))
    assert float(jnp.max(err)) > 0  # it did quantize


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block", [16, 64])
def test_int4_and_nf4_error_within_their_bound_per_block(block, scale_dtype):
    w = _w()
    for fmt, bound in (("int4", 0.5), ("nf4", NF4_HALF_GAP)):
        leaf = quantize_kernel(w, fmt, block_size=block, scale_dtype=scale_dtype)
        assert leaf.q.scale.shape == (128 // block, 48) and leaf.block_size == block
        scale = leaf.q.scale.astype(jnp.float32)[:, None, :]
        err = _per_block(jnp.abs(dequantize(leaf) - w), block)
        # int4: half a step (scale = absmax/7); nf4: half the widest gap between NF4 levels times the
        # block's absmax (plus the bfloat16 rounding of the scale where the value is clipped at ±1).
        slack = 1 + (2 ** -7 if scale_dtype == "bfloat16" else 1e-6)
        assert bool(jnp.all(err <= bound * scale * slack)), fmt


def test_nf4_codes_are_the_nearest_level():
    w = _w((64, 8))
    leaf = quantize_kernel(w, "nf4", block_size=64)
    levels = jnp.asarray(formats.get_nf4_buckets())
    x = w / leaf.q.scale[0]
    nearest = jnp.argmin(jnp.abs(x[..., None] - levels), axis=-1)
    assert np.array_equal(np.asarray(leaf.q.qvalue).astype(int), np.asarray(nearest))


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_kept_as_loaded_dequantize_as_gguf_does(type_name):
    rng = np.random.default_rng(0)
    w_hf = rng.standard_normal((48, 128)).astype(np.float32)  # (out, in), as GGUF stores rows
    kind = gguf.GGMLQuantizationType[type_name]
    raw = gguf.quants.quantize(w_hf, kind)
    leaf = kernel_from_blocks(raw, type_name)
    assert leaf.shape == (128, 48) and leaf.format == type_name.lower() and leaf.q.scale.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(dequantize(leaf)), gguf.quants.dequantize(raw, kind).T)
    # ggml's rounding in jnp (a merge re-quantizes with it) gives the file's own bits
    again = quantize_kernel(jnp.asarray(w_hf.T), type_name.lower())
    np.testing.assert_array_equal(np.asarray(again.q.qvalue).astype(int), np.asarray(leaf.q.qvalue).astype(int))
    np.testing.assert_array_equal(np.asarray(again.q.scale), np.asarray(leaf.q.scale))


# ---- The transform ---------------------------------------------------------------------------------
def test_quantize_takes_the_seven_projections_only(params):
    qp = quantize(params, QuantConfig("int8"))
    paths = quantized_paths(qp)
    assert len(paths) == 7 * CONFIG.num_hidden_layers
    assert all(p.split("/")[-2] in {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
               for p in paths)
    assert not isinstance(qp["model"]["embed_tokens"]["embedding"], QuantizedKernel)
    assert quantize(params, QuantConfig()) is params  # format none


def test_quantize_traces_abstractly_for_the_planner():
    abstract = abstract_params(CONFIG.replace(scan_layers=True))
    out = jax.eval_shape(lambda p: quantize(p, QuantConfig("nf4", block_size=32)), abstract)
    leaf = out["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(leaf, QuantizedKernel) and leaf.format == "nf4"
    L = CONFIG.num_hidden_layers
    assert leaf.q.qvalue.shape == (L, 128, 64) and leaf.q.qvalue.dtype == jnp.uint4
    assert leaf.q.scale.shape == (L, 4, 64)
    for fmt in ("int8", "int4"):
        assert jax.eval_shape(lambda p, f=fmt: quantize(p, QuantConfig(f, block_size=32)), abstract)


def test_quant_config_and_transform_errors(params):
    for bad, word in ((dict(format="int3"), "format"), (dict(block_size=0), "block_size"),
                      (dict(scale_dtype="float16"), "scale_dtype"), (dict(targets="(("), "targets")):
        with pytest.raises(ConfigError, match=f"model.quantize.{word}"):
            QuantConfig(**bad)
    with pytest.raises(ConfigError, match="not a multiple of the block size 48"):
        quantize(params, QuantConfig("int4", block_size=48))
    with pytest.raises(ConfigError, match="matches no parameter"):
        quantize(params, QuantConfig("int8", targets=r".*/nothing/kernel"))
    with pytest.raises(ConfigError, match="no field"):
        QuantConfig.from_value({"fromat": "int8"})


def test_four_bit_base_is_at_most_035_of_float32_frozen_bytes():
    """Deterministic byte counts (codes at their bit width, scales included) of the 250M preset's
    frozen weights, abstract (nothing allocated): the seven projections in 4 bits, the embeddings,
    LM head and norms float32 as before."""
    abstract = abstract_params(LLAMA_CONFIGS["mora-250m"])
    f32 = frozen_bytes(abstract)
    for fmt in ("int4", "nf4"):
        for scale_dtype in ("float32", "bfloat16"):
            q = jax.eval_shape(lambda p: quantize(p, QuantConfig(fmt, scale_dtype=scale_dtype)), abstract)
            assert frozen_bytes(q) <= 0.35 * f32, (fmt, scale_dtype, frozen_bytes(q) / f32)
    leaf = jax.eval_shape(lambda w: quantize_kernel(w, "nf4", block_size=64, scale_dtype="bfloat16"),
                          jax.ShapeDtypeStruct((768, 2560), jnp.float32))
    assert formats.nbytes(leaf) == 768 * 2560 // 2 + (768 // 64) * 2560 * 2
    int8 = jax.eval_shape(lambda w: quantize_kernel(w, "int8"), jax.ShapeDtypeStruct((768, 2560), jnp.float32))
    assert formats.nbytes(int8) == 768 * 2560 + 2560 * 4


# ---- Adapters on a quantized base ------------------------------------------------------------------
def _loss(model, ids):
    def loss(adapters, params):
        return jnp.mean(apply_model(model, params, ids, adapters=adapters) ** 2)
    return loss


@pytest.mark.parametrize("adapter_config", [LoRAConfig(r=4), MoRAConfig(r=4, mora_type=6),
                                            MoRAConfig(r=4, mora_type=1), DoRAConfig(r=4), HiRAConfig(r=4)],
                         ids=["lora", "mora6", "mora1", "dora", "hira"])
def test_adapter_gradients_on_quantized_base_equal_those_on_the_dequantized_base(params, adapter_config):
    model = LlamaForCausalLM(CONFIG)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, CONFIG.vocab_size)
    qparams = quantize(params, QuantConfig("nf4", block_size=32))
    dparams = dequantize_params(qparams)
    adapters = init_adapters(dparams, adapter_config, jax.random.key(2))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.02, adapters)  # non-zero: every term in play
    grad = jax.jit(jax.value_and_grad(_loss(model, ids)))
    (loss_q, grads_q), (loss_d, grads_d) = grad(adapters, qparams), grad(adapters, dparams)
    np.testing.assert_allclose(float(loss_q), float(loss_d), rtol=1e-6)
    for g_q, g_d in zip(jax.tree_util.tree_leaves(grads_q), jax.tree_util.tree_leaves(grads_d)):
        assert g_q.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(g_q), np.asarray(g_d), rtol=1e-5, atol=1e-8)
    # and the quantized base is not the float one it came from (the comparison means something)
    assert float(jnp.abs(dparams["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
                         - params["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]).max()) > 0


def test_no_dequantized_kernel_is_saved_for_the_backward_pass(params):
    model = LlamaForCausalLM(CONFIG)
    ids = jnp.zeros((1, 8), jnp.int32)
    qparams = quantize(params, QuantConfig("int8"))
    adapters = init_adapters(dequantize_params(qparams), LoRAConfig(r=4), jax.random.key(2))
    kernel_shapes = {leaf.shape for leaf in jax.tree_util.tree_leaves(qparams, is_leaf=formats.is_quantized)
                     if formats.is_quantized(leaf)}
    saved = saved_residuals(lambda a: _loss(model, ids)(a, qparams), adapters)
    floats = [aval for aval, _ in saved if jnp.issubdtype(aval.dtype, jnp.floating)]
    assert not [a for a in floats if tuple(a.shape) in kernel_shapes]
    # the float base does save its kernels (what the test would catch)
    saved_f = saved_residuals(lambda a: _loss(model, ids)(a, dequantize_params(qparams)), adapters)
    assert any(tuple(aval.shape) in kernel_shapes for aval, _ in saved_f)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_0", "Q8_0"])
def test_gguf_reader_hands_over_the_projections_blocks_unchanged(tmp_path, qtype):
    path = tmp_path / "model.gguf"
    tiny_gguf.write(path, tiny_gguf.Spec(qtype=qtype, tied=False, layers=1))
    _, float_params = load_gguf(path)
    _, kept = load_gguf(path, keep_quantized=True)
    paths = quantized_paths(kept)
    assert len(paths) == 7 and all(p.endswith("_proj/kernel") for p in paths)
    leaf = kept["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert leaf.format == qtype.lower() and leaf.q.scale.dtype == jnp.float16
    assert not formats.is_quantized(kept["lm_head"]["kernel"])  # not a target: dequantized as before
    # the kept blocks stand for exactly the dequantized weights (q/k rows back in Hugging Face order)
    for (p, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(dequantize_params(kept))[0],
                              jax.tree_util.tree_flatten_with_path(float_params)[0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(p))
    assert quantize(kept, QuantConfig("gguf")) is not None  # format gguf keeps them
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(kept, QuantConfig("int8"))


# ---- A run on a quantized base (the assembly train.finetune / train.pretrain use) -----------------
def _run_config(fmt, method="mora", every=0):
    return RunConfig.from_dict({
        "method": method, "workdir": "/unused",
        "model": {"preset": "tiny", "overrides": {"intermediate_size": 128},
                  "quantize": {"format": fmt, "block_size": 32}},
        "adapter": {"r": 4, "mora_type": 6} if method == "mora" else {"r": 4},
        "remora": {"every": every, "type_cycle": (6,)},
        "optim": {"lr": 1e-2, "warmup_steps": 0},
        "train": {"steps": 8, "batch_size": 8, "seq_len": 16}})


@pytest.mark.parametrize("fmt", ["int8", "nf4"])
def test_training_steps_on_a_quantized_base_through_the_assembly(fmt):
    config = _run_config(fmt, every=4)
    a = assembly.assemble(config)
    params = a.load_params()
    assert len(quantized_paths(params)) == 14
    state = a.steps.place(a.initial_state(params))
    assert has_quantized(state.frozen)
    assert not has_quantized(state.trainables) and not has_quantized(state.opt_state)  # no grads, no moments
    for x in jax.tree_util.tree_leaves(state.trainables) + [
            x for x in jax.tree_util.tree_leaves(state.opt_state) if jnp.ndim(x) > 0]:
        assert x.dtype == jnp.float32
    batch = a.steps.shard_batch({"input_ids": np.tile(np.arange(16, dtype=np.int32), (8, 1))})
    losses = []
    for _ in range(4):
        state, metrics = a.steps.train(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.05, losses
    before = float(a.steps.eval(state, batch)["loss_sum"])
    merged = a.steps.merge(state, 6)  # ReMoRA: merged into the base, re-quantized in its format
    kernel = merged.frozen["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert formats.is_quantized(kernel) and kernel.format == fmt
    after = float(a.steps.eval(merged, batch)["loss_sum"])
    assert abs(after - before) < 0.05 * abs(before)  # the merge keeps the model, up to re-quantization
    assert a.abstract_state().frozen["model"]["layers_0"]["mlp"]["up_proj"]["kernel"].format == fmt  # planning


def test_full_fine_tuning_of_a_quantized_kernel_is_one_clear_error():
    a = assembly.assemble(_run_config("int8", method="full"))
    with pytest.raises(ConfigError, match=r"model/layers_0/mlp/down_proj/kernel \(and 13 more\) is a quantized "
                                          r"frozen kernel and cannot be trained in full"):
        a.initial_state(a.load_params())


def test_a_merged_quantized_base_is_checkpointed_and_restored_bit_for_bit(tmp_path):
    """TensorStore has no 4-bit dtypes: codes are written widened and come back narrowed, equal."""
    a = assembly.assemble(_run_config("nf4", every=4))
    state = a.initial_state(a.load_params())
    with Checkpointer(tmp_path / "ckpt", enable_async_checkpointing=False) as ckpt:
        ckpt.save(4, state, frozen_changed=True, force=True)
        restored, _, _ = ckpt.restore(4, abstract_state=jax.eval_shape(lambda: state))
    leaf = restored.frozen["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert formats.is_quantized(leaf) and leaf.q.qvalue.dtype == jnp.uint4
    for x, y in zip(jax.tree_util.tree_leaves(restored.frozen), jax.tree_util.tree_leaves(state.frozen)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32)))


def test_quantized_codes_and_scales_follow_the_kernels_sharding_rule():
    mesh = make_mesh(MeshConfig(axis_sizes=(1, 2, 4)))  # data × fsdp × tensor over the tests' 8 CPU devices
    abstract = abstract_params(CONFIG.replace(scan_layers=True))
    quantized = jax.eval_shape(lambda p: quantize(p, QuantConfig("int4", block_size=32)), abstract)
    float_specs = sharding.tree_specs(abstract, mesh)
    specs = sharding.tree_specs(quantized, mesh)
    for module, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
        kernel_spec = float_specs["model"]["layers"][module][name]["kernel"]
        leaf = specs["model"]["layers"][module][name]["kernel"]
        assert leaf.q.qvalue == kernel_spec and leaf.q.qvalue != PartitionSpec(None, None, None)
        assert leaf.q.scale[-1] == kernel_spec[-1]  # the output features: sharded like the kernel's
    # and the compiled steps take them: the state places on the mesh
    config = QuantConfig("int4", block_size=32)
    unrolled = jax.eval_shape(lambda p: quantize(p, config), abstract_params(CONFIG))
    placed = sharding.place(quantize(init_params(CONFIG, jax.random.key(0)), config),
                            sharding.tree_shardings(unrolled, mesh))
    leaf = placed["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert len(leaf.q.qvalue.sharding.device_set) == 8

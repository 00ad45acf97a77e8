"""QMoRA on nnx (mora_jax.nnx.quant): a quantized frozen base under nnx adapters, against the float model
built from the same dequantized kernels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mora_jax as mj
import mora_jax.nnx as mnx
from mora_jax.methods import DoRAConfig, HiRAConfig, PiSSAConfig
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import init_params
from mora_jax.nnx import llama as nnx_llama
from mora_jax.quant import formats
from mora_jax.quant.config import QuantConfig
from mora_jax.quant.transform import quantize as quantize_params
from test_nnx import _ScannedModel  # blocks stacked by nnx.vmap, run by nnx.scan

CFG = LLAMA_CONFIGS["tiny"].replace(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
FORMATS = [QuantConfig("int8"), QuantConfig("nf4", block_size=16), QuantConfig("int4", block_size=16),
           QuantConfig("q4_1", targets=r".*/(q|k|v|o|gate|up)_proj/kernel")]  # GGUF's blocks of 32: not down_proj's 48


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _dequantized(params, config):
    """The linen params with every target kernel replaced by its quantize -> dequantize round trip."""
    return jax.tree_util.tree_map(lambda x: formats.dequantize(x, jnp.dtype(x.dtype)) if formats.is_quantized(x)
                                  else x, quantize_params(params, config), is_leaf=formats.is_quantized)


def _loss(model):
    logits = model(IDS)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], IDS[:, 1:]).mean()


def _set_adapters(model, seed=5):
    """Random adapter values (zero M or b would hide the adapters' effect), the same for two models built alike."""
    for i, (_, variable) in enumerate(sorted(nnx.iter_graph(model), key=lambda pv: str(pv[0]))):
        if isinstance(variable, nnx.LoRAParam):
            variable[...] = 0.05 * jax.random.normal(jax.random.key(seed + i), variable.shape)


@pytest.mark.parametrize("config", FORMATS, ids=lambda c: c.format)
def test_a_quantized_base_computes_the_dequantized_model(params, config):
    model = mnx.quantize(nnx_llama.from_linen(CFG, params), config)
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, mnx.QuantizedLinear) and formats.is_quantized(layer.kernel.get_value())
    assert layer.kernel.get_value().format == config.format
    assert not formats.is_quantized(model.model.embed_tokens.embedding.get_value())  # only the projections
    reference = nnx_llama.from_linen(CFG, _dequantized(params, config))
    np.testing.assert_allclose(nnx.jit(lambda m: m(IDS))(model), nnx.jit(lambda m: m(IDS))(reference), rtol=0,
                               atol=2e-5)


@pytest.mark.parametrize("config, adapter", [(FORMATS[1], mj.MoRAConfig(r=2, mora_type=6)),
                                             (FORMATS[0], DoRAConfig(r=2))], ids=["nf4-mora6", "int8-dora"])
def test_adapters_on_a_quantized_base_get_the_dequantized_base_gradients(params, config, adapter):
    quantized = mnx.attach(mnx.quantize(nnx_llama.from_linen(CFG, params), config), adapter)
    floating = mnx.attach(nnx_llama.from_linen(CFG, _dequantized(params, config)), adapter)
    _set_adapters(quantized)
    _set_adapters(floating)
    grad_of = nnx.jit(nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))
    got, want = grad_of(quantized), grad_of(floating)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert all(jnp.issubdtype(x.dtype, jnp.floating) for x in jax.tree_util.tree_leaves(got))


def test_a_jitted_training_step_leaves_the_codes_alone_and_merges_requantize(params):
    config = QuantConfig("nf4", block_size=16)
    model = mnx.attach(mnx.quantize(nnx_llama.from_linen(CFG, params), config), mj.MoRAConfig(r=2, mora_type=1))
    layer = model.model.layers[1].self_attn.o_proj
    codes_before = np.asarray(layer.kernel.get_value().q.qvalue)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(np.asarray(layer.kernel.get_value().q.qvalue), codes_before)
    assert np.any(layer.kernel_mora_m[...])
    trained = nnx.jit(lambda m: m(IDS))(model)

    # a merge folds M into the dequantized kernel and stores the result in the same format
    expected_leaf = formats.requantize_like(
        layer.kernel.get_value(),
        mj.MoRAAdapter(m=layer.kernel_mora_m[...], in_features=32, out_features=32, mora_type=1, r=2).add_to(
            formats.dequantize(layer.kernel.get_value())))
    mnx.merge_adapters(model)
    merged = layer.kernel.get_value()
    assert formats.is_quantized(merged) and merged.format == "nf4"
    np.testing.assert_array_equal(np.asarray(merged.q.qvalue), np.asarray(expected_leaf.q.qvalue))
    # the merged model is the trained one up to the re-quantization of each merged kernel
    gap = float(jnp.abs(nnx.jit(lambda m: m(IDS))(model) - trained).max())
    assert gap < 0.5 * float(jnp.abs(trained).max())
    mnx.unmerge(model)
    # ReMoRA restart on the quantized base: merged (re-quantized), M = 0, training goes on
    mnx.merge_and_reset(model, optimizer)
    assert not np.any(layer.kernel_mora_m[...]) and formats.is_quantized(layer.kernel.get_value())
    assert np.isfinite(float(step(model, optimizer)))


def test_dequantize_gives_the_float_model_back(params):
    config = QuantConfig("int8")
    model = mnx.attach(mnx.quantize(nnx_llama.from_linen(CFG, params), config), HiRAConfig(r=2))
    _set_adapters(model)
    before = nnx.jit(lambda m: m(IDS))(model)
    mnx.dequantize(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer) is mnx.AdaptedLinear and not formats.is_quantized(layer.kernel.get_value())
    assert layer.kernel.get_value().dtype == params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype
    np.testing.assert_allclose(nnx.jit(lambda m: m(IDS))(model), before, rtol=0, atol=1e-5)
    plain = mnx.merge_and_unload(model)
    assert type(plain.model.layers[0].self_attn.q_proj) is nnx.Linear


def test_bad_requests_get_one_line_and_change_nothing(params):
    model = nnx_llama.from_linen(CFG, params)
    with pytest.raises(ValueError, match="matches no nnx.Linear kernel"):
        mnx.quantize(model, QuantConfig("int8", targets=r".*/nothing/kernel"))
    with pytest.raises(ValueError, match="blocks of 64 do not divide"):
        mnx.quantize(model, QuantConfig("nf4", block_size=64))
    with pytest.raises(ValueError, match="q4_0's blocks are GGUF's 32: use int8, int4 or nf4"):
        mnx.quantize(model, QuantConfig("q4_0"))
    with pytest.raises(ValueError, match="keeps a GGUF file's blocks"):
        mnx.quantize(model, QuantConfig("gguf"))
    assert not any(isinstance(m, mnx.QuantizedLinear) for _, m in nnx.iter_graph(model))
    adapted = mnx.attach(nnx_llama.from_linen(CFG, params), mj.LoRAConfig(r=2))
    with pytest.raises(ValueError, match="quantize the base first, then attach"):
        mnx.quantize(adapted, QuantConfig("int8"))
    quantized = mnx.quantize(nnx_llama.from_linen(CFG, params), QuantConfig("int8"))
    with pytest.raises(ValueError, match="PiSSA writes the SVD residual"):
        mnx.attach(quantized, PiSSAConfig(r=2))
    with pytest.raises(ValueError, match="full fine-tuning of a quantized kernel is not possible"):
        mnx.attach(quantized, mj.FullConfig(targets=(r".*/q_proj/kernel",)))
    assert not mnx.adapted_layers(quantized)


def test_layers_stacked_by_vmap_are_quantized_per_layer_and_run_under_scan():
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    model = _ScannedModel(nnx.Rngs(0))  # up 16 -> 24, down 24 -> 16 and an Einsum, stacked 3 times
    kernels = {name: getattr(model.layers, name).kernel[...] for name in ("up", "down")}
    mnx.quantize(model, QuantConfig("int4", block_size=8, targets=r"layers/(up|down)/kernel"))
    leaf = model.layers.up.kernel.get_value()
    assert leaf.shape == (3, 16, 24) and leaf.q.scale.shape == (3, 2, 24)  # per layer, blocks of 8 inputs
    reference = _ScannedModel(nnx.Rngs(0))
    for name, kernel in kernels.items():  # each layer's slice quantized on its own = the stacked quantization
        getattr(reference.layers, name).kernel[...] = jnp.stack(
            [formats.dequantize(formats.quantize_kernel(kernel[i], "int4", block_size=8)) for i in range(3)])
    np.testing.assert_allclose(nnx.jit(lambda m: m(x))(model), nnx.jit(lambda m: m(x))(reference), rtol=0, atol=1e-5)
    mnx.attach(model, mj.MoRAConfig(r=2, mora_type=6, targets=(r"layers/(up|down)/kernel",)))
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    assert grads["layers"]["up"]["kernel_mora_m"][...].shape[0] == 3

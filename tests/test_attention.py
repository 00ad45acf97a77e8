"""Attention implementations (mora_jax.models.attention): the einsum path is HF's eager attention,
bit for bit; the Pallas TPU kernel, interpreted on CPU, equals it forward and backward with packed
segments, grouped-query heads and sliding windows, alone and sharded over a mesh; a platform that
cannot run the implementation asked for is a clear error; and (with libtpu) a 4096-token train step
compiles for a TPU v5e 2x2 slice with the kernel and needs far less temporary memory per chip."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mora_jax.models import LLAMA_CONFIGS, LlamaConfig, LlamaForCausalLM, init_params
from mora_jax.models import attention as A
from mora_jax.models.llama import make_attention_mask
from mora_jax.run_config import ModelConfig

TINY = LLAMA_CONFIGS["tiny"]  # 4 query heads, 2 key/value heads, head size 16


def _qkv(B=2, T=100, N=4, K=2, H=16, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, T, n, H)), dtype) for n in (N, K, K))


def _segments(B=2, T=100):
    """Row 0: two packed sequences; row 1: one sequence then padding (id 0)."""
    seg = np.ones((B, T), np.int32)
    seg[0, 37:] = 2
    seg[1, 70:] = 0
    return jnp.asarray(seg)


def _hf_eager(q, k, v, mask):
    """The model's attention before the attention module existed (HF eager numerics), verbatim."""
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    q_BxTxKxGxH = q.reshape(B, T, K, G, H)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k) * (H**-0.5)
    scores = jnp.where(mask, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, H)


def _value_and_grads(fn, seg):
    """Jitted loss over real (non-padding) query positions, and its gradients wrt q, k, v."""
    keep = (seg != 0)[:, :, None, None]

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(jnp.where(keep, out * jnp.cos(out), 0.0)), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xla_path_is_hf_eager_attention_bit_for_bit(dtype):
    q, k, v = _qkv(T=24, dtype=dtype)
    seg = _segments(T=24)
    mask = make_attention_mask(24, None, seg)
    got = _value_and_grads(lambda q, k, v: A.dot_product_attention(q, k, v, mask, implementation="xla"), seg)(q, k, v)
    want = _value_and_grads(lambda q, k, v: _hf_eager(q, k, v, mask), seg)(q, k, v)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    # the same constraints given as arguments instead of a dense mask: the same numbers
    by_args = _value_and_grads(lambda q, k, v: A.dot_product_attention(q, k, v, segment_ids=seg), seg)(q, k, v)
    np.testing.assert_array_equal(np.asarray(by_args[0][1], np.float32), np.asarray(got[0][1], np.float32))


@pytest.mark.parametrize("sliding_window", [None, 20])
def test_pallas_kernel_interpreted_equals_einsum_forward_and_gradients(sliding_window):
    # T=100 is padded to the kernel's 128-token tiles inside; 4 query heads share 2 key/value heads.
    q, k, v = _qkv(T=100)
    seg = _segments(T=100)

    def run(implementation):
        fn = lambda q, k, v: A.dot_product_attention(  # noqa: E731
            q, k, v, segment_ids=seg, sliding_window=sliding_window, implementation=implementation, interpret=True)
        return _value_and_grads(fn, seg)(q, k, v)

    (loss_x, out_x), grads_x = run("xla")
    (loss_f, out_f), grads_f = run("flash")
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(out_f)[real], np.asarray(out_x)[real], atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(float(loss_f), float(loss_x), rtol=1e-5)
    for name, gf, gx in zip("qkv", grads_f, grads_x):
        np.testing.assert_allclose(np.asarray(gf), np.asarray(gx), atol=2e-5, rtol=1e-4, err_msg=f"d{name}")
    assert np.abs(np.asarray(grads_x[1])).max() > 0.1  # the gradients are not trivially zero


def test_model_with_the_pallas_kernel_equals_the_einsum_model():
    """The whole model: packed rows and padding, the kernel (interpreted) vs the einsum."""
    config = TINY.replace(attention="xla")
    params = init_params(config, jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 48)), jnp.int32)
    seg = _segments(T=48)
    want = jax.jit(LlamaForCausalLM(config).apply)({"params": params}, ids, segment_ids=seg)
    with A.interpret_kernels():
        flash = jax.jit(LlamaForCausalLM(config.replace(attention="flash")).apply)
        got = flash({"params": params}, ids, segment_ids=seg)
        # "auto" takes the kernel wherever kernels run (here: interpreted)
        auto = jax.jit(LlamaForCausalLM(config.replace(attention="auto")).apply)({"params": params}, ids, segment_ids=seg)
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(got))


def test_pallas_kernel_sharded_over_a_mesh_equals_einsum():
    """Under a mesh the kernel runs per device (shard_map over the batch and head axes)."""
    from mora_jax import mesh as mesh_lib
    from mora_jax import sharding as shd

    q, k, v = _qkv(B=4, T=40, N=4, K=2)
    seg = jnp.concatenate([_segments(T=40)] * 2)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(("data", "fsdp", "tensor"), (2, 2, 2)))
    with shd.use_mesh(mesh):
        fn = jax.jit(lambda q, k, v: A.dot_product_attention(q, k, v, segment_ids=seg, implementation="flash",
                                                             interpret=True))
        got = fn(q, k, v)
        text = fn.lower(q, k, v).as_text()
    want = A.dot_product_attention(q, k, v, segment_ids=seg, implementation="xla")
    real = np.asarray(seg != 0)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-6, rtol=1e-5)
    assert "shard_map" in text or "manual" in text.lower()


def test_segment_mask_is_the_dense_mask_for_real_tokens():
    attention_mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
    for segment_ids in (None, jnp.asarray([[0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 2, 0]])):
        dense = make_attention_mask(6, attention_mask, segment_ids, sliding_window=3)[:, 0, 0]
        sm = A.SegmentMask.from_inputs((2, 6), attention_mask, segment_ids, sliding_window=3)
        rebuilt = A.dense_mask(6, 6, segment_ids=sm.segment_ids, sliding_window=sm.sliding_window)[:, 0, 0]
        real = np.asarray(sm.segment_ids != 0)
        np.testing.assert_array_equal(np.asarray(rebuilt)[real], np.asarray(dense)[real])


def test_auto_by_platform_and_errors_for_a_platform_that_cannot_run_the_kernel():
    assert A.resolve("auto", "tpu") == "flash"
    assert A.resolve("auto", "gpu") == "cudnn"
    assert A.resolve("auto", "cpu") == "xla"
    assert A.resolve("xla", "tpu") == "xla"
    assert A.resolve("auto", platform="cpu") == "xla" and A.current_platform() == "cpu"
    with pytest.raises(ValueError, match=r"attention='flash' needs a TPU.*'cpu'.*'auto'"):
        A.resolve("flash", "cpu")
    with pytest.raises(ValueError, match=r"attention='cudnn' needs an NVIDIA GPU.*'tpu'"):
        A.resolve("cudnn", "tpu")
    with pytest.raises(ValueError, match=r"LlamaConfig.attention='fast'.*one of \('auto', 'xla', 'flash', 'cudnn'\)"):
        TINY.replace(attention="fast")
    with pytest.raises(ValueError, match=r"model.attention='splash'"):
        ModelConfig(attention="splash")
    # The model asked for the TPU kernel on a CPU says so when it is traced.
    model = LlamaForCausalLM(TINY.replace(attention="flash"))
    params = init_params(TINY, jax.random.key(0))
    with pytest.raises(ValueError, match="needs a TPU"):
        model.apply({"params": params}, jnp.zeros((1, 8), jnp.int32))
    q, k, v = _qkv(T=8)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        A.dot_product_attention(q, k, v, implementation="cudnn")


def test_kernel_obstacles_fall_back_under_auto_and_are_errors_when_asked_for():
    q, k, v = _qkv(T=16)
    dropout = lambda p: p * 1.0  # noqa: E731  (any dropout function: the kernel has none)
    with A.interpret_kernels():
        out = A.dot_product_attention(q, k, v, implementation="auto", dropout=dropout)
        with pytest.raises(ValueError, match="attention='flash' cannot run this call: it has no attention dropout"):
            A.dot_product_attention(q, k, v, implementation="flash", dropout=dropout)
        with pytest.raises(ValueError, match="not a dense mask"):
            A.dot_product_attention(q, k, v, make_attention_mask(16), implementation="flash")
    np.testing.assert_array_equal(np.asarray(out), np.asarray(A.dot_product_attention(q, k, v)))
    with pytest.raises(ValueError, match="not a multiple of 3 key/value heads"):
        A.dot_product_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
    with pytest.raises(ValueError, match="sliding_window must be a positive"):
        A.dot_product_attention(q, k, v, sliding_window=0)


# ---- a 4096-token train step compiled for a TPU slice ------------------------------------------------
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
# A 2-layer model whose attention dominates at T=4096: head size 128 (the TPU lane width), GQA 8/2.
T4096 = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                    dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)


def compile_tpu_train_step(config: LlamaConfig, *, topology="v5e:2x2", batch=4, length=4096, mesh_shape=(1, 4, 1)):
    """Compile the run's LoRA train step for ``topology`` ahead of time (no TPU needed, libtpu is):
    returns the compiled executable and its HLO text."""
    from jax.experimental import topologies

    from mora_jax import adapters, optim, steps, training
    from mora_jax import mesh as mesh_lib
    from mora_jax.methods import LoRAConfig

    # No TPU is touched: let this compile load libtpu beside another process doing the same.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(("data", "fsdp", "tensor"), mesh_shape), devices=devices)
    model = LlamaForCausalLM(config)
    tx = optim.adamw(1e-4)
    adapter_config = LoRAConfig(r=8)

    def init_state(key):
        params = model.init(key, jnp.zeros((1, 8), jnp.int32))["params"]
        layout = adapters.dense_layout(model, jnp.zeros((1, 8), jnp.int32)) if config.scan_layers else None
        ad = adapters.init_adapters(params, adapter_config, jax.random.fold_in(key, 1), layout=layout)
        return training.create_train_state(params, ad, adapter_config, tx, jax.random.fold_in(key, 2))

    built = steps.build_steps(model, tx, lambda step: 1e-4, training.StepConfig(), mesh=mesh)
    abstract = jax.eval_shape(init_state, jax.random.key(0))
    shardings = built.state_shardings(abstract)
    state = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    batch_sds = {name: jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=built.batch_sharding)
                 for name in ("input_ids", "loss_mask", "segment_ids", "positions")}
    lowered = built.lower_train(state, batch_sds)
    return lowered.compile(), lowered.as_text()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (the tpu extra) to compile for a TPU topology")
def test_t4096_train_step_compiles_for_tpu_with_the_pallas_kernel_in_less_memory():
    results = {}
    for attention in ("flash", "xla"):
        compiled, text = compile_tpu_train_step(dataclasses.replace(T4096, attention=attention))
        results[attention] = (compiled.memory_analysis(), text)
    flash_mem, flash_hlo = results["flash"]
    xla_mem, xla_hlo = results["xla"]
    assert "tpu_custom_call" in flash_hlo and "tpu_custom_call" not in xla_hlo  # the Mosaic kernel is in the step
    assert flash_mem.temp_size_in_bytes > 0
    # the einsum keeps (T, T) scores per head; the kernel keeps O(T) statistics
    assert xla_mem.temp_size_in_bytes > 4 * flash_mem.temp_size_in_bytes


def test_cudnn_call_gets_the_same_masks(monkeypatch):
    """No GPU here: the cuDNN branch's call of jax.nn.dot_product_attention (its masks, windows and
    head layout) is checked by running that call with JAX's XLA implementation instead."""
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: real(*a, **{**kw, "implementation": "xla"}))
    q, k, v = _qkv(T=24, dtype=jnp.bfloat16)
    seg = _segments(T=24)
    real_rows = np.asarray(seg != 0)
    cases = [dict(segment_ids=seg), dict(segment_ids=seg, sliding_window=5), dict(sliding_window=7), {},
             dict(mask=make_attention_mask(24, None, seg))]
    for kwargs in cases:
        want = A.dot_product_attention(q, k, v, implementation="xla", **kwargs)
        got = A._cudnn(q, k, v, kwargs.get("mask"), kwargs.get("segment_ids"), None,
                       causal="mask" not in kwargs, sliding_window=kwargs.get("sliding_window"), scale=16**-0.5,
                       dtype=jnp.dtype(jnp.bfloat16))
        rows = real_rows if "segment_ids" in kwargs or "mask" in kwargs else np.ones_like(real_rows)
        np.testing.assert_allclose(np.asarray(got, np.float32)[rows], np.asarray(want, np.float32)[rows],
                                   atol=3e-2, err_msg=str(list(kwargs)))
    # a KV-cache shape (3 new queries over 24 keys): causal offset to the last queries
    q3 = q[:, -3:]
    want = A.dot_product_attention(q3, k, v, implementation="xla", causal=True)
    got = A._cudnn(q3, k, v, None, None, None, causal=True, sliding_window=None, scale=16**-0.5,
                   dtype=jnp.dtype(jnp.bfloat16))
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=3e-2)

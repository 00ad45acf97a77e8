"""DoRA (and the rest of the PEFT family) against Hugging Face PEFT on random tiny LLaMAs (torch extra).

Both ways: adapters written here load in PEFT with the same logits, and PEFT's own files (trained a
little so that no tensor is at its initial value) load here with the same logits. The models have
GQA (6 query heads, 2 key/value heads) and run with tied and untied embeddings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mora_jax as mj
from mora_jax import hf
from mora_jax import pissa
from mora_jax.methods import DoRAConfig, HiRAConfig, LoRAConfig, PiSSAConfig

pytestmark = [pytest.mark.torch, pytest.mark.slow]  # ~40 s per test on 2 CPU cores
TOL = 2e-4


def _torch_llama(tmp_path, tied: bool):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
        tie_word_embeddings=tied, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    base_dir = tmp_path / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    return torch, transformers, base_dir


def _perturbed(adapters, scale=0.05, seed=1):
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _peft_logits(torch, transformers, base_dir, adapter_dir, ids):
    peft = pytest.importorskip("peft")
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


def _peft_trained(torch, transformers, base_dir, peft_config, out_dir, ids, steps=3):
    """A PEFT model of ``peft_config`` after a few SGD steps, saved to ``out_dir``; its logits."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = peft.get_peft_model(base, peft_config)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    t_ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    for _ in range(steps):
        loss = model(t_ids, labels=t_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir)
    with torch.no_grad():
        return model(t_ids).logits.numpy()


@pytest.mark.parametrize("tied", [False, True])
def test_dora_saved_here_runs_in_peft(tmp_path, tied):
    torch, transformers, base_dir = _torch_llama(tmp_path, tied)
    model, params = hf.load_llama(base_dir)
    config = DoRAConfig(r=4, alpha=8.0)
    adapters = _perturbed(mj.init_adapters(params, config, jax.random.key(0)))
    hf.save_adapter(tmp_path / "dora", config, adapters, base_model_name_or_path=str(base_dir))
    ids = np.random.default_rng(0).integers(0, 96, (2, 10))
    ours = np.asarray(mj.apply_model(model, params, jnp.asarray(ids), adapters=adapters))
    theirs = _peft_logits(torch, transformers, base_dir, tmp_path / "dora", ids)
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert np.abs(ours - np.asarray(model.apply({"params": params}, ids))).max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("tied", [False, True])
def test_peft_dora_file_loads_here(tmp_path, tied):
    peft = pytest.importorskip("peft")
    torch, transformers, base_dir = _torch_llama(tmp_path, tied)
    ids = np.random.default_rng(1).integers(0, 96, (2, 10))
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, use_rslora=True,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    theirs = _peft_trained(torch, transformers, base_dir, peft_config, tmp_path / "dora", ids)
    model, params = hf.load_llama(base_dir)
    config, adapters = hf.load_adapter(tmp_path / "dora", params)
    assert isinstance(config, DoRAConfig) and config.rslora and config.r == 4
    ours = np.asarray(mj.apply_model(model, params, jnp.asarray(ids), adapters=adapters))
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    merged = mj.merge(params, adapters)  # and merged, exactly
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, ids)), theirs, atol=TOL)


@pytest.mark.parametrize("tied", [False, True])
def test_hira_saved_here_runs_in_peft(tmp_path, tied):
    torch, transformers, base_dir = _torch_llama(tmp_path, tied)
    model, params = hf.load_llama(base_dir)
    config = HiRAConfig(r=4)
    adapters = _perturbed(mj.init_adapters(params, config, jax.random.key(0)), scale=0.2)
    hf.save_adapter(tmp_path / "hira", config, adapters, base_model_name_or_path=str(base_dir))
    ids = np.random.default_rng(0).integers(0, 96, (2, 10))
    ours = np.asarray(mj.apply_model(model, params, jnp.asarray(ids), adapters=adapters))
    theirs = _peft_logits(torch, transformers, base_dir, tmp_path / "hira", ids)
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert np.abs(ours - np.asarray(model.apply({"params": params}, ids))).max() > 1e-2  # the adapter matters


@pytest.mark.parametrize("tied", [False, True])
def test_peft_hira_file_loads_here(tmp_path, tied):
    peft = pytest.importorskip("peft")
    torch, transformers, base_dir = _torch_llama(tmp_path, tied)
    ids = np.random.default_rng(1).integers(0, 96, (2, 10))
    # init_weights=False: A, B random (PEFT's debugging start), since a few steps from B = 0 barely move HiRA
    peft_config = peft.HiraConfig(r=4, init_weights=False,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    theirs = _peft_trained(torch, transformers, base_dir, peft_config, tmp_path / "hira", ids)
    model, params = hf.load_llama(base_dir)
    config, adapters = hf.load_adapter(tmp_path / "hira", params)
    assert isinstance(config, HiRAConfig) and config.r == 4
    ours = np.asarray(mj.apply_model(model, params, jnp.asarray(ids), adapters=adapters))
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert np.abs(ours - np.asarray(model.apply({"params": params}, ids))).max() > 1e-2  # the adapter matters
    merged = mj.merge(params, adapters)  # and merged, exactly
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, ids)), theirs, atol=TOL)


@pytest.mark.parametrize("tied", [False, True])
def test_pissa_export_runs_in_peft_on_the_original_base(tmp_path, tied):
    """PiSSA trained here on the residual base, exported as a rank-2r LoRA for the original base
    (``pissa.to_lora``): PEFT runs it on the original checkpoint with the same logits."""
    torch, transformers, base_dir = _torch_llama(tmp_path, tied)
    model, params = hf.load_llama(base_dir)
    config = PiSSAConfig(r=4, alpha=8.0)
    residual, initial = pissa.init(params, config, jax.random.key(0))
    trained = _perturbed(initial, scale=0.05)
    ids = np.random.default_rng(2).integers(0, 96, (2, 10))
    ours = np.asarray(mj.apply_model(model, residual, jnp.asarray(ids), adapters=trained))
    hf.save_adapter(tmp_path / "pissa", *pissa.to_lora(trained, initial, config), base_model_name_or_path=str(base_dir))
    theirs = _peft_logits(torch, transformers, base_dir, tmp_path / "pissa", ids)
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert np.abs(ours - np.asarray(model.apply({"params": params}, ids))).max() > 1e-2  # the training matters


def test_peft_pissa_conversion_loads_here_on_the_original_base(tmp_path):
    """PEFT's own PiSSA, trained and saved with path_initial_model_for_weight_conversion, is a plain LoRA
    for the original base: it loads here on the original weights with PEFT's logits."""
    peft = pytest.importorskip("peft")
    torch, transformers, base_dir = _torch_llama(tmp_path, tied=False)
    ids = np.random.default_rng(3).integers(0, 96, (2, 10))
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa",
                                                           target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    peft_model.peft_config["default"].init_lora_weights = True  # as PEFT's docs save the initial adapter
    peft_model.save_pretrained(tmp_path / "pissa_init")
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    t_ids = torch.as_tensor(ids, dtype=torch.long)
    for _ in range(3):
        loss = peft_model(t_ids, labels=t_ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(t_ids).logits.numpy()
    peft_model.save_pretrained(tmp_path / "pissa_lora", path_initial_model_for_weight_conversion=str(tmp_path / "pissa_init"))
    model, params = hf.load_llama(base_dir)  # the original weights, not PEFT's residual
    config, adapters = hf.load_adapter(tmp_path / "pissa_lora", params)
    assert isinstance(config, LoRAConfig) and config.r == 8
    ours = np.asarray(mj.apply_model(model, params, jnp.asarray(ids), adapters=adapters))
    np.testing.assert_allclose(ours, theirs, atol=TOL)
    assert np.abs(ours - np.asarray(model.apply({"params": params}, ids))).max() > 1e-3

"""Llama 3.x (llama3 / linear / dynamic RoPE scaling, biases, tied embeddings, explicit head_dim),
Mistral (sliding window) and Qwen2 (q/k/v biases) against ``transformers`` on random tiny
checkpoints; save -> load round trips; MoRA / LoRA on all seven projections, through merges and the
PEFT format; refusals of what is not implemented."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_families as tf
from flax import traverse_util

import mora_jax as mj
from mora_jax.adapters import flatten
from mora_jax.hf import load_adapter, load_llama, read_config, save_adapter, save_llama
from mora_jax.models import LLAMA_CONFIGS, LlamaConfig, RopeScaling, abstract_params, count_params
from mora_jax.models.rope import rope_inv_freq

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.torch

TOL = 2e-4  # relative to the largest logit


def _theirs(torch_model, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return torch_model(torch.tensor(ids), **kwargs).logits.numpy()


def _ours(model, params, ids, adapters=None, **kw):
    return np.asarray(jax.jit(lambda p, a, x: mj.apply_model(model, p, x, adapters=a, **kw))(params, adapters, ids))


# ---- Logits against transformers ----------------------------------------------------------------------
# What each family's distinguishing feature is; dropping it must change the logits.
_FEATURE_OFF = {
    "llama3": {"rope_scaling": None},
    "llama-linear-bias": {"rope_scaling": None},
    "llama-dynamic": {"rope_scaling": None},
    "mistral": {"sliding_window": None},
    "qwen2": {"rope_theta": 10000.0},
}


@pytest.mark.parametrize("name", list(tf.FAMILIES))
def test_logits_match_transformers(name):
    directory = tf.checkpoint(name)
    model, params = load_llama(directory)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = tf.ids((2, 16))
    mask = np.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    ours, theirs = _ours(model, params, ids, attention_mask=jnp.asarray(mask)), _theirs(hf_model, ids, mask)
    assert tf.relative_error(ours[0], theirs[0]) < TOL
    assert tf.relative_error(ours[1, :12], theirs[1, :12]) < TOL
    # the family's feature is really implemented: without it the logits differ
    off = type(model)(model.config.replace(**_FEATURE_OFF[name]))
    assert tf.relative_error(_ours(off, params, ids), theirs) > 1e-3


def test_loaded_configs():
    llama3 = read_config(tf.checkpoint("llama3"))
    assert (llama3.model_type, llama3.tie_word_embeddings, llama3.head_dim, llama3.rope_theta) == ("llama", True, 16, 5e5)
    assert llama3.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 16)
    assert read_config(tf.checkpoint("mistral")).sliding_window == 5
    qwen = read_config(tf.checkpoint("qwen2"))
    assert qwen.model_type == "qwen2" and qwen.qkv_bias and not qwen.o_bias and qwen.rope_theta == 1e6
    biased = read_config(tf.checkpoint("llama-linear-bias"))
    assert biased.attention_bias and biased.mlp_bias and biased.o_bias


def test_bias_leaves_and_param_counts():
    params = abstract_params(read_config(tf.checkpoint("qwen2")))
    attn = params["model"]["layers_0"]["self_attn"]
    assert {n: set(attn[n]) for n in attn} == {"q_proj": {"kernel", "bias"}, "k_proj": {"kernel", "bias"},
                                               "v_proj": {"kernel", "bias"}, "o_proj": {"kernel"}}
    assert "lm_head" not in params
    # the public checkpoints' sizes
    assert count_params(abstract_params(LLAMA_CONFIGS["llama3.2-1b"])) == 1_235_814_400
    assert count_params(abstract_params(LLAMA_CONFIGS["llama3.2-3b"])) == 3_212_749_824
    assert count_params(abstract_params(LLAMA_CONFIGS["qwen2.5-0.5b"])) == 494_032_768
    assert count_params(abstract_params(LLAMA_CONFIGS["mistral-7b"])) == 7_241_732_096


def test_llama3_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=1024, num_attention_heads=8, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = rope_inv_freq(128, 500000.0, RopeScaling("llama3", 32.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    assert not np.allclose(ours, rope_inv_freq(128, 500000.0))  # low frequencies are scaled


# ---- Save -> load --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", tf.MAIN + ("llama-linear-bias",))
def test_save_load_round_trip_and_transformers_reads_it(name, tmp_path):
    model, params = load_llama(tf.checkpoint(name))
    save_llama(tmp_path / "out", model, params)
    model2, params2 = load_llama(tmp_path / "out")
    assert model2.config == model.config
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), params, params2))
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["model_type"] == model.config.model_type
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = tf.ids((1, 16), seed=3)
    assert tf.relative_error(_ours(model, params, ids), _theirs(reloaded, ids)) < TOL


def test_scanned_load_matches_unrolled():
    directory = tf.checkpoint("qwen2")
    model, params = load_llama(directory)
    scanned, sparams = load_llama(directory, scan_layers=True)
    assert sparams["model"]["layers"]["self_attn"]["q_proj"]["bias"].shape == (2, 48)
    ids = tf.ids((2, 12))
    np.testing.assert_allclose(_ours(scanned, sparams, ids), _ours(model, params, ids), atol=1e-5)


# ---- Adapters ------------------------------------------------------------------------------------------
def _random_adapters(params, config, seed=1):
    adapters = mj.init_adapters(params, config, jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.parametrize("name", tf.MAIN)
def test_mora_on_all_seven_projections_merge_and_peft_round_trip(name, tmp_path):
    model, params = load_llama(tf.checkpoint(name))
    config = mj.MoRAConfig(r=4, mora_type=6)
    adapters = _random_adapters(params, config)
    flat_adapters = flatten(adapters)
    adapted = {"/".join(p[-3:-1]) for p in flat_adapters}
    assert adapted == {"self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                       "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"}
    assert len(flat_adapters) == 7 * 2
    ids = tf.ids((2, 12))
    unmerged = _ours(model, params, ids, adapters)
    merged_params = mj.merge(params, adapters)
    # biases are frozen base weights: merging leaves them exactly as they were
    flat, flat_merged = traverse_util.flatten_dict(params), traverse_util.flatten_dict(merged_params)
    biases = [p for p in flat if p[-1] == "bias"]
    assert bool(biases) == (name == "qwen2")
    assert all(np.array_equal(flat[p], flat_merged[p]) for p in biases)
    np.testing.assert_allclose(_ours(model, merged_params, ids), unmerged, atol=2e-4)
    assert tf.relative_error(unmerged, _ours(model, params, ids)) > 1e-3  # the adapter matters
    # PEFT round trip, and the merged export keeps the biases
    save_adapter(tmp_path / "adapter", config, adapters)
    config2, adapters2 = load_adapter(tmp_path / "adapter", params)
    assert config2.r == 4 and config2.mora_type == 6
    np.testing.assert_allclose(_ours(model, params, ids, adapters2), unmerged, atol=1e-6)
    save_llama(tmp_path / "merged", model, merged_params)
    hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", attn_implementation="eager")
    assert tf.relative_error(unmerged, _theirs(hf_merged.eval(), ids)) < TOL


@pytest.mark.parametrize("name", tf.MAIN)
def test_lora_file_loads_in_hf_peft_with_equal_logits(name, tmp_path):
    peft = pytest.importorskip("peft")
    directory = tf.checkpoint(name)
    model, params = load_llama(directory)
    config = mj.LoRAConfig(r=4, alpha=8.0)
    adapters = _random_adapters(params, config)
    save_adapter(tmp_path / "adapter", config, adapters, base_model_name_or_path=str(directory))
    assert sorted(json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ids = tf.ids((2, 12), seed=5)
    base = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ours = _ours(model, params, ids, adapters)
    assert tf.relative_error(ours, _theirs(peft_model, ids)) < TOL
    assert tf.relative_error(ours, _ours(model, params, ids)) > 1e-3


# ---- Refusals ------------------------------------------------------------------------------------------
def _edited(tmp_path, name, **edits):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(tf.checkpoint(name), out)
    cfg = json.loads((out / "config.json").read_text())
    for key, value in edits.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(
    "name,edits,match",
    [
        ("llama3", {"model_type": "gemma"}, r"model_type='gemma'.*supported model types: 'llama'.*'mistral'.*'qwen2'"),
        ("llama3", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, "rope_scaling": ...},
         r"rope_type 'yarn' is not supported; supported: default, linear, dynamic, llama3"),
        ("llama3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope' is not supported"),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0,
                   "layer_types": ...}, "use_sliding_window=true"),
        ("mistral", {"architectures": ["MistralForSequenceClassification"]}, "no MistralForCausalLM"),
        ("qwen2", {"quantization_config": {"quant_method": "gptq"}}, "quantized checkpoints are not supported"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, name, edits, match):
    with pytest.raises(ValueError, match=match):
        load_llama(_edited(tmp_path, name, **edits))


def test_checkpoint_family_mismatch_names_the_tensors(tmp_path):
    # a Qwen2 checkpoint relabelled as Llama: the biases are tensors a Llama does not use
    directory = _edited(tmp_path, "qwen2", model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ValueError, match=r"LlamaForCausalLM with this config.json does not use.*q_proj\.bias"):
        load_llama(directory)


def test_config_validation_and_hf_dict_round_trip():
    for name in tf.FAMILIES:
        config = read_config(tf.checkpoint(name))
        assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config
    with pytest.raises(ValueError, match="sliding_window is a Mistral option"):
        LlamaConfig(sliding_window=4)
    with pytest.raises(ValueError, match="Llama options"):
        LlamaConfig(model_type="qwen2", attention_bias=True)
    with pytest.raises(ValueError, match="factor must be a number >= 1"):
        LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 0.5})
    with pytest.raises(ValueError, match="needs"):
        RopeScaling("llama3", 8.0)
    assert LlamaConfig.from_hf_dict({"model_type": "llama", "eos_token_id": [128001, 128009]}).eos_token_ids == (
        128001, 128009)

"""Hugging Face weight I/O: golden logits, name mapping, save/load round trips (single file, sharded,
bf16, scanned), sharded device placement, every refusal with its message, and torch parity."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from mora_jax.hf.checkpoints import load_llama, param_to_hf_tensor, params_to_hf_tensors, save_llama
from mora_jax.hf.files import hf_name_to_path, path_to_hf_name
from mora_jax.models import LLAMA_CONFIGS, LlamaForCausalLM, abstract_params, stack_layers


@pytest.fixture(scope="module")
def base_dir(fixtures_dir):
    return fixtures_dir / "e2e_public" / "base"


@pytest.fixture(scope="module")
def expected(fixtures_dir):
    return dict(np.load(fixtures_dir / "e2e_public" / "expected.npz"))


@pytest.fixture(scope="module")
def base(base_dir):
    return load_llama(base_dir)


def _copy(base_dir, tmp_path, config_edits=None, tensors=None):
    """Copy of the fixture model with edited config.json and/or replaced tensors."""
    out = tmp_path / "model"
    shutil.copytree(base_dir, out)
    if config_edits is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(config_edits)
        (out / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _same_tree(a, b):
    return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


# ---- Golden, names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_layers", [False, True])
def test_golden_logits(base_dir, expected, scan_layers):
    model, params = load_llama(base_dir, scan_layers=scan_layers)
    assert model.config.scan_layers is scan_layers
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(expected["input_ids"]))
    np.testing.assert_allclose(logits, expected["logits_base"], atol=2e-4, rtol=0)


def test_loaded_layout(base, base_dir):
    model, params = base
    hf = load_file(str(base_dir / "model.safetensors"))
    np.testing.assert_array_equal(params["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"],
                                  hf["model.layers.1.self_attn.k_proj.weight"].T)  # fmt: skip
    np.testing.assert_array_equal(params["model"]["embed_tokens"]["embedding"], hf["model.embed_tokens.weight"])
    assert model.config == LLAMA_CONFIGS["tiny"].replace(head_dim=16, bos_token_id=1, eos_token_id=2)
    assert set(params_to_hf_tensors(model.config, params)) == set(hf)


def test_name_mapping():
    path = ("model", "layers_10", "self_attn", "q_proj")
    assert hf_name_to_path("model.layers.10.self_attn.q_proj") == path
    assert path_to_hf_name(path) == "model.layers.10.self_attn.q_proj"
    assert hf_name_to_path("lm_head") == ("lm_head",)
    assert param_to_hf_tensor(path + ("kernel",)) == ("model.layers.10.self_attn.q_proj.weight", True)
    assert param_to_hf_tensor(("model", "embed_tokens", "embedding")) == ("model.embed_tokens.weight", False)
    assert param_to_hf_tensor(("model", "norm", "weight")) == ("model.norm.weight", False)
    with pytest.raises(ValueError, match="scanned"):
        path_to_hf_name(("model", "layers", "mlp", "up_proj"))


# ---- Save / load -------------------------------------------------------------------------------------
def test_save_load_round_trip(base, tmp_path):
    model, params = base
    written = save_llama(tmp_path / "out", model, params)
    assert sorted(p.name for p in written) == ["config.json", "model.safetensors"]
    model2, params2 = load_llama(tmp_path / "out")
    assert model2.config == model.config and _same_tree(params, params2)


def test_sharded_save_from_scanned_params(base, tmp_path):
    model, params = base
    scanned_model = LlamaForCausalLM(model.config.replace(scan_layers=True))
    save_llama(tmp_path / "out", scanned_model, stack_layers(params), max_shard_bytes=30_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (tmp_path / "out" / "model.safetensors").exists()
    for name in shards:  # no shard over the limit unless it holds a single larger tensor
        tensors = load_file(str(tmp_path / "out" / name))
        assert sum(t.nbytes for t in tensors.values()) <= 30_000 or len(tensors) == 1
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    _, params2 = load_llama(tmp_path / "out")
    assert _same_tree(params, params2)


def test_bf16_and_tied_round_trip(tmp_path, expected):
    config = LLAMA_CONFIGS["tiny"].replace(tie_word_embeddings=True, param_dtype="bfloat16")
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), abstract_params(config)
    )
    save_llama(tmp_path / "out", config, params)
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["torch_dtype"] == "bfloat16" and hf_cfg["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(str(tmp_path / "out" / "model.safetensors"))
    model2, params2 = load_llama(tmp_path / "out")  # param_dtype=None: keeps the stored bfloat16
    assert model2.config.param_dtype == jnp.bfloat16 and model2.config.dtype == jnp.float32
    assert "lm_head" not in params2 and _same_tree(params, params2)
    _, params32 = load_llama(tmp_path / "out", param_dtype=jnp.float32)
    assert params32["model"]["norm"]["weight"].dtype == jnp.float32


def test_overwrite(base, tmp_path):
    model, params = base
    save_llama(tmp_path / "out", model, params, max_shard_bytes=30_000)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_llama(tmp_path / "out", model, params)
    (tmp_path / "out" / "README.md").write_text("keep me")
    save_llama(tmp_path / "out", model, params, overwrite=True)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["README.md", "config.json", "model.safetensors"]  # stale shards removed
    assert _same_tree(params, load_llama(tmp_path / "out")[1])


def test_save_rejects_params_not_matching_config(base, tmp_path):
    model, params = base
    tied = model.config.replace(tie_word_embeddings=True)
    with pytest.raises(ValueError, match="unexpected.*lm_head.weight"):
        save_llama(tmp_path / "out", tied, params)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="shape"):
        save_llama(tmp_path / "out", model.config.replace(intermediate_size=100), params)


# ---- Sharded placement --------------------------------------------------------------------------------
def _mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    return jax.make_mesh((2, 4), ("data", "model"), devices=jax.devices()[:8])


def test_load_with_sharding_pytree(base, base_dir):
    mesh = _mesh()
    _, ref = base

    def spec(path, x):
        names = [k.key for k in path]
        if names[-1] == "kernel":
            return P("data", "model")
        if names[-1] == "embedding":
            return P("model", None)
        return P()

    specs = jax.tree_util.tree_map_with_path(spec, ref)
    _, params = load_llama(base_dir, mesh=mesh, shardings=specs)
    q = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == NamedSharding(mesh, P("data", "model"))
    assert q.addressable_shards[0].data.shape == (32, 16)  # each device holds only its slice
    assert _same_tree(ref, params)


def test_load_scanned_with_callable_shardings(base, base_dir):
    mesh = _mesh()
    _, ref = base

    def sharding_of(path):
        if path[-1] == "kernel" and path[:2] == ("model", "layers"):
            return NamedSharding(mesh, P("data", None, "model"))  # layer axis split over 'data'
        return NamedSharding(mesh, P())

    _, params = load_llama(base_dir, shardings=sharding_of, scan_layers=True)
    down = params["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    assert down.addressable_shards[0].data.shape == (1, 172, 16)
    assert _same_tree(stack_layers(ref), params)
    _, replicated = load_llama(base_dir, mesh=mesh)
    assert replicated["lm_head"]["kernel"].sharding.is_fully_replicated
    assert len(replicated["lm_head"]["kernel"].sharding.device_set) == 8


# ---- Refusals -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "edits,match",
    [
        ({"model_type": "gpt2"}, "model_type='gpt2'.*not supported; supported model types: 'llama'"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "no LlamaForCausalLM"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling rope_type 'yarn' is not supported"),
        # biases are supported, so a config asking for them needs the bias tensors
        ({"attention_bias": True}, r"missing 8 tensor.*self_attn\.k_proj\.bias"),
        ({"mlp_bias": True}, r"missing 6 tensor.*mlp\.down_proj\.bias"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ],
)
def test_unsupported_config(base_dir, tmp_path, edits, match):
    with pytest.raises(ValueError, match=match):
        load_llama(_copy(base_dir, tmp_path, config_edits=edits))


def test_default_rope_scaling_accepted(base_dir, tmp_path):
    model, _ = load_llama(_copy(base_dir, tmp_path, config_edits={"rope_scaling": {"rope_type": "default"}}))
    assert model.config.rope_theta == 10000.0


def test_missing_tensors_listed(base_dir, tmp_path):
    hf = load_file(str(base_dir / "model.safetensors"))
    del hf["model.layers.1.mlp.up_proj.weight"], hf["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing 2 tensor.*model\.layers\.1\.mlp\.up_proj\.weight.*model\.norm\.weight"):
        load_llama(_copy(base_dir, tmp_path, tensors=hf))


def test_misshapen_tensor(base_dir, tmp_path):
    hf = load_file(str(base_dir / "model.safetensors"))
    hf["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match=r"k_proj\.weight: expected \(32, 64\), found \(64, 64\)"):
        load_llama(_copy(base_dir, tmp_path, tensors=hf))


def test_unexpected_tensors(base_dir, tmp_path):
    hf = load_file(str(base_dir / "model.safetensors"))
    hf["model.layers.2.input_layernorm.weight"] = np.ones(64, np.float32)
    hf["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)  # ignored
    with pytest.raises(ValueError, match=r"does not use: \['model\.layers\.2\.input_layernorm\.weight'\]"):
        load_llama(_copy(base_dir, tmp_path, tensors=hf))


def test_pickle_refused(base_dir, tmp_path):
    out = _copy(base_dir, tmp_path)
    (out / "model.safetensors").unlink()
    (out / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ValueError, match="pickle.*allow_pickle=True"):
        load_llama(out)
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs torch"):
            load_llama(out, allow_pickle=True)


def test_missing_files(base_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_llama(tmp_path)
    out = _copy(base_dir, tmp_path)
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_llama(out)


# ---- PyTorch / transformers parity (optional extra) -------------------------------------------------------
def _torch_model(tied: bool):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
        tie_word_embeddings=tied, attn_implementation="eager",
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return torch, transformers, model


@pytest.mark.torch
@pytest.mark.parametrize("tied", [False, True])
def test_torch_parity(tmp_path, tied):
    torch, transformers, hf_model = _torch_model(tied)
    hf_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 128, (2, 16))
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    model, params = load_llama(tmp_path / "hf")
    assert ("lm_head" in params) is not tied
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(ours[0], ref[0], atol=2e-4)
    np.testing.assert_allclose(ours[1, :11], ref[1, :11], atol=2e-4)

    # ...and transformers loads what save_llama writes (sharded too).
    save_llama(tmp_path / "ours", model, params, max_shard_bytes=20_000)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.no_grad():
        again = reloaded(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(again, np.asarray(model.apply({"params": params}, jnp.asarray(ids))), atol=2e-4)

"""PEFT adapter files (MoRA reference format and plain LoRA) and the ``mora-jax`` CLI.

The reference's type-6 r=4 adapter for the tiny LLaMA in ``fixtures/e2e_public`` must give the
reference's logits unmerged and merged, and its merged weights; saving must reproduce the
reference's file layout exactly; errors must say what is wrong.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mora_jax as mj
from mora_jax.adapters import flatten
from mora_jax.cli import main
from mora_jax.hf import AdapterFormatError, load_adapter, load_llama, params_to_hf_tensors, save_adapter

E2E = pathlib.Path(__file__).parent / "fixtures" / "e2e_public"
BASE, ADAPTER = E2E / "base", E2E / "adapter_type6_r4"
TOL = 2e-4


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(E2E / "expected.npz"))


@pytest.fixture(scope="module")
def base():
    return load_llama(BASE)


@pytest.fixture(scope="module")
def base_scanned():
    return load_llama(BASE, scan_layers=True)


@pytest.fixture(scope="module")
def fixture_adapter(base):
    return load_adapter(ADAPTER, base[1])


def logits(model, params, ids, adapters=None):
    return np.asarray(mj.apply_model(model, params, jnp.asarray(ids), adapters=adapters))


def copy_adapter(tmp_path) -> pathlib.Path:
    return pathlib.Path(shutil.copytree(ADAPTER, tmp_path / "adapter"))


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(directory, fn):
    path = directory / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# ---- The reference's adapter ------------------------------------------------------------------------
def test_fixture_adapter_config(fixture_adapter):
    config, adapters = fixture_adapter
    assert isinstance(config, mj.MoRAConfig) and (config.r, config.mora_type, config.dropout) == (4, 6, 0.0)
    flat = flatten(adapters)
    assert len(flat) == 14
    q = adapters["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, mj.MoRAAdapter) and q.m.shape == (22, 22) and q.m.dtype == jnp.float32
    assert (q.in_features, q.out_features, q.r, q.mora_type) == (64, 64, 4, 6)
    # The returned targets select exactly the adapted kernels, so init_adapters rebuilds the same tree.
    _, params = load_llama(BASE)
    fresh = mj.init_adapters(params, config, jax.random.key(0))
    assert set(flatten(fresh)) == set(flat)


def test_fixture_adapter_logits(base, fixture_adapter, expected):
    model, params = base
    _, adapters = fixture_adapter
    out = logits(model, params, expected["input_ids"], adapters)
    np.testing.assert_allclose(out, expected["logits_adapter_type6_r4"], atol=TOL, rtol=0)


def test_fixture_adapter_logits_scanned_params(base_scanned, expected):
    model, params = base_scanned
    config, adapters = load_adapter(ADAPTER, params)
    assert adapters["model"]["layers"]["mlp"]["down_proj"]["kernel"].m.shape == (2, 30, 30)
    out = logits(model, params, expected["input_ids"], adapters)
    np.testing.assert_allclose(out, expected["logits_adapter_type6_r4"], atol=TOL, rtol=0)


def test_merged_weights_and_logits_match_reference(base, fixture_adapter, expected):
    model, params = base
    _, adapters = fixture_adapter
    merged = mj.merge(params, adapters)
    ours = params_to_hf_tensors(model.config, merged)
    reference = load_file(str(ADAPTER / "merged_reference.safetensors"))
    assert set(ours) == set(reference)
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], atol=TOL, rtol=0, err_msg=name)
    out = logits(model, merged, expected["input_ids"])
    np.testing.assert_allclose(out, expected["logits_merged_adapter_type6_r4"], atol=TOL, rtol=0)


# ---- Saving: the reference's format -----------------------------------------------------------------
def test_saved_files_match_reference_format(tmp_path, fixture_adapter):
    config, adapters = fixture_adapter
    save_adapter(tmp_path / "out", config, adapters, base_model_name_or_path="../base")
    ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    reference = load_file(str(ADAPTER / "adapter_model.safetensors"))
    assert set(ours) == set(reference)
    for name in reference:  # lora_A = lora_B = Mᵀ, bit for bit
        assert ours[name].dtype == reference[name].dtype
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)
    our_config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    ref_config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert set(our_config) == set(ref_config)
    for key in ("peft_type", "use_mora", "mora_type", "r", "task_type", "lora_dropout", "base_model_name_or_path",
                "bias", "use_dora", "modules_to_save", "fan_in_fan_out"):  # fmt: skip
        assert our_config[key] == ref_config[key], key
    assert sorted(our_config["target_modules"]) == sorted(ref_config["target_modules"])


def test_save_from_scanned_params_writes_per_layer_tensors(tmp_path, base_scanned):
    config, adapters = load_adapter(ADAPTER, base_scanned[1])
    save_adapter(tmp_path / "out", config, adapters)
    ours = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    reference = load_file(str(ADAPTER / "adapter_model.safetensors"))
    assert set(ours) == set(reference)
    for name in reference:
        np.testing.assert_array_equal(ours[name], reference[name], err_msg=name)


def _random_adapters(params, config, seed):
    """Adapters with every array leaf random (MoRA m and LoRA b start at zero otherwise)."""
    rng = np.random.default_rng(seed)
    adapters = mj.init_adapters(params, config, jax.random.key(seed))
    return jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), adapters)


@pytest.mark.parametrize(
    "config",
    [
        mj.MoRAConfig(r=4, mora_type=1, dropout=0.05),
        mj.MoRAConfig(r=8, mora_type=6, targets=r".*/(q|v)_proj/kernel"),
        mj.LoRAConfig(r=4, alpha=16.0),
        mj.LoRAConfig(r=2, alpha=3.5, rslora=True, targets=r"model/layers_1/mlp/.*/kernel"),
    ],
    ids=["mora1", "mora6-qv", "lora", "rslora-one-layer"],
)
def test_round_trip_is_bitwise(tmp_path, base, config):
    _, params = base
    adapters = _random_adapters(params, config, seed=3)
    save_adapter(tmp_path / "a", config, adapters)
    loaded_config, loaded = load_adapter(tmp_path / "a", params)
    assert type(loaded_config) is type(config) and loaded_config.method == config.method
    assert (loaded_config.r, loaded_config.dropout) == (config.r, config.dropout)
    if isinstance(config, mj.MoRAConfig):
        assert loaded_config.mora_type == config.mora_type
    else:
        assert (loaded_config.alpha, loaded_config.rslora) == (config.alpha, config.rslora)
    flat, flat_loaded = flatten(adapters), flatten(loaded)
    assert set(flat) == set(flat_loaded)
    for path, adapter in flat.items():
        again = flat_loaded[path]
        assert type(again) is type(adapter)
        assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(adapter)  # static fields too
        for x, y in zip(jax.tree_util.tree_leaves(adapter), jax.tree_util.tree_leaves(again)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The loaded config's targets select the same kernels again.
    assert set(flatten(mj.init_adapters(params, loaded_config, jax.random.key(0)))) == set(flat)


def test_target_modules_written_as_reference_does(tmp_path, base):
    _, params = base
    every_layer = mj.MoRAConfig(r=4, mora_type=1, targets=r".*/(q|v)_proj/kernel")
    save_adapter(tmp_path / "a", every_layer, mj.init_adapters(params, every_layer, jax.random.key(0)))
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]
    one_layer = mj.MoRAConfig(r=4, mora_type=1, targets=r"model/layers_1/self_attn/q_proj/kernel")
    save_adapter(tmp_path / "b", one_layer, mj.init_adapters(params, one_layer, jax.random.key(0)))
    written = json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"]
    assert written == ["model.layers.1.self_attn.q_proj"]  # exact name: PEFT must not adapt layer 0


def test_plain_peft_lora_file(tmp_path, base):
    """A LoRA adapter written the way stock PEFT writes it: A (r, k), B (d, r), scale alpha/r or alpha/√r."""
    model, params = base
    rng = np.random.default_rng(0)
    r, alpha = 4, 16
    tensors, expected_delta = {}, {}
    for i in range(2):
        for module, (k, d) in {"self_attn.q_proj": (64, 64), "mlp.down_proj": (172, 64)}.items():
            a_t = rng.standard_normal((r, k)).astype(np.float32)
            b_t = rng.standard_normal((d, r)).astype(np.float32)
            name = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a_t, b_t
            expected_delta[f"model.layers.{i}.{module}.weight"] = b_t @ a_t  # HF layout (d, k), unscaled
    for rslora, scale in ((False, alpha / r), (True, alpha / np.sqrt(r))):
        directory = tmp_path / f"lora_{rslora}"
        directory.mkdir()
        save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        (directory / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "lora_dropout": 0.1,
            "target_modules": ["q_proj", "down_proj"], "bias": "none", "task_type": "CAUSAL_LM",
            "modules_to_save": None, "use_dora": False,
        }))  # fmt: skip
        config, adapters = load_adapter(directory, params)
        assert isinstance(config, mj.LoRAConfig) and (config.r, config.alpha, config.rslora) == (r, alpha, rslora)
        assert config.dropout == 0.1
        base_hf = params_to_hf_tensors(model.config, params)
        merged_hf = params_to_hf_tensors(model.config, mj.merge(params, adapters))
        for name in merged_hf:
            want = base_hf[name] + scale * expected_delta[name] if name in expected_delta else base_hf[name]
            np.testing.assert_allclose(merged_hf[name], want, atol=1e-4, rtol=1e-5, err_msg=name)


# ---- Errors -------------------------------------------------------------------------------------
def _remove(name):
    return lambda d: (d / name).unlink()


def _pickle_only(d):
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")


def _rename_to_layer_7(tensors):
    for part in ("lora_A", "lora_B"):
        old = f"base_model.model.model.layers.1.mlp.up_proj.{part}.weight"
        tensors[old.replace("layers.1", "layers.7")] = tensors.pop(old)


def _odd_q_proj(tensors):
    for part in ("lora_A", "lora_B"):
        tensors[f"base_model.model.model.layers.0.self_attn.q_proj.{part}.weight"] = np.zeros((21, 21), np.float32)


def _b_differs(tensors):
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] += 1.0


def _dora_magnitude(tensors):
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(64, np.float32)


LOAD_ERRORS = {
    "no-config": (_remove("adapter_config.json"), None, None, FileNotFoundError, r"adapter_config\.json not found"),
    "no-weights": (_remove("adapter_model.safetensors"), None, None, FileNotFoundError, r"adapter_model\.safetensors not found"),
    "pickle": (_pickle_only, None, None, FileNotFoundError, r"adapter_model\.bin.*pickle.*safe_serialization"),
    "no-base-param": (None, None, _rename_to_layer_7, AdapterFormatError, r"map to no base parameter.*model\.layers\.7\.mlp\.up_proj"),
    "r-mismatch": (None, {"r": 8}, None, AdapterFormatError,
                   r"layers\.0\.mlp\.down_proj\.lora_A\.weight has shape \(30, 30\).*172 -> 64.*r=8 with mora_type 6 gives r̂=42"),
    "type-mismatch": (None, {"mora_type": 1}, None, AdapterFormatError, r"mora_type 1 gives r̂=31"),
    "odd-type6": (None, None, _odd_q_proj, AdapterFormatError, r"q_proj\.lora_A\.weight.*type 6.*even r̂, got 21"),
    "b-differs": (None, None, _b_differs, AdapterFormatError, r"lora_B\.weight differs from lora_A\.weight"),
    "dora-and-mora": (None, {"use_dora": True}, None, AdapterFormatError, r"use_mora and use_dora \(DoRA\) are both set"),
    "modules-to-save": (None, {"modules_to_save": ["lm_head"]}, None, AdapterFormatError, r"modules_to_save.*not supported"),
    "rank-pattern": (None, {"rank_pattern": {"q_proj": 8}}, None, AdapterFormatError, r"rank_pattern.*not supported"),
    "bias": (None, {"bias": "all"}, None, AdapterFormatError, r"bias='all'.*not supported"),
    "peft-type": (None, {"peft_type": "IA3"}, None, AdapterFormatError, r"peft_type 'IA3' is not supported"),
    "unknown-type": (None, {"mora_type": 5}, None, AdapterFormatError, r"unknown mora_type 5"),
    "bad-r": (None, {"r": 0}, None, AdapterFormatError, r"'r' must be a positive int"),
    "extra-tensor": (None, None, _dora_magnitude, AdapterFormatError, r"lora_magnitude_vector but use_dora is not set"),
    "lora-shapes": (None, {"use_mora": False}, None, AdapterFormatError, r"should be \(4, 172\) and \(64, 4\)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_errors(tmp_path, base, case):
    edit_dir, config_changes, tensor_fn, error, message = LOAD_ERRORS[case]
    directory = copy_adapter(tmp_path)
    if edit_dir:
        edit_dir(directory)
    if config_changes:
        edit_config(directory, **config_changes)
    if tensor_fn:
        edit_tensors(directory, tensor_fn)
    with pytest.raises(error, match=message):
        load_adapter(directory, base[1])


def test_load_errors_paths(tmp_path, base):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tmp_path / "nowhere", base[1])
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        load_adapter(tmp_path / "file", base[1])


def test_scanned_params_need_every_layer(tmp_path, base_scanned):
    directory = copy_adapter(tmp_path)
    edit_tensors(directory, lambda t: [t.pop(n) for n in list(t) if "layers.1.mlp.up_proj" in n])
    with pytest.raises(AdapterFormatError, match=r"model/layers/mlp/up_proj/kernel in layer\(s\) \[1\].*scan_layers=False"):
        load_adapter(directory, base_scanned[1])


def test_save_errors(tmp_path, fixture_adapter):
    config, adapters = fixture_adapter
    target = tmp_path / "out"
    save_adapter(target, config, adapters)
    with pytest.raises(FileExistsError, match="not empty.*overwrite=True"):
        save_adapter(target, config, adapters)
    (target / "README.md").write_text("kept")
    # a symlinked adapter file is replaced, not written through (the user's file stays as it was)
    outside = tmp_path / "users_config.json"
    outside.write_text("{}")
    (target / "adapter_config.json").unlink()
    (target / "adapter_config.json").symlink_to(outside)
    save_adapter(target, config, adapters, overwrite=True)
    assert (target / "README.md").read_text() == "kept"
    assert outside.read_text() == "{}" and not (target / "adapter_config.json").is_symlink()
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(AdapterFormatError, match=r"does not match the MoRAConfig\(r=8, mora_type=6\).*r=4"):
        save_adapter(tmp_path / "other", mj.MoRAConfig(r=8), adapters)
    with pytest.raises(AdapterFormatError, match="does not match the LoRAConfig"):
        save_adapter(tmp_path / "other", mj.LoRAConfig(r=4), adapters)
    with pytest.raises(AdapterFormatError, match="empty"):
        save_adapter(tmp_path / "other", config, {})
    assert not (tmp_path / "other").exists()  # nothing written on a refused save


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_merge_end_to_end(tmp_path, capsys, expected):
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(out)]) == 0
    assert "merged 14 kernels" in capsys.readouterr().out
    assert (out / "generation_config.json").read_text() == (BASE / "generation_config.json").read_text()
    model, params = load_llama(out)
    np.testing.assert_allclose(
        logits(model, params, expected["input_ids"]), expected["logits_merged_adapter_type6_r4"], atol=TOL, rtol=0
    )

    # An existing output directory is refused, then replaced with --overwrite.
    assert main(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "mora-jax: error: output directory" in err and "--overwrite" in err and "Traceback" not in err
    argv = ["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(out), "--overwrite", "--dtype", "bfloat16"]
    assert main(argv) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _, params16 = load_llama(out)
    assert params16["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    reference = load_file(str(ADAPTER / "merged_reference.safetensors"))
    ours = params_to_hf_tensors(model.config.replace(param_dtype="bfloat16"), params16)
    for name in reference:
        np.testing.assert_allclose(ours[name].astype(np.float32), reference[name], rtol=1e-2, atol=1e-3, err_msg=name)


def test_cli_errors(tmp_path, capsys):
    def run(*argv):
        code = main(list(argv))
        err = capsys.readouterr().err
        assert code == 1 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1].startswith("mora-jax: error: "), err  # after progress lines
        return err

    out = str(tmp_path / "out")
    assert "base model directory" in run("merge", "--base", str(tmp_path / "nope"), "--adapter", str(ADAPTER), "--out", out)
    assert "adapter directory" in run("merge", "--base", str(BASE), "--adapter", str(tmp_path / "nope"), "--out", out)
    assert "is the base model or adapter directory" in run("merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(BASE))
    (tmp_path / "empty").mkdir()
    assert "adapter_config.json not found" in run("merge", "--base", str(BASE), "--adapter", str(tmp_path / "empty"), "--out", out)
    bad = copy_adapter(tmp_path)
    edit_config(bad, r=8)
    assert "gives r̂=" in run("merge", "--base", str(BASE), "--adapter", str(bad), "--out", out)
    assert not (tmp_path / "out").exists()  # nothing written when the adapter does not fit
    assert "config.json not found" in run("merge", "--base", str(tmp_path / "empty"), "--adapter", str(ADAPTER), "--out", out)
    assert "DoRA" in run("info", str(_with_config(tmp_path, use_dora=True)))


def _with_config(tmp_path, **changes):
    directory = pathlib.Path(shutil.copytree(ADAPTER, tmp_path / "changed"))
    edit_config(directory, **changes)
    return directory


def test_cli_info(capsys):
    assert main(["info", str(ADAPTER)]) == 0
    text = capsys.readouterr().out
    assert "MoRA, type 6" in text and "r=4" in text
    assert "model.layers.*.self_attn.q_proj: r̂=22" in text and "model.layers.*.mlp.up_proj: r̂=30" in text
    assert "adapted modules: 14" in text
    assert "trainable parameters: 8,936" in text  # 2 layers x (22² x 2 + 20² x 2 + 30² x 3)


def test_cli_info_lora(tmp_path, capsys, base):
    config = mj.LoRAConfig(r=4, alpha=8.0, rslora=True, targets=r".*/(q|down)_proj/kernel")
    save_adapter(tmp_path / "lora", config, mj.init_adapters(base[1], config, jax.random.key(0)))
    assert main(["info", str(tmp_path / "lora")]) == 0
    text = capsys.readouterr().out
    assert "LoRA, r=4, alpha=8, scale=4 (rsLoRA)" in text and "adapted modules: 4" in text
    assert "model.layers.*.mlp.down_proj: 2 x in=172, out=64" in text
    assert "trainable parameters: 2,912" in text  # 2 layers x r=4 x ((64 + 64) + (172 + 64))


def test_cli_process_exit_status(tmp_path):
    """Run as a real process: a user error exits 1 with one line on stderr and no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "mora_jax.cli", "merge", "--base", str(tmp_path / "nope"), "--adapter", str(ADAPTER),
         "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr

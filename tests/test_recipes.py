"""End to end: offline pretraining and fine-tuning runs, their artifacts, exact resume after SIGKILL,
SIGTERM preemption and the NaN stop."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import c4_pretrain, math_finetune
from mora_jax import data as data_lib
from mora_jax import assembly, hf, loop, recipes
from mora_jax.checkpoint.workdir_lock import LOCK_FILE
from mora_jax.run_config import RunConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    data_lib.write_synthetic_corpus(d / "corpus.txt", 1500, seed=0)
    data_lib.write_synthetic_corpus(d / "corpus_eval.txt", 100, seed=1)
    data_lib.write_synthetic_math(d / "math_train.jsonl", 300, seed=0)
    data_lib.write_synthetic_math(d / "math_eval.jsonl", 30, seed=1)
    data_lib.train_tokenizer(str(d / "corpus.txt"), str(d / "tok"), vocab_size=512)
    return d


def _pretrain_config(corpus, workdir, **train):
    c = c4_pretrain.get_config("tiny")
    c.workdir = str(workdir)
    c.data.source = str(corpus / "corpus.txt")
    c.data.eval_source = str(corpus / "corpus_eval.txt")
    c.data.tokenizer = str(corpus / "tok.model")
    c.train.progress = False
    for k, v in train.items():
        c.train[k] = v
    return c


def _losses(workdir):
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_offline_pretraining_run_artifacts_and_remora(corpus, tmp_path, monkeypatch):
    config = _pretrain_config(corpus, tmp_path / "run")
    export, locked_during_export = recipes.export, []

    def export_and_check_the_lock(*args):
        locked_during_export.append((tmp_path / "run" / LOCK_FILE).exists())
        export(*args)

    monkeypatch.setattr(recipes, "export", export_and_check_the_lock)
    result = recipes.pretrain(config)
    # the workdir stayed locked until the last exported file, and was released after it
    assert locked_during_export == [True] and not (tmp_path / "run" / LOCK_FILE).exists()
    assert int(result.state.step) == config.train.steps and not result.preempted
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    merges = [(r["step"], r["mora_type"]) for r in rows if r.get("remora_merge")]
    assert merges == [(10, 2), (20, 3)]  # ReMoRA every 10 steps, cycling 1 -> 2 -> 3 (none at the last step)
    losses = _losses(tmp_path / "run")
    assert losses[30] < losses[5] - 0.5
    assert [r["step"] for r in rows if "eval_loss" in r] == [10, 20, 30]
    for name in ("loss_curve.png", "run_config.json", "metrics.jsonl", "export/adapter/adapter_config.json",
                 "export/merged/config.json", "export/merged/model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    assert list((tmp_path / "run" / "tensorboard").iterdir())
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["run"]["adapter"]["r"] == 8 and "trainable parameters" in saved["summary"]
    # The merged export equals the trained model (adapters in effect), and the PEFT adapter loads back.
    model, merged = hf.load_llama(tmp_path / "run" / "export" / "merged")
    ids = np.arange(32, dtype=np.int32).reshape(2, 16) % 500
    from mora_jax import training

    np.testing.assert_allclose(model.apply({"params": merged}, ids),
                               training.logits_fn(model, result.state, ids), atol=1e-4)
    adapter_config, adapters = hf.load_adapter(tmp_path / "run" / "export" / "adapter", result.state.params())
    assert adapter_config.mora_type == 3 and adapter_config.r == 8


def test_finetuning_run_trains_on_responses(corpus, tmp_path):
    c = math_finetune.get_config("tiny")
    c.workdir = str(tmp_path / "ft")
    c.data.source = str(corpus / "math_train.jsonl")
    c.data.eval_source = str(corpus / "math_eval.jsonl")
    c.data.tokenizer = str(corpus / "tok.model")
    c.train.progress = False
    result = recipes.finetune(c)
    losses = _losses(tmp_path / "ft")
    assert losses[max(losses)] < losses[min(losses)]
    assert result.final_eval["eval_tokens"] > 0
    assert (tmp_path / "ft" / "export" / "merged" / "model.safetensors").exists()


def _launch(corpus, workdir, *extra):
    cmd = [sys.executable, "-m", "train.pretrain", "--config=configs/c4_pretrain.py:tiny",
           f"--config.workdir={workdir}", f"--config.data.source={corpus / 'corpus.txt'}",
           f"--config.data.eval_source={corpus / 'corpus_eval.txt'}", f"--config.data.tokenizer={corpus / 'tok.model'}",
           "--config.train.progress=False", "--config.train.log_every=1", "--config.train.steps=24",
           "--config.checkpoint.every=4", "--config.train.eval_every=0", "--config.export.merged=False", *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(workdir, step, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and max(_losses(workdir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
def test_resume_after_sigkill_is_exact_across_a_merge(corpus, tmp_path):
    reference = _launch(corpus, tmp_path / "ref")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    expected = _losses(tmp_path / "ref")
    assert len(expected) == 24

    killed = _launch(corpus, tmp_path / "run")
    _wait_for_step(tmp_path / "run", 14, killed)  # past the merge at step 10 and the checkpoint at 12
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    resumed = _launch(corpus, tmp_path / "run")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resumed from step" in out
    got = _losses(tmp_path / "run")
    assert sorted(got) == sorted(expected)
    np.testing.assert_array_equal([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)])


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(corpus, tmp_path):
    proc = _launch(corpus, tmp_path / "run", "--config.checkpoint.every=1000")
    _wait_for_step(tmp_path / "run", 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "SIGTERM: saving a checkpoint" in out and "preempted" in out
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 3


def _poison_lr_from(monkeypatch, first_bad_step):
    from mora_jax import schedules

    real = schedules.make_schedule

    def poisoned(optim, **kwargs):  # the learning rate becomes NaN from `first_bad_step` on
        base = real(optim, **kwargs)
        return lambda step: jax.numpy.where(step >= first_bad_step, jax.numpy.nan, base(step))

    monkeypatch.setattr(schedules, "make_schedule", poisoned)


@pytest.mark.parametrize("log_every", [1, 5])
def test_non_finite_update_stops_the_run_and_is_never_checkpointed(corpus, tmp_path, monkeypatch, log_every):
    # The 7th update (state.step 6) is NaN; its loss, computed before the update, is still finite.
    # The updated parameters' norm gives it away before step 7 is saved, whatever the log period.
    _poison_lr_from(monkeypatch, 6)
    config = _pretrain_config(corpus, tmp_path / "nan", steps=12, log_every=log_every, eval_every=0)
    config.checkpoint.every = 1
    config.checkpoint.keep = 2
    config.checkpoint.async_save = False
    with pytest.raises(loop.TrainingDiverged, match=r"trainables_norm became nan at step 7.*last good checkpoint is step 6"):
        recipes.pretrain(config)
    steps = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [5, 6]
    from mora_jax.checkpoint import Checkpointer

    with Checkpointer(tmp_path / "nan" / "checkpoints", mode="resume") as ckpt:
        info = ckpt.restore_metadata(6)
    assert info.step == 6
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_a_second_run_on_a_locked_workdir_is_refused_with_the_holder_named(corpus, tmp_path):
    import socket

    from mora_jax.checkpoint.workdir_lock import WorkdirLock, WorkdirLocked

    config = _pretrain_config(corpus, tmp_path / "busy", steps=6)
    with WorkdirLock(tmp_path / "busy"):  # the first run
        with pytest.raises(WorkdirLocked, match=f"in use by another run \\(pid {os.getpid()} on host {socket.gethostname()}"):
            recipes.pretrain(config)
        assert not (tmp_path / "busy" / "metrics.jsonl").exists()  # the refused run wrote nothing
    assert not (tmp_path / "busy" / "run.lock").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"optim.lr": -1e-3}, r"optim.lr must be a finite number > 0, got -0.001 \(a negative learning rate trains uphill\)"),
    ({"optim.lr": float("nan")}, r"optim.lr must be a finite number > 0, got nan"),
    ({"optim.clip_norm": -1.0}, r"optim.clip_norm must be >= 0 \(0 = no clipping\), got -1.0"),
    ({"train.batch_size": 7, "train.grad_accum": 2},
     r"train.batch_size=7 is not divisible by train.grad_accum=2: .*multiple of it \(e.g. \[2, 4, 6, 8\]\)"),
    ({"train.batch_size": 8, "train.grad_accum": 2},  # 4 rows per micro-batch over the 8 data-parallel devices
     r"train.batch_size=8 does not split over 2 micro-batches × 8 data-parallel shards .*multiple of 16"),
    ({"mesh.data": 3}, r"mesh data=3 × fsdp=1 × tensor=1 has 3 devices but there are 8"),
    ({"mesh.data": 2, "mesh.tensor": 2}, r"mesh data=2 × fsdp=1 × tensor=2 has 4 devices but there are 8"),
])
def test_settings_are_checked_before_anything_compiles(tmp_path, overrides, message):
    config = c4_pretrain.get_config("tiny")
    config.workdir = str(tmp_path / "never")
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    with pytest.raises(ValueError, match=message):
        assembly.make_mesh(RunConfig.from_dict(config))  # what assembling the run does first
    assert not (tmp_path / "never").exists()


def test_one_device_mesh_sizes_that_do_not_fit_are_refused():
    from mora_jax.mesh import MeshConfig, make_mesh

    with pytest.raises(ValueError, match="mesh data=2 × fsdp=1 × tensor=1 has 2 devices but there are 1; make the sizes multiply to 1"):
        make_mesh(MeshConfig(axis_sizes=(2, 1, 1)), devices=jax.devices()[:1])


@pytest.mark.slow
def test_resume_sets_a_damaged_checkpoint_aside_and_falls_back(corpus, tmp_path, capsys):
    from mora_jax.checkpoint import integrity

    config = _pretrain_config(corpus, tmp_path / "run", steps=6, eval_every=0, log_every=1)
    config.checkpoint.every = 2
    config.checkpoint.async_save = False
    config.export.adapter = False
    config.export.merged = False
    recipes.pretrain(config)
    expected = _losses(tmp_path / "run")
    checkpoints = tmp_path / "run" / "checkpoints"
    data = max((p for p in (checkpoints / "6" / "state").rglob("d/*")), key=lambda p: p.stat().st_size)
    data.write_bytes(bytes(data.stat().st_size))  # zeroed bytes: only the checksum can tell
    capsys.readouterr()

    config.train.steps = 8  # the same run, continued
    recipes.pretrain(config)
    out = capsys.readouterr().out
    damaged = [line for line in out.splitlines() if "is damaged" in line]
    assert len(damaged) == 1 and "checkpoint step 6 in" in damaged[0] and "does not match its checksum" in damaged[0]
    assert "resumed from step 4" in out
    (moved,) = (checkpoints / integrity.DAMAGED_DIR).iterdir()
    assert moved.name.startswith("6-") and (moved / "state").is_dir()  # set aside, not deleted
    got = _losses(tmp_path / "run")
    assert sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(1, 7)] == [expected[s] for s in range(1, 7)]  # steps 5, 6 trained again, identically

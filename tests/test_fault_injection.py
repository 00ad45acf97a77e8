"""Fault injection: SIGKILL a tiny pretraining run at random moments, damage its newest checkpoint at
random, resume, and repeat. Whatever happens, the run must finish with exactly the losses of an
uninterrupted run, say in one line what it set aside, and never delete a good checkpoint.

Fixed seed, two kills, a bound on every wait: a few minutes on two CPU cores.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from mora_jax import data as data_lib
from mora_jax.checkpoint import integrity

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, EVERY = 16, 2
WAIT_S = 600


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    data_lib.write_synthetic_corpus(d / "corpus.txt", 1500, seed=0)
    data_lib.train_tokenizer(str(d / "corpus.txt"), str(d / "tok"), vocab_size=512)
    return d


class _Run:
    """One ``python -m train.pretrain`` process of the tiny config, its output collected as it comes."""

    def __init__(self, corpus, workdir: pathlib.Path):
        self.workdir = workdir
        cmd = [sys.executable, "-m", "train.pretrain", "--config=configs/c4_pretrain.py:tiny",
               f"--config.workdir={workdir}", f"--config.data.source={corpus / 'corpus.txt'}",
               "--config.data.eval_source=", f"--config.data.tokenizer={corpus / 'tok.model'}",
               "--config.train.progress=False", "--config.train.log_every=1", f"--config.train.steps={STEPS}",
               f"--config.checkpoint.every={EVERY}", "--config.checkpoint.keep=100",  # nothing is retired
               "--config.train.eval_every=0", "--config.export.adapter=False", "--config.export.merged=False"]
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for_step(self, step: int) -> None:
        """Until the run (after its resume and metrics truncation) has logged ``step``."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            started = "trainable parameters" in self.output()  # printed once metrics.jsonl is truncated
            if started and max(_losses(self.workdir), default=0) >= step:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended before step {step}:\n{self.output()[-3000:]}")
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"timed out waiting for step {step}")

    def kill(self) -> str:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self._reader.join(timeout=60)
        return self.output()

    def finish(self) -> str:
        self.proc.wait(timeout=WAIT_S)
        self._reader.join(timeout=60)
        assert self.proc.returncode == 0, self.output()[-3000:]
        return self.output()


def _losses(workdir) -> dict[int, float]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _steps(checkpoints: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.exists() else []


def _truncate_all(files):
    for f in files:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _zero(files):
    for f in files:
        data = bytearray(f.read_bytes())
        data[len(data) // 4: len(data) // 2 + 1] = bytes(len(data) // 2 + 1 - len(data) // 4)
        f.write_bytes(bytes(data))


def _damage(step_dir: pathlib.Path, kind: str) -> str:
    """Damage one checkpoint step the way a bad disk or an interrupted copy would; returns what was done.
    Changed bytes are only undetectable without a manifest, so a step without one gets a truncation."""
    data_files = sorted(p for p in (step_dir / "state").rglob("d/*") if p.is_file())
    sealed = (step_dir / integrity.MANIFEST_FILE).exists()
    if kind == "zeroed bytes" and not sealed:
        kind = "truncated state"
    if kind == "truncated frozen" and not (step_dir / "frozen").is_dir():
        kind = "truncated state"
    if kind == "zeroed bytes":
        _zero(data_files)
    elif kind == "truncated state":
        _truncate_all(data_files)
    elif kind == "truncated frozen":
        _truncate_all(sorted(p for p in (step_dir / "frozen").rglob("d/*") if p.is_file()))
    elif kind == "missing meta":
        shutil.rmtree(step_dir / "meta")
    elif kind == "empty step dir":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    return kind


@pytest.mark.slow
def test_random_kills_and_checkpoint_damage_lose_nothing(corpus, tmp_path):
    rng = random.Random(8)  # kills at steps 8 and 10 (the ReMoRA merge), an emptied step dir, then zeroed bytes
    workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    reference = _Run(corpus, tmp_path / "reference")  # alongside the first attempt
    run = _Run(corpus, workdir)
    good: set[int] = set()  # steps whose latest save was seen intact (a damaged step leaves it until saved anew)
    damaged: list[int] = []  # every step this test damaged; a resumed run may later save that step again
    kill_at = sorted(rng.sample(range(5, STEPS - 1), 2))
    kinds = ["truncated state", "zeroed bytes", "missing meta", "empty step dir", "truncated frozen", "none"]
    for target, kind in zip(kill_at, rng.sample(kinds, len(kill_at))):
        run.wait_for_step(target)
        time.sleep(rng.uniform(0.0, 0.4))  # anywhere in a step: mid-update, mid-save, after a commit
        run.kill()
        steps = _steps(checkpoints)
        assert good <= set(steps), "a good checkpoint was deleted"
        kind = kind if steps else "none"
        newest = steps[-1] if steps else None
        if kind != "none":
            kind = _damage(checkpoints / str(newest), kind)
            damaged.append(newest)
        # Earlier damaged steps were moved aside, so a step dir present now is a fresh save.
        intact = sorted(set(steps) - ({newest} if kind != "none" else set()))
        good = (good | set(steps)) - ({newest} if kind != "none" else set())
        run = _Run(corpus, workdir)
        run.wait_for_step(min(target + 1, STEPS))
        out = run.output()
        assert "taking over the stale lock" in out  # the killed run could not release it
        damaged_lines = [line for line in out.splitlines() if "is damaged (" in line]
        if kind != "none":
            assert len(damaged_lines) == 1 and f"checkpoint step {newest} in" in damaged_lines[0], (kind, out[-3000:])
        else:
            assert damaged_lines == [], out[-3000:]
        expected_resume = f"resumed from step {intact[-1]}" if intact else "no intact checkpoint left"
        assert expected_resume in out, (kind, intact, out[-3000:])
    run.finish()
    reference.finish()
    expected, got = _losses(reference.workdir), _losses(workdir)
    assert sorted(got) == list(range(1, STEPS + 1)) and sorted(expected) == sorted(got)
    np.testing.assert_array_equal([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)])
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    loss_steps = [row["step"] for row in rows if "loss" in row]
    assert len(loss_steps) == len(set(loss_steps))  # no step logged twice
    final = set(_steps(checkpoints))
    assert good <= final, "a good checkpoint was deleted"
    aside = sorted(p.name for p in (checkpoints / integrity.DAMAGED_DIR).iterdir()) if damaged else []
    assert sorted(int(name.split("-")[0]) for name in aside) == sorted(damaged)  # moved aside, none deleted
    for step in final:  # (a step committed just before a kill may lack its manifest: unverified, not damaged)
        assert not integrity.check_step(checkpoints / str(step), step).damaged
    assert not (workdir / "run.lock").exists()


# ---------------------------------------------------------------------------------------------------
# In-process fault injection, one fault at a time (seconds each): a collapsed run, a NaN checkpoint
# without a manifest, a full disk, a merge gone non-finite, a finished run started again.
# ---------------------------------------------------------------------------------------------------


class _RandomBatches:
    """Random tokens, the same sequence every time (a fresh iterator replays it)."""

    def __init__(self, vocab=256, seed=0):
        self.rng, self.vocab = np.random.default_rng(seed), vocab

    def __iter__(self):
        return self

    def __next__(self):
        ids = self.rng.integers(0, self.vocab, (2, 16)).astype(np.int32)
        return {"input_ids": ids, "loss_mask": np.ones_like(ids)}


def _tiny():
    import dataclasses

    import jax

    from mora_jax.models.config import LLAMA_CONFIGS
    from mora_jax.models.llama import LlamaForCausalLM, init_params

    cfg = dataclasses.replace(LLAMA_CONFIGS["tiny"], num_hidden_layers=1)
    return LlamaForCausalLM(cfg), init_params(cfg, jax.random.key(0))


def _run_config(workdir, *, steps, every=2, keep=3, async_save=False, method="lora", remora_every=0, **train):
    import mora_jax as mj
    from mora_jax.remora import RemoraConfig
    from mora_jax.run_config import CheckpointConfig, OptimConfig, RunConfig, TrainConfig

    adapter = mj.LoRAConfig(r=2) if method == "lora" else mj.MoRAConfig(r=2, mora_type=1)
    return RunConfig(workdir=str(workdir), adapter=adapter, remora=RemoraConfig(every=remora_every),
                     optim=OptimConfig(lr=1e-3, warmup_steps=0, restart_warmup=1),
                     train=TrainConfig(steps=steps, batch_size=2, seq_len=16, log_every=1, progress=False, **train),
                     checkpoint=CheckpointConfig(every=every, keep=keep, async_save=async_save))


def _rows(workdir):
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def test_a_collapsed_run_names_a_checkpoint_from_before_it_kept_from_rotation(corpus, tmp_path, capsys):
    # The repro, shortened: lr 1e5 without clipping kills the tiny model within 3 steps (gradient
    # norm exactly 0, loss pinned at ln 512); every checkpoint after is finite and useless.
    from configs import c4_pretrain
    from train import runner

    def config(lr, checkpoints_kept):
        c = c4_pretrain.get_config("tiny")
        c.workdir = str(tmp_path / "run")
        c.data.source, c.data.eval_source = str(corpus / "corpus.txt"), ""
        c.data.tokenizer = str(corpus / "tok.model")
        c.train.progress, c.train.steps, c.train.log_every = False, 30 if lr > 1 else 6, 1
        c.optim.lr, c.optim.warmup_steps, c.optim.clip_norm, c.optim.decay = lr, 29 if lr > 1 else 2, 0.0, "constant"
        c.checkpoint.every, c.checkpoint.keep, c.checkpoint.async_save = 1, checkpoints_kept, False
        c.export.adapter = False
        return c

    with pytest.raises(SystemExit) as stop:
        runner.run_task(config(1e5, 1), "pretrain")
    line = str(stop.value.code)
    checkpoints = tmp_path / "run" / "checkpoints"
    losses = _losses(tmp_path / "run")
    onset = min(s for s, r in ((r["step"], r) for r in _rows(tmp_path / "run")) if r.get("grad_norm") == 0.0)
    assert onset >= 3 and losses[onset] == pytest.approx(np.log(512), rel=1e-4)
    assert line.startswith(f"pretrain: error: the run collapsed at step {onset}: the gradient norm has been 0 for "
                           "5 steps in a row") and "pinned at ln(vocab) = 6.2383" in line, line
    good = onset - 2  # step `onset` was computed on checkpoint onset-1: that one is dead already
    kept = _steps(checkpoints)
    assert good in kept and max(kept) == onset + 3  # keep=1, yet the good one was held from rotation
    assert f"the last good checkpoint is step {good} in {checkpoints}" in line
    move = f"mkdir -p {checkpoints}/unhealthy && mv {checkpoints}/{onset + 3} {checkpoints}/unhealthy/"
    assert move in line and "\n" not in line
    # Following the advice works: the dead checkpoint aside, a sane learning rate, the same command.
    (checkpoints / "unhealthy").mkdir()
    (checkpoints / str(onset + 3)).rename(checkpoints / "unhealthy" / str(onset + 3))
    result = runner.run_task(config(3e-3, 1), "pretrain")
    assert f"resumed from step {good}" in capsys.readouterr().out
    rows = _rows(tmp_path / "run")
    assert int(result.state.step) == 6 and min(r["grad_norm"] for r in rows if "grad_norm" in r) > 0


def test_without_an_earlier_checkpoint_the_collapse_says_none_is_left(tmp_path):
    from mora_jax import loop
    from mora_jax.run_config import OptimConfig

    model, params = _tiny()
    config = _run_config(tmp_path / "run", steps=12, every=3, keep=3)
    config = config.__class__(**{**config.__dict__, "optim": OptimConfig(lr=1e5, warmup_steps=0, clip_norm=0.0)})
    with pytest.raises(loop.TrainingCollapsed) as stop:
        loop.run(model, params, config, train_batches=_RandomBatches())
    onset = int(str(stop.value).split("collapsed at step ")[1].split(":")[0])
    assert onset <= 3 and "no good checkpoint is left" in str(stop.value)
    assert "start again with a lower learning rate" in str(stop.value)


def test_a_loss_spike_holds_the_checkpoint_before_it_until_the_run_recovers(tmp_path, capsys, monkeypatch):
    from mora_jax import loop
    from mora_jax import steps as steps_lib

    train = steps_lib.Steps.train

    def spike_at_steps_9_to_11(self, state, batch):  # as a model an update damaged for a while
        completed = int(state.step)  # (the state is donated to the step)
        new_state, metrics = train(self, state, batch)
        if completed in (8, 9, 10):
            metrics = dict(metrics, loss=metrics["loss"] + 5.0)
        return new_state, metrics

    monkeypatch.setattr(steps_lib.Steps, "train", spike_at_steps_9_to_11)
    model, params = _tiny()
    seen = {}
    config = _run_config(tmp_path / "run", steps=20, every=2, keep=1, spike_window=20)  # judged after 5 steps

    def record(step, state, log):
        seen[step] = _steps(tmp_path / "run" / "checkpoints")

    loop.run(model, params, config, train_batches=_RandomBatches(), callbacks=[record])
    out = capsys.readouterr().out
    assert "warning: the loss spiked at step 9: 3 losses in a row (steps 9-11)" in out and "robust z-score" in out
    assert f"the last good checkpoint is step 6 in {tmp_path / 'run' / 'checkpoints'}" in out  # 8 computed step 9
    assert "the run recovered from the problem seen at step 9 (spike): 5 healthy steps in a row" in out
    assert 6 in seen[13] and 6 not in seen[20]  # held while unhealthy (keep=1), rotated once recovered
    assert _steps(tmp_path / "run" / "checkpoints") == [20]


def test_a_manifest_less_checkpoint_holding_nan_is_set_aside_not_trained_on(tmp_path, capsys):
    import jax

    from mora_jax import loop
    from mora_jax.checkpoint import Checkpointer
    from mora_jax.checkpoint import integrity as checkpoint_integrity

    model, params = _tiny()
    workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    first = loop.run(model, params, _run_config(workdir, steps=2), train_batches=_RandomBatches())
    with Checkpointer(checkpoints, mode="resume") as ckpt:  # step 4: step 2's state with NaN bytes in it
        state, data_state, meta = ckpt.restore(2, abstract_state=jax.eval_shape(lambda: first.state),
                                               initial_frozen=first.state.frozen)
        poisoned = state.replace(step=state.step + 2,
                                 trainables=jax.tree_util.tree_map(lambda x: x * np.nan, state.trainables))
        ckpt.save(4, poisoned, data_state=data_state, meta=meta, frozen_changed=False, force=True)
    (checkpoints / "4" / checkpoint_integrity.MANIFEST_FILE).unlink()  # as after a kill before the seal
    assert checkpoint_integrity.check_step(checkpoints / "4", 4).status == "unverified"
    capsys.readouterr()
    result = loop.run(model, params, _run_config(workdir, steps=6), train_batches=_RandomBatches())
    out = capsys.readouterr().out
    assert "checkpoint step 4 in" in out and "is damaged (it holds NaN or infinite values (['trainables']" in out
    assert "resumed from step 2" in out and int(result.state.step) == 6
    assert [p.name.split("-")[0] for p in (checkpoints / checkpoint_integrity.DAMAGED_DIR).iterdir()] == ["4"]
    assert all(np.isfinite(r["loss"]) for r in _rows(workdir) if "loss" in r)


_ENOSPC_FROM_TENSORSTORE = ("RESOURCE_EXHAUSTED: Error writing \"trainables.x/0\" in OCDBT database at local file "
                            "\"/ckpt/4.orbax-checkpoint-tmp/state/\": Failed writing: \"d/1a2b\": Failed to write 54839 "
                            "bytes to file 11: No space left on device [os_error_code='28']")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_disk_during_a_save_is_reported_once_and_keeps_the_last_good_checkpoint(tmp_path, capfd, monkeypatch,
                                                                                     async_save):
    from orbax.checkpoint._src.serialization import serialization

    from mora_jax import loop
    from mora_jax.checkpoint import integrity as checkpoint_integrity
    from mora_jax.checkpoint import workdir_lock
    from mora_jax.errors import UserError

    real_write = serialization.async_serialize_from_host

    async def write(*args, **kwargs):  # TensorStore's error, as a real full disk gives it (tmpfs, 3 MiB)
        if any("checkpoints/4." in str(a) or "checkpoints/6." in str(a) for a in (*args, *kwargs.values())):
            raise ValueError(_ENOSPC_FROM_TENSORSTORE)  # the disk is full from the save of step 4 on
        return await real_write(*args, **kwargs)

    monkeypatch.setattr(serialization, "async_serialize_from_host", write)
    model, params = _tiny()
    workdir, checkpoints = tmp_path / "run", tmp_path / "run" / "checkpoints"
    with pytest.raises(UserError) as stop:
        loop.run(model, params, _run_config(workdir, steps=12, async_save=async_save), train_batches=_RandomBatches())
    message = str(stop.value)
    assert message.startswith(f"saving checkpoint step 4 to {checkpoints} failed: No space left on device ("), message
    assert "free on the file system of" in message and "a checkpoint takes about" in message
    assert "the last good checkpoint is step 2 (kept)" in message and "Free some space" in message
    assert "\n" not in message
    assert max(r["step"] for r in _rows(workdir)) <= 6  # stopped at once, not at the end of the run
    assert _steps(checkpoints) == [2] and checkpoint_integrity.check_step(checkpoints / "2", 2).status == "verified"
    assert not (workdir / workdir_lock.LOCK_FILE).exists()
    err = capfd.readouterr().err
    assert "Traceback" not in err.split("Error writing")[-1] if "Error writing" in err else True


def test_a_full_disk_while_writing_metrics_is_one_line(tmp_path, monkeypatch):
    import errno

    from mora_jax import loop
    from mora_jax import metrics as metrics_lib

    write = metrics_lib.MetricsWriter.write

    def full_at_step_3(self, step, values, **kwargs):
        if step >= 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return write(self, step, values, **kwargs)

    monkeypatch.setattr(metrics_lib.MetricsWriter, "write", full_at_step_3)
    model, params = _tiny()
    with pytest.raises(loop.DiskFull) as stop:
        loop.run(model, params, _run_config(tmp_path / "run", steps=8), train_batches=_RandomBatches())
    message = str(stop.value)
    assert message.startswith(f"writing {tmp_path / 'run' / 'metrics.jsonl'} failed: No space left on device (")
    assert "the last good checkpoint is step 2" in message and "\n" not in message


def test_a_merge_that_makes_the_frozen_weights_non_finite_stops_before_they_are_saved(tmp_path, monkeypatch):
    import jax

    from mora_jax import loop, remora

    real_merge = remora.merge_and_reset

    def overflowing_merge(state, **kwargs):  # e.g. a bfloat16 overflow of W + ΔW
        merged = real_merge(state, **kwargs)
        return merged.replace(frozen=jax.tree_util.tree_map(lambda w: w * np.inf, merged.frozen))

    monkeypatch.setattr(remora, "merge_and_reset", overflowing_merge)
    model, params = _tiny()
    workdir = tmp_path / "run"
    config = _run_config(workdir, steps=8, every=1, method="mora", remora_every=3)
    with pytest.raises(loop.TrainingDiverged) as stop:
        loop.run(model, params, config, train_batches=_RandomBatches())
    message = str(stop.value)
    assert message.startswith("the ReMoRA merge after step 3 made the frozen weights non-finite (['lm_head']")
    assert "stopping before they are saved or trained on" in message
    assert f"the last good checkpoint is step 2 in {workdir / 'checkpoints'}" in message and "\n" not in message
    assert _steps(workdir / "checkpoints") == [1, 2]  # step 3 (after the merge) never saved
    assert not any((workdir / "checkpoints" / str(s) / "frozen").exists() for s in (1, 2))


def test_a_finished_run_started_again_logs_no_second_final_evaluation(tmp_path):
    from mora_jax import loop

    model, params = _tiny()
    config = _run_config(tmp_path / "run", steps=4, eval_every=3)
    evaluations = lambda: iter([next(_RandomBatches(seed=1)) for _ in range(2)])  # noqa: E731
    first = loop.run(model, params, config, train_batches=_RandomBatches(), eval_batches=evaluations)
    for _ in range(2):
        again = loop.run(model, params, config, train_batches=_RandomBatches(), eval_batches=evaluations)
    evals = [r["step"] for r in _rows(tmp_path / "run") if "eval_loss" in r]
    assert evals == [3, 4]  # the one at 3 (eval_every) and the final one, once each
    assert again.final_eval["eval_loss"] == first.final_eval["eval_loss"]

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

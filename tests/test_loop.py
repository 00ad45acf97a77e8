"""The loop with a relative workdir (as the README's commands give it): checkpoints are written and
a second run resumes from them."""

import dataclasses

import jax
import numpy as np
import pytest

import mora_jax as mj
from mora_jax import loop
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, init_params
from mora_jax.run_config import CheckpointConfig, OptimConfig, RunConfig, TrainConfig


class _Batches:
    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __next__(self):
        ids = self.rng.integers(0, 256, (2, 16)).astype(np.int32)
        return {"input_ids": ids, "loss_mask": np.ones_like(ids)}


def test_relative_workdir_checkpoints_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = dataclasses.replace(LLAMA_CONFIGS["tiny"], num_hidden_layers=1)
    model = LlamaForCausalLM(cfg)
    params = init_params(cfg, jax.random.key(0))

    def config(steps):
        return RunConfig(workdir="runs/rel", adapter=mj.LoRAConfig(r=2),
                         optim=OptimConfig(lr=1e-3, warmup_steps=0),
                         train=TrainConfig(steps=steps, batch_size=2, seq_len=16, log_every=1, progress=False),
                         checkpoint=CheckpointConfig(every=2, async_save=False))

    first = loop.run(model, params, config(4), train_batches=_Batches())
    assert sorted(p.name for p in (tmp_path / "runs/rel/checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    second = loop.run(model, params, config(6), train_batches=_Batches())
    assert int(first.state.step) == 4 and int(second.state.step) == 6
    assert [r["step"] for r in second.history if "loss" in r] == [1, 2, 3, 4, 5, 6]  # no step twice


def test_sigterm_on_a_step_just_saved_on_schedule_stops_without_saving_it_twice(tmp_path):
    import os
    import signal

    cfg = dataclasses.replace(LLAMA_CONFIGS["tiny"], num_hidden_layers=1)
    model = LlamaForCausalLM(cfg)
    params = init_params(cfg, jax.random.key(0))
    config = RunConfig(workdir=str(tmp_path / "run"), adapter=mj.LoRAConfig(r=2),
                       optim=OptimConfig(lr=1e-3, warmup_steps=0),
                       train=TrainConfig(steps=10, batch_size=2, seq_len=16, log_every=1, progress=False),
                       checkpoint=CheckpointConfig(every=2, async_save=False))

    def preempt_at_step_4(step, state, log):  # runs before step 4's scheduled save
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    result = loop.run(model, params, config, train_batches=_Batches(), callbacks=[preempt_at_step_4])
    assert result.preempted and int(result.state.step) == 4
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]


def test_throughput_lines_leave_out_the_compiling_first_step(tmp_path, capsys):
    """The first step compiles: it is timed on its own (one line says how long) and left out of the
    throughput; later lines give tokens_per_s (loss tokens) and positions_per_s (every position)."""
    cfg = dataclasses.replace(LLAMA_CONFIGS["tiny"], num_hidden_layers=1)

    class HalfInLoss(_Batches):
        def __next__(self):
            batch = super().__next__()
            batch["loss_mask"][:, :8] = 0  # a prompt: half of every row outside the loss
            return batch

    config = RunConfig(workdir=str(tmp_path / "run"), adapter=mj.LoRAConfig(r=2), optim=OptimConfig(lr=1e-3, warmup_steps=0),
                       train=TrainConfig(steps=3, batch_size=2, seq_len=16, log_every=1, progress=False),
                       checkpoint=CheckpointConfig(every=0))
    result = loop.run(LlamaForCausalLM(cfg), init_params(cfg, jax.random.key(0)), config, train_batches=HalfInLoss())
    rows = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "tokens_per_s" not in rows[0] and "positions_per_s" not in rows[0]
    for row in rows[1:]:  # 2 x 16 positions a step, 2 x 7 in the loss (the last has no next token)
        assert row["positions_per_s"] == pytest.approx(32 / 14 * row["tokens_per_s"])
    assert "first train step:" in capsys.readouterr().out

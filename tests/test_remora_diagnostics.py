"""Diagnostics that make ReMoRA visible: ‖ΔW‖ per layer type and the rank of the accumulated change."""

import dataclasses
import json

import jax
import numpy as np

import mora_jax as mj
from mora_jax import loop, remora_diagnostics
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, init_params
from mora_jax.remora import RemoraConfig
from mora_jax.run_config import CheckpointConfig, OptimConfig, RunConfig, TrainConfig


def test_rank_of_counts_directions():
    rng = np.random.default_rng(0)
    low = rng.normal(size=(12, 3)) @ rng.normal(size=(3, 10))
    assert remora_diagnostics.rank_of(low)[0] == 3
    assert 1.0 < remora_diagnostics.rank_of(low)[1] <= 3.0
    assert remora_diagnostics.rank_of(np.zeros((4, 5))) == (0, 0.0)
    assert remora_diagnostics.rank_of(np.stack([low, low]))[0] == 3  # a scanned stack: the mean


def test_delta_norms_are_the_norms_of_the_merged_change():
    params = init_params(LLAMA_CONFIGS["tiny"], jax.random.key(0))
    adapters = mj.init_adapters(params, mj.MoRAConfig(r=4, mora_type=1), jax.random.key(1))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.01, adapters)
    norms = remora_diagnostics.delta_norms(adapters)
    merged = mj.merge(params, adapters)
    expected = np.sqrt(sum(np.sum((np.asarray(merged["model"][f"layers_{i}"]["self_attn"]["q_proj"]["kernel"])
                                   - np.asarray(params["model"][f"layers_{i}"]["self_attn"]["q_proj"]["kernel"])) ** 2)
                           for i in range(LLAMA_CONFIGS["tiny"].num_hidden_layers)))
    np.testing.assert_allclose(norms["merge_delta_norm/q_proj"], expected, rtol=1e-4)
    assert set(norms) == {f"merge_delta_norm/{k}_proj" for k in ("q", "k", "v", "o", "gate", "up", "down")}
    np.testing.assert_allclose(remora_diagnostics.delta_norms(adapters, params)["merge_delta_norm/q_proj"], expected,
                               rtol=1e-4)


def test_delta_norms_with_the_kernels_are_what_the_merge_writes_for_hira():
    """HiRA's update is K ⊙ (A·B): its adapter alone does not know it; with the frozen kernels the norm
    is the merge's own change."""
    from mora_jax.methods import HiRAConfig

    params = init_params(LLAMA_CONFIGS["tiny"], jax.random.key(0))
    adapters = mj.init_adapters(params, HiRAConfig(r=4), jax.random.key(1))
    adapters = jax.tree_util.tree_map(lambda x: x + 0.05, adapters)
    merged = mj.merge(params, adapters)
    expected = np.sqrt(sum(np.sum((np.asarray(merged["model"][f"layers_{i}"]["mlp"]["up_proj"]["kernel"])
                                   - np.asarray(params["model"][f"layers_{i}"]["mlp"]["up_proj"]["kernel"])) ** 2)
                           for i in range(LLAMA_CONFIGS["tiny"].num_hidden_layers)))
    with_kernels = remora_diagnostics.delta_norms(adapters, params)["merge_delta_norm/up_proj"]
    np.testing.assert_allclose(with_kernels, expected, rtol=1e-4)
    assert abs(remora_diagnostics.delta_norms(adapters)["merge_delta_norm/up_proj"] - expected) > 0.1 * expected


class _Batches:
    def __init__(self, vocab):
        self.rng, self.vocab = np.random.default_rng(0), vocab

    def __iter__(self):
        return self

    def __next__(self):
        ids = self.rng.integers(0, self.vocab, (4, 16)).astype(np.int32)
        return {"input_ids": ids, "loss_mask": np.ones_like(ids)}


def _run(tmp_path, adapter, every=3, steps=9):
    cfg = dataclasses.replace(LLAMA_CONFIGS["tiny"], num_hidden_layers=1)
    model = LlamaForCausalLM(cfg)
    config = RunConfig(workdir=str(tmp_path), adapter=adapter,
                       remora=RemoraConfig(every=every), optim=OptimConfig(lr=1e-2, warmup_steps=0, restart_warmup=1),
                       train=TrainConfig(steps=steps, batch_size=4, seq_len=16, log_every=1, progress=False),
                       checkpoint=CheckpointConfig(every=0))
    loop.run(model, init_params(cfg, jax.random.key(0)), config, train_batches=_Batches(cfg.vocab_size))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("remora_merge")]


def test_relora_rank_one_merges_accumulate_rank(tmp_path):
    # LoRA r=1: each merge adds one direction, so the change since the start has rank = merges so far.
    merges = _run(tmp_path, mj.LoRAConfig(r=1, alpha=1.0))
    assert [m["step"] for m in merges] == [3, 6]
    rank_keys = sorted(k for k in merges[0] if k.startswith("accumulated_rank/"))
    assert len(rank_keys) == 2
    assert [merges[0][k] for k in rank_keys] == [1, 1] and [merges[1][k] for k in rank_keys] == [2, 2]
    assert all(merges[0][f"merge_delta_norm/{k}_proj"] > 0 for k in ("q", "down"))


def test_remora_merges_cycle_types_and_exceed_one_adapters_rank(tmp_path):
    merges = _run(tmp_path, mj.MoRAConfig(r=1, mora_type=1), every=2, steps=7)
    assert [m["mora_type"] for m in merges] == [2, 3, 4]
    key = next(k for k in merges[0] if k.startswith("accumulated_rank/"))
    assert merges[-1][key] > merges[0][key]  # fresh high-rank updates of new types add up

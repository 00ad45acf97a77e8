"""Generation cost and its benchmark on the tiny preset: a cached decode step's compiled FLOPs do not
grow with the prefix the way re-encoding it would, ``lower_prefill`` is the prefill ``generate``
runs, and ``train.benchmark --generation`` writes its JSON (no timing is asserted)."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mora_jax as mj
from mora_jax.bench import generation
from mora_jax.bench.runners import xla_flops
from mora_jax.generate import left_pad, lower_decode_step, lower_prefill
from mora_jax.models.config import LLAMA_CONFIGS
from mora_jax.models.llama import LlamaForCausalLM, init_params


@pytest.fixture(scope="module")
def tiny():
    config = LLAMA_CONFIGS["tiny"]  # max_position_embeddings 128
    return LlamaForCausalLM(config), init_params(config, jax.random.key(0))


def test_decode_step_flops_do_not_grow_like_re_encoding(tiny):
    """``generate`` sizes its cache to prompt + new tokens - 1 slots (not to the model's maximum
    length), and a step attends over every slot under a mask, so the step's FLOPs do depend on the
    prefix, through the attention read only: they are affine in the cache length with a constant
    dense part, while a prefill (re-encoding the prefix) grows at least linearly."""
    model, params = tiny
    lengths = (16, 64, 112)
    step = {n: xla_flops(lower_decode_step(model, params, batch_size=1, cache_length=n).compile()) for n in lengths}
    prefill = {n: xla_flops(lower_prefill(model, params, batch_size=1, prompt_length=n, max_new_tokens=1).compile())
               for n in lengths}
    short, mid, long = lengths
    # Affine in the cache length: the same increment for each 48 more slots, so the dense part
    # (projections, MLP, LM head of the one new token) is the same whatever the prefix.
    assert step[mid] - step[short] == pytest.approx(step[long] - step[mid], rel=0.02)
    per_slot = (step[long] - step[short]) / (long - short)
    dense = step[short] - per_slot * short
    assert dense > 0.7 * step[short]
    # The slope is the attention read of one cached slot: q·k and p·v (2·2·N·H per layer), times 2
    # for the mask and the softmax.
    c = model.config
    assert 0 < per_slot <= 2 * 4 * c.num_attention_heads * c.resolved_head_dim * c.num_hidden_layers
    # Re-encoding grows at least with the prefix (its attention, quadratically); the cached step barely.
    assert prefill[long] / prefill[short] >= long / short
    assert step[long] / step[short] < 1.5
    assert step[long] / step[short] < prefill[long] / prefill[short] / 4
    # A new token after 112 cached ones costs less than re-encoding 112 / 2 = 56 tokens' worth of work.
    assert prefill[long] / step[long] > long / 2


def test_lower_prefill_is_the_prefill_generate_runs(tiny):
    model, params = tiny
    rows = [list(np.random.default_rng(1).integers(0, 256, 9)), list(np.random.default_rng(2).integers(0, 256, 5))]
    ids, mask = left_pad(rows, pad_id=0)
    new = 4
    compiled = lower_prefill(model, params, batch_size=2, prompt_length=9, max_new_tokens=new).compile()
    logits, cache = compiled(params, None, jnp.asarray(ids), jnp.asarray(mask))
    out = mj.generate(model, params, ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    np.testing.assert_array_equal(np.argmax(np.asarray(logits), axis=-1), np.asarray(out)[:, 0])
    c = model.config
    assert len(cache) == c.num_hidden_layers
    assert cache[0].k.shape == (2, 9 + new - 1, c.resolved_kv_heads, c.resolved_head_dim)


def test_generation_settings_refuse_what_cannot_be_measured():
    with pytest.raises(ValueError, match="new_tokens >= 2"):
        generation.GenerationSettings(new_tokens=1)
    with pytest.raises(ValueError, match="batches"):
        generation.GenerationSettings(batches=())


def test_cli_generation_writes_its_json_and_table(tmp_path):
    out = tmp_path / "gen.json"
    proc = subprocess.run(
        [sys.executable, "-m", "train.benchmark", "--config", "configs/bench_tiny.py", "--generation",
         "--generation_batches=1,2", "--generation_prompt_len=8", "--generation_new_tokens=4",
         "--generation_repeats=1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=str(pathlib.Path(__file__).parents[1]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())  # valid JSON, no NaN/inf
    assert data["command"].startswith("python -m train.benchmark --config configs/bench_tiny.py --generation")
    assert set(data["provenance"]) >= {"commit", "packages", "machine", "date"}
    generation.validate_generation(data)
    assert data["dtype"] == "float32" and data["model"]["name"] == "tiny" and data["model"]["params"] == 123_712
    gen = data["generation"]
    assert gen["settings"] == {"batches": [1, 2], "prompt_len": 8, "new_tokens": 4, "repeats": 1, "warmup": 1,
                               "flops_long": 128}
    assert [row["batch"] for row in gen["rows"]] == [1, 2]
    for row in gen["rows"]:
        assert set(row) == set(generation.GENERATION_ROW)
        assert (row["prompt_len"], row["new_tokens"], row["decode_steps"], row["cache_len"]) == (8, 4, 3, 11)
        assert len(row["prefill_s_all"]) == len(row["generate_s_all"]) == 1
        assert row["prefill_tokens_per_s"] == pytest.approx(row["batch"] * 8 / row["prefill_s"])
        assert row["decode_s_per_step"] == pytest.approx((row["generate_s"] - row["prefill_s"]) / 3)
        if row["decode_tokens_per_s"] is not None:  # None only if noise made generate faster than its prefill
            assert row["decode_tokens_per_s"] == pytest.approx(row["batch"] / row["decode_s_per_step"])
        assert row["prefill_flops"] > row["decode_step_flops"] > 0
    assert gen["rows"][1]["decode_step_flops"] > gen["rows"][0]["decode_step_flops"]  # batch 2 does twice the work
    flops = gen["flops"]
    assert (flops["batch"], flops["short"], flops["long"]) == (1, 8, 128)
    assert flops["prefill_long_over_short"] == pytest.approx(flops["prefill"]["long"] / flops["prefill"]["short"])
    assert flops["decode_step_long_over_short"] < flops["prefill_long_over_short"] / 4
    assert all(math.isfinite(v) and v > 0 for v in (*flops["decode_step"].values(), *flops["prefill"].values()))
    table = out.with_suffix(".md").read_text()
    assert "decode tok/s" in table and "| decode step (1 new token" in table and "float32" in table
    assert "prefill tok/s" in proc.stdout


def test_cli_generation_refuses_the_flags_it_would_ignore(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train.benchmark", "--config", "configs/bench_tiny.py", "--generation", "--peer",
         "--out", str(tmp_path / "gen.json")],
        capture_output=True, text=True, timeout=300, cwd=str(pathlib.Path(__file__).parents[1]))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--generation and --peer do not combine" in proc.stderr and not (tmp_path / "gen.json").exists()

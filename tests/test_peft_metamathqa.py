"""Hugging Face PEFT's MetaMathQA protocol: the recipe's settings, PEFT's data splits and scoring,
and the tiny variant run end to end with its GSM8K-style accuracy."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from configs import peft_metamathqa
from mora_jax import accuracy, recipes
from mora_jax import data as data_lib
from mora_jax.data import metamathqa
from mora_jax.errors import ConfigError
from mora_jax.methods import METHODS
from mora_jax.models import LLAMA_CONFIGS
from mora_jax.run_config import RunConfig
from train import prepare_metamathqa


def test_recipe_has_peft_settings():
    run = RunConfig.from_dict(peft_metamathqa.get_config())
    assert (run.train.steps, run.train.batch_size, run.train.seq_len, run.train.grad_accum) == (5000, 4, 768, 1)
    assert (run.optim.lr, run.optim.weight_decay, run.optim.warmup_steps, run.optim.decay) == (1e-4, 0.1, 500, "cosine")
    assert run.optim.clip_norm == 1.0 and run.model.dtype == "bfloat16"
    assert run.method == "lora" and (run.adapter.r, run.adapter.alpha) == (32, 64.0)
    assert run.data.prompt_template.format(query="1+1?") == "Question: 1+1? Think step by step.\nAnswer:"
    assert run.data.accuracy_max_new_tokens == 300 and run.data.format == "metamathqa"
    tpu = RunConfig.from_dict(peft_metamathqa.get_config("tpu"))
    assert LLAMA_CONFIGS[tpu.model.preset].hidden_size == 3072 and tpu.model.scan_layers


@pytest.mark.parametrize("method", [*METHODS, "mora1", "mora6"])
def test_every_method_is_a_variant(method):
    run = RunConfig.from_dict(peft_metamathqa.get_config(f"tpu,{method}"))
    assert run.method == method.rstrip("16")
    # PEFT's rates: 1e-5 for full fine-tuning, 4.5e-3 (and no weight decay) for HiRA, 1e-4 otherwise
    assert run.optim.lr == {"full": 1e-5, "hira": 4.5e-3}.get(method, 1e-4)
    assert run.optim.weight_decay == (0.0 if method == "hira" else 0.1)
    if method.startswith("mora") and method != "mora":
        assert run.adapter.mora_type == int(method[-1])
    assert RunConfig.from_dict(peft_metamathqa.get_config(method)).method == run.method


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match=r"unknown variant 'tiny,hira2'.*SIZE one of"):
        peft_metamathqa.get_config("tiny,hira2")


def test_peft_splits():
    long = {"query": "q" * 650, "response": "r" * 649}  # 650 + 1 + 649 = 1300 characters: kept
    kept = list(metamathqa.within_char_limit([long, {**long, "response": "r" * 650}, {"query": "a", "response": "b"}]))
    assert [len(r["response"]) for r in kept] == [649, 1]
    with pytest.raises(ValueError, match="record 0 has no query or response"):
        list(metamathqa.within_char_limit([{"question": "q"}]))
    np.random.seed(0)  # PEFT's own steps (data.py): global seed, shuffle, first 50
    expected = np.arange(7473)
    np.random.shuffle(expected)
    np.testing.assert_array_equal(metamathqa.valid_indices(7473), expected[:50])
    assert metamathqa.gsm8k_records([{"question": "q", "answer": "a\n#### 3"}]) == [{"query": "q", "response": "a\n#### 3"}]
    with pytest.raises(ValueError, match="GSM8K record 0 has no answer field"):
        metamathqa.gsm8k_records([{"question": "q"}])


def test_prepare_writes_the_splits_and_keeps_existing_files(tmp_path, capsys):
    (tmp_path / "mm.json").write_text(json.dumps([{"query": f"q{i}", "response": f"The answer is: {i}", "type": "x"}
                                                   for i in range(5)] + [{"query": "q" * 1400, "response": "r"}]))
    for split, n in (("train", 120), ("test", 7)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps({"question": f"{split}{i}", "answer": f"#### {i}"})
                                                         + "\n" for i in range(n)))
    argv = ["--metamathqa", str(tmp_path / "mm.json"), "--gsm8k-train", str(tmp_path / "train.jsonl"),
            "--gsm8k-test", str(tmp_path / "test.jsonl"), "--out", str(tmp_path / "out")]
    prepare_metamathqa.main(argv)
    out = tmp_path / "out"
    lines = {name: [json.loads(x) for x in (out / name).read_text().splitlines()] for name in prepare_metamathqa.OUTPUTS}
    assert lines["metamathqa_train.jsonl"][0] == {"query": "q0", "response": "The answer is: 0"}
    assert len(lines["metamathqa_train.jsonl"]) == 5 and len(lines["gsm8k_test.jsonl"]) == 7
    assert [r["query"] for r in lines["gsm8k_valid.jsonl"]] == [f"train{i}" for i in metamathqa.valid_indices(120)]
    before = (out / "gsm8k_test.jsonl").read_text()
    with pytest.raises(SystemExit):
        prepare_metamathqa.main(argv)
    assert "already exist" in capsys.readouterr().err and (out / "gsm8k_test.jsonl").read_text() == before
    with pytest.raises(SystemExit):
        prepare_metamathqa.main([*argv[:1], str(tmp_path / "missing.json"), *argv[2:], "--overwrite"])
    assert "missing.json: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("text,answer", [
    ("The answer is: 50%", "50"),  # GSM8K writes percentages without the sign
    ("The answer is: 10/4", "2.5"),  # fractions compared by value, as PEFT does
    ("The answer is 7!", "7"),
    ("The answer is: 3/0", "3/0"),
])
def test_peft_scoring_cases(text, answer):
    assert accuracy.extract_answer(text) == answer


def _tiny(math_data, tmp_path, variant="tiny"):
    c = peft_metamathqa.get_config(variant)
    c.workdir = str(tmp_path / "run")
    c.data.source = str(math_data / "math_train.jsonl")
    c.data.accuracy_source = str(math_data / "math_eval.jsonl")
    c.data.tokenizer = str(math_data / "tok.model")
    return c


def test_tiny_variant_trains_with_peft_prompt_and_scores_accuracy(math_data, tmp_path):
    c = _tiny(math_data, tmp_path)
    run = RunConfig.from_dict(c)
    tokenizer = data_lib.Tokenizer(math_data / "tok.model")
    train_batches, _ = recipes.build_data(run, "finetune", tokenizer)
    assert train_batches.config.prompt_template == peft_metamathqa.PEFT_TEMPLATE
    recipes.finetune(c)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "accuracy" in r]
    assert [r["step"] for r in scored] == [c.train.steps]  # scored once, after training (PEFT's test accuracy)
    assert scored[0]["accuracy_examples"] == 8 and 0.0 <= scored[0]["accuracy"] <= 100.0
    assert any("loss" in r for r in rows)


def test_a_bad_prompt_template_is_one_config_error(math_data, tmp_path):
    c = _tiny(math_data, tmp_path)
    c.data.prompt_template = "Question: {0}"
    with pytest.raises(ConfigError, match=re.escape("data.prompt_template: prompt template 'Question: {0}' must use named")):
        recipes.build_data(RunConfig.from_dict(c), "finetune", data_lib.Tokenizer(math_data / "tok.model"))

"""Exact-match answer accuracy during fine-tuning: GSM8K / MetaMathQA answer extraction, prompts
built as in training, and the math recipe logging ``accuracy`` beside the loss (JSONL, plot)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from configs import math_finetune
from mora_jax import accuracy, recipes
from mora_jax import data as data_lib
from mora_jax.models import LLAMA_CONFIGS, LlamaForCausalLM, init_params


@pytest.mark.parametrize("text,answer", [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("so she has 1,000 left.\n#### 1,000", "1000"),
    ("He has 3 + 4 = 7 apples. The answer is: 7", "7"),
    ("The answer is: $18.00.", "18"),
    ("The answer is: \\frac{1}{2}", "\\frac{1}{2}"),
    ("first #### 5 then the answer is: -3", "-3"),  # the last one stated
    ("no final answer here, just 42", None),
    ("#### ", None),
])
def test_extract_answer(text, answer):
    assert accuracy.extract_answer(text) == answer


def test_score_and_normalisation():
    assert accuracy.normalize_answer(" 1,234.50 ") == "1234.5" and accuracy.normalize_answer("+0.0") == "0"
    refs = ["x The answer is: 10", "#### 3", "The answer is: 2"]
    assert accuracy.score(["The answer is: 10.0", "#### 4", "nothing"], refs) == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="as many predictions"):
        accuracy.score([], refs)


def test_evaluator_prompts_are_the_training_prompts(math_data):
    tokenizer = data_lib.Tokenizer(math_data / "tok.model")
    config = data_lib.FinetuneDataConfig.metamathqa(192, 1, shuffle=False)
    records = accuracy.read_records(str(math_data / "math_eval.jsonl"), limit=5)
    assert len(records) == 5
    model = LlamaForCausalLM(LLAMA_CONFIGS["tiny"].replace(vocab_size=512, num_hidden_layers=1,
                                                           max_position_embeddings=256))
    evaluator = accuracy.AccuracyEvaluator(model, tokenizer, records, config, max_new_tokens=8, batch_size=2)
    assert len(evaluator) == 5 and evaluator.references[0] == accuracy.extract_answer(records[0]["response"])
    batch = next(iter(data_lib.finetune_batches(records[:1], tokenizer, config)))
    prompt_len = int(np.flatnonzero(batch["loss_mask"][0])[0]) + 1
    row = evaluator.input_ids[0][evaluator.attention_mask[0] == 1]
    np.testing.assert_array_equal(row, batch["input_ids"][0, :prompt_len])  # left-padded, same tokens
    params = init_params(model.config, jax.random.key(0))
    result = evaluator.evaluate(params)
    assert result["accuracy_examples"] == 5 and 0.0 <= result["accuracy"] <= 100.0
    assert len(evaluator.texts) == 5 and len(evaluator.predictions) == 5
    with pytest.raises(ValueError, match="none of the 1 held-out records can be scored"):
        accuracy.AccuracyEvaluator(model, tokenizer, [{"query": "q", "response": "no answer"}], config)


def test_math_recipe_logs_accuracy_beside_the_loss(math_data, tmp_path):
    c = math_finetune.get_config("tiny")
    c.workdir = str(tmp_path / "ft")
    c.data.source = str(math_data / "math_train.jsonl")
    c.data.eval_source = str(math_data / "math_eval.jsonl")  # the tiny config scores accuracy on it
    c.data.tokenizer = str(math_data / "tok.model")
    c.data.accuracy_examples = 4
    c.data.accuracy_max_new_tokens = 12
    c.train.steps = 4
    c.train.eval_every = 2
    c.train.progress = False
    c.checkpoint.every = 0
    c.export.merged = False
    recipes.finetune(c)
    rows = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in rows if "accuracy" in r}
    assert sorted(scored) == [2, 4]  # every eval_every steps and at the end
    assert all(r["accuracy_examples"] == 4 and 0.0 <= r["accuracy"] <= 100.0 for r in scored.values())
    assert any("loss" in r for r in rows) and (tmp_path / "ft" / "loss_curve.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.torch
def test_chat_config_trains_a_llama3_checkpoint_with_its_chat_template(math_data, tmp_path):
    import shutil

    tf = pytest.importorskip("tiny_families")
    pytest.importorskip("transformers")
    checkpoint = tmp_path / "llama3-instruct"
    tf.torch_model("llama3", max_position_embeddings=512).save_pretrained(checkpoint)
    tf.write_tokenizer(checkpoint)  # tokenizer.json + tokenizer_config.json with the Llama 3 chat template
    c = math_finetune.get_config("chat")
    c.workdir = str(tmp_path / "chat")
    c.model.hf_path = str(checkpoint)
    c.model.dtype = c.model.param_dtype = "float32"
    c.data.source = str(math_data / "math_train.jsonl")
    c.data.eval_source = str(math_data / "math_eval.jsonl")
    c.data.accuracy_examples = 2
    c.data.accuracy_max_new_tokens = 6
    c.train.update(steps=2, batch_size=8, grad_accum=1, seq_len=160, eval_every=0, progress=False)
    c.optim.warmup_steps = 1
    c.checkpoint.every = 0
    c.export.merged = False
    recipes.finetune(c)
    rows = [json.loads(line) for line in (tmp_path / "chat" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "accuracy" in r] == [2]
    assert (tmp_path / "chat" / "export" / "adapter" / "adapter_model.safetensors").exists()
    shutil.rmtree(checkpoint)

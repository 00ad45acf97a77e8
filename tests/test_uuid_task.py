"""The UUID memorization task and experiment (the README's main job)."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import uuid_memorization
from mora_jax.experiments import uuid_memorization as experiments
from mora_jax.experiments import uuid_task
from mora_jax.errors import ConfigError


def test_pairs_are_reproducible_distinct_uuids():
    pairs = uuid_task.make_pairs(20, seed=3)
    assert pairs == uuid_task.make_pairs(20, seed=3) and pairs != uuid_task.make_pairs(20, seed=4)
    flat = [u for pair in pairs for u in pair]
    assert len(set(flat)) == 40 and all(len(u) == 36 and u[14] == "4" for u in flat)


def test_encoding_and_loss_mask_cover_value_and_eos_only():
    pairs = uuid_task.make_pairs(3, seed=0)
    batch = uuid_task.encode_pairs(pairs)
    ids, mask = batch["input_ids"], batch["loss_mask"]
    assert ids.shape == mask.shape == (3, uuid_task.SEQ_LEN) and ids.dtype == np.int32
    assert uuid_task.decode(ids[0, 1:37]) == pairs[0][0] and uuid_task.decode(ids[0, 38:74]) == pairs[0][1]
    targets_trained = ids[:, 1:][mask[:, :-1] == 1].reshape(3, -1)  # tokens predicted where mask = 1
    assert targets_trained.shape[1] == 37 and np.all(targets_trained[:, -1] == uuid_task.EOS)
    assert uuid_task.decode(targets_trained[0, :-1]) == pairs[0][1]
    with pytest.raises(ValueError, match="not in the UUID vocabulary"):
        uuid_task.encode("xyz")


def test_greedy_generation_and_accuracy():
    pairs = uuid_task.make_pairs(4, seed=1)
    full = jnp.asarray(uuid_task.encode_pairs(pairs)["input_ids"])

    def oracle_logits(ids):  # predicts the true next token everywhere (teacher = the full sequences)
        return jnp.eye(uuid_task.VOCAB_SIZE)[jnp.roll(full, -1, axis=1)]

    generated = uuid_task.greedy_values(oracle_logits, full[:, : uuid_task.PROMPT_LEN])
    assert uuid_task.char_accuracy(generated, pairs) == 100.0
    wrong = generated.at[:, :9].set(uuid_task.CHAR_TO_ID["-"])
    assert uuid_task.char_accuracy(wrong, pairs) == pytest.approx(100.0 * 27 / 36, abs=100.0 * 3 / 36)


def test_pair_batches_resume_exactly():
    pairs = uuid_task.make_pairs(12, seed=0)
    a = uuid_task.PairBatches(pairs, 4, seed=0)
    first = [next(a) for _ in range(5)]
    b = uuid_task.PairBatches(pairs, 4, seed=0)
    b.set_state(json.loads(json.dumps(uuid_task.PairBatches(pairs, 4, seed=0).get_state())))
    [next(b) for _ in range(2)]
    state = b.get_state()
    c = uuid_task.PairBatches(pairs, 4, seed=0)
    c.set_state(state)
    for expected in first[2:]:
        np.testing.assert_array_equal(next(c)["input_ids"], expected["input_ids"])


def test_tiny_experiment_end_to_end(tmp_path):
    config = uuid_memorization.get_config("tiny")
    config.workdir = str(tmp_path)
    results = experiments.run_uuid_memorization(config)
    names = [row["name"] for row in results["methods"]]
    assert names == ["full", "lora_small", "mora_small", "lora_large", "mora_large"]
    params = {row["name"]: row["trainable_params"] for row in results["methods"]}
    for size in ("small", "large"):  # equal trainable parameters for LoRA and MoRA at each rank (r̂ rounding)
        assert abs(params[f"mora_{size}"] - params[f"lora_{size}"]) / params[f"lora_{size}"] < 0.1
    for row in results["methods"]:
        assert set(row["char_accuracy"]) == {"4", "8"}
        assert all(0.0 <= v <= 100.0 for v in row["char_accuracy"].values())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"] == results["methods"]
    table = (tmp_path / "results.md").read_text()
    assert "| MoRA (type 6) r=1 |" in table and "| full fine-tuning |" in table
    assert (tmp_path / "results.png").stat().st_size > 1000
    # the pre-trained base is cached and reused (same settings), not trained again
    assert (tmp_path / "base_model" / "uuid_pretraining.json").exists()
    model = experiments.LlamaForCausalLM(experiments.model_config(config))
    (tmp_path / "base" / "metrics.jsonl").unlink()
    again = experiments.pretrain_base(config, model, tmp_path)
    assert not (tmp_path / "base" / "metrics.jsonl").exists()
    assert again["model"]["norm"]["weight"].shape == (config.model.hidden_size,)


def test_seeds_aggregate_and_a_rerun_on_one_machine_is_identical(tmp_path):
    config = uuid_memorization.get_config("tiny")
    config.workdir = str(tmp_path / "two")
    config.run = "lora_small,mora_small"
    results = experiments.run_uuid_memorization(config, seeds=(0, 1))
    assert results["seeds"] == [0, 1] and results["provenance"]["seeds"] == [0, 1]
    row = results["methods"][1]
    assert len(row["char_accuracy_seeds"]["8"]) == 2
    assert row["char_accuracy"]["8"] == pytest.approx(np.mean(row["char_accuracy_seeds"]["8"]))
    assert "±" in (tmp_path / "two" / "results.md").read_text() and "Seeds 0, 1" in (tmp_path / "two" / "results.md").read_text()
    # the same job again, from scratch, on the same machine: the same numbers, bit for bit
    config.workdir = str(tmp_path / "again")
    again = experiments.run_uuid_memorization(config, seeds=(1,))
    first = json.loads((tmp_path / "two" / "seed1" / "results.json").read_text())
    assert [r["char_accuracy"] for r in again["methods"]] == [r["char_accuracy"] for r in first["methods"]]
    assert [r["final_loss"] for r in again["methods"]] == [r["final_loss"] for r in first["methods"]]


def test_unknown_method_in_run_list_is_an_error(tmp_path):
    config = uuid_memorization.get_config("tiny")
    config.workdir = str(tmp_path)
    config.run = "full,dora"
    config.pretrain_steps = 0
    with pytest.raises(ValueError, match=r"config.run names \['dora'\]"):
        experiments.run_uuid_memorization(config)


def test_the_experiment_fine_tunes_on_a_quantized_base(tmp_path):
    config = uuid_memorization.get_config("tiny")
    config.workdir, config.base_dir = str(tmp_path / "float"), str(tmp_path / "base")
    config.run = "lora_large,mora_large"
    plain = experiments.run_uuid_memorization(config)
    config.workdir = str(tmp_path / "nf4")
    config.model.quantize.format = "nf4"
    quantized = experiments.run_uuid_memorization(config)  # the same float base, reused, stored as NF4 blocks of 8
    assert (tmp_path / "base" / "uuid_pretraining.json").exists() and not (tmp_path / "nf4" / "base").exists()
    for a, b in zip(plain["methods"], quantized["methods"]):
        assert a["trainable_params"] == b["trainable_params"] and a["final_loss"] != b["final_loss"]
        assert np.isfinite(b["final_loss"])
    assert "stored as nf4 (blocks of 8)" in (tmp_path / "nf4" / "results.md").read_text()
    config.run = "full"
    with pytest.raises(ConfigError, match="is a quantized frozen kernel and cannot be trained in full"):
        experiments.run_uuid_memorization(config)

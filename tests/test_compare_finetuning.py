"""The fine-tuning comparison: a learning-rate sweep per method that compiles once (the peak rate in
the optimizer state), the chosen rate at every seed, results with provenance, resumption; its three
tasks' data (UUID pairs, real-text corpora, WordNet questions) and scoring."""

import gzip
import json
import pathlib

import jax
import numpy as np
import pytest

from configs import smollm2_experiments
from mora_jax import assembly
from mora_jax import data as data_lib
from mora_jax.experiments import compare_finetuning, finetune_tasks, prose, runs, task_data, wordnet
from mora_jax.hf.checkpoints import save_llama
from mora_jax.models.config import LlamaConfig
from mora_jax.models.llama import init_params
from mora_jax.run_config import RunConfig

SAMPLE = pathlib.Path(__file__).parent / "fixtures" / "word_relations_sample.jsonl"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer LLaMA in Hugging Face format with a SentencePiece tokenizer that knows the
    tasks' characters (hex digits, German umlauts, the word-relation prompts)."""
    d = tmp_path_factory.mktemp("tiny")
    data_lib.write_synthetic_corpus(d / "corpus.txt", 300, seed=0)
    with open(d / "corpus.txt", "a") as f:
        f.write("0123456789abcdef- -> The opposite of hot is cold. A dog is a kind of canine. Wörter äöüß.\n" * 20)
    tok = data_lib.train_tokenizer(str(d / "corpus.txt"), str(d / "model" / "tokenizer"), vocab_size=400)
    config = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    save_llama(d / "model", config, init_params(config, jax.random.key(0)), overwrite=True)
    return d / "model"


def _quick(preset, model, workdir, **experiment):
    c = smollm2_experiments.get_config(preset)
    c.model.hf_path, c.workdir = str(model), str(workdir)
    c.train.progress = False
    for key, value in experiment.items():
        c.experiment[key] = value
    return c


def test_presets_build_and_bad_settings_get_one_line(tiny_model):
    for experiment in ("memorization", "continual", "word_relations"):
        for size in ("quick", "results", "long"):
            c = smollm2_experiments.get_config(f"{experiment}_{size}")
            names = compare_finetuning.method_names(c)
            assert {"full", "lora", "mora"} <= {c.experiment.methods[n].method for n in names}
            assert all(len(c.experiment.methods[n].lrs) >= 4 for n in names)
            assert max(c.experiment.eval_steps) <= c.train.steps
    with pytest.raises(ValueError, match="unknown preset"):
        smollm2_experiments.get_config("memorization_huge")
    with pytest.raises(ValueError, match="unknown preset"):
        smollm2_experiments.get_config("quantized_long")
    c = _quick("memorization_quick", tiny_model, "/unused")
    with pytest.raises(ValueError, match="unknown.*lora_r9.*defines"):
        compare_finetuning.method_names(c, ["lora_r9"])
    c.experiment.methods.lora_r8.lrs = (1e-3, 1e-2, 1e-3)
    with pytest.raises(ValueError, match="lora_r8.lrs has 2 distinct rates; the sweep needs at least 4"):
        compare_finetuning.check_config(c, ["lora_r8"])
    c.model.hf_path = ""
    with pytest.raises(ValueError, match="train.get_model smollm2-135m-instruct"):
        compare_finetuning.check_config(c, ["lora_r8"])


def test_peak_lr_in_the_optimizer_state_same_updates_one_program():
    """optim.lr_in_state: the same trained values as a constant peak rate, and two rates run through
    one compiled train step (a sweep does not recompile)."""
    def config(lr, in_state, method):
        return RunConfig.from_dict({
            "method": method, "workdir": "/unused", "model": {"preset": "tiny"},
            "optim": {"lr": lr, "warmup_steps": 2, "lr_in_state": in_state, "weight_decay": 0.1},
            "train": {"steps": 5, "batch_size": 8, "seq_len": 16}})

    batch = {"input_ids": np.random.RandomState(0).randint(0, 100, (8, 16)).astype(np.int32)}
    for method in ("lora",):
        trained = []
        for in_state in (False, True):
            a = assembly.assemble(config(3e-3, in_state, method))
            state = a.steps.place(a.initial_state(a.load_params()))
            for _ in range(3):
                state, metrics = a.steps.train(state, a.steps.shard_batch(batch))
            trained.append((jax.tree_util.tree_leaves(state.trainables), float(metrics["learning_rate"])))
        np.testing.assert_allclose(trained[0][1], trained[1][1], rtol=1e-6)  # the logged rate is the real one
        for x, y in zip(trained[0][0], trained[1][0]):
            np.testing.assert_allclose(x, y, atol=1e-6)
    a = assembly.assemble(config(1e-3, True, "lora"))
    params = a.load_params()
    rates = []
    for lr in (1e-3, 1e-2):
        state = a.steps.place(assembly.initial_state(params, config(lr, True, "lora"), a.layout))
        for _ in range(2):
            state, metrics = a.steps.train(state, a.steps.shard_batch(batch))
        rates.append(float(metrics["learning_rate"]))
    assert rates == pytest.approx([0.5e-3, 0.5e-2])  # step 2 of a 2-step warm-up: half the peak
    assert len(a.steps._cache) == 1


def test_quick_path_end_to_end_then_resume(tiny_model, tmp_path, capsys):
    """The memorization quick preset on a tiny random model: the sweep picks each method's best
    rate, the chosen rate trains, the artifacts carry provenance; a second invocation trains
    nothing, one removed record is trained again alone, other settings are refused."""
    c = _quick("memorization_quick", tiny_model, tmp_path / "cmp", sweep_steps=2, eval_steps=(2, 4), num_pairs=8)
    c.train.steps, c.train.batch_size = 4, 8  # the tests' 8 CPU devices split the batch
    methods = ("lora_r8", "mora6_r8")
    results = compare_finetuning.compare(c, methods, seeds=(0,), command="pytest")
    for name in methods:
        sweep = results["sweep"][name]
        assert [r["lr"] for r in sweep["runs"]] == list(c.experiment.methods[name].lrs)
        best = max(sweep["runs"], key=lambda r: (r["eval"]["2"]["char_accuracy"], -r["eval"]["2"]["loss"]))
        assert sweep["chosen_lr"] == best["lr"] == results["runs"][name][0]["lr"]
        assert set(results["runs"][name][0]["eval"]) == {"2", "4"}
    lora, mora = (results["runs"][n][0]["trainable_params"] for n in methods)
    assert abs(lora - mora) / lora < 0.02  # equal trainable parameters (MoRA's r̂ rounds)
    md = (tmp_path / "cmp" / "results.md").read_text()
    assert "| LoRA r=8 |" in md and "| MoRA type 6 (r=8) |" in md and "step 4" in md and "Command: `pytest`" in md
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["provenance"]["seeds"] == [0] and saved["provenance"]["commit"]
    assert saved["base"]["test"]["char_accuracy"] >= 0 and saved["task_data"]["pairs"] == 8
    for png in ("results.png", "sweep.png"):
        assert (tmp_path / "cmp" / png).stat().st_size > 1000
    assert not (tmp_path / "cmp" / "lora_r8" / "seed0" / "checkpoints").exists()
    capsys.readouterr()

    again = compare_finetuning.compare(c, methods, seeds=(0,), command="pytest")
    out = capsys.readouterr().out
    assert out.count("finished before, read from its done.json") == 11 and " steps (" not in out
    assert again["runs"] == results["runs"] and again["sweep"] == results["sweep"]

    (tmp_path / "cmp" / "mora6_r8" / "seed0" / runs.DONE).unlink()
    third = compare_finetuning.compare(c, methods, seeds=(0,), command="pytest")
    out = capsys.readouterr().out
    assert out.count("finished before") == 10 and "mora6_r8 lr=" in out and ": 4 steps (" in out
    assert third["runs"]["lora_r8"] == results["runs"]["lora_r8"]
    np.testing.assert_allclose(third["runs"]["mora6_r8"][0]["eval"]["4"]["loss"],
                               results["runs"]["mora6_r8"][0]["eval"]["4"]["loss"], rtol=1e-5)  # deterministic

    c.experiment.num_pairs = 9
    with pytest.raises(ValueError, match="other settings.*num_pairs: 8 then, 9 now"):
        compare_finetuning.compare(c, methods, seeds=(0,))


@pytest.mark.slow  # about 60 s on two cores: 4 methods x (4 sweep runs + 1), 8 compiles
def test_the_peft_family_runs_in_the_comparison_at_equal_trainable_parameters(tiny_model, tmp_path):
    """DoRA, PiSSA, HiRA and MoRA with a magnitude sweep and train through the same comparison; their
    trainable parameters are LoRA's at the same r (DoRA and the magnitude add one per output feature)."""
    c = _quick("memorization_quick", tiny_model, tmp_path / "cmp", sweep_steps=1, eval_steps=(2,), num_pairs=8)
    c.train.steps, c.train.batch_size = 2, 8
    methods = ("dora_r8", "pissa_r8", "hira_r8", "mora6m_r8")
    results = compare_finetuning.compare(c, methods, seeds=(0,), command="pytest")
    counts = {n: results["runs"][n][0]["trainable_params"] for n in methods}
    lora_params = sum(8 * (k + d) for k, d in _kernel_shapes(tiny_model))
    outputs = sum(d for _, d in _kernel_shapes(tiny_model))
    assert counts["pissa_r8"] == counts["hira_r8"] == lora_params
    assert counts["dora_r8"] == lora_params + outputs
    mora = compare_finetuning.Comparison(c, tmp_path / "probe").param_counts(
        compare_finetuning.run_config(c, "mora6_r8", lr=1e-3, seed=0, steps=2, workdir=tmp_path / "probe"))
    assert counts["mora6m_r8"] == mora["trainable_params"] + outputs
    for name in methods:
        run = results["runs"][name][0]
        assert run["lr"] == results["sweep"][name]["chosen_lr"] and not run["diverged"]
        assert np.isfinite(run["eval"]["2"]["loss"])
    assert results["sweep"]["hira_r8"]["chosen_lr"] in c.experiment.methods.hira_r8.lrs
    md = (tmp_path / "cmp" / "results.md").read_text()
    for name in ("DoRA r=8", "PiSSA r=8", "HiRA r=8", "MoRA type 6 + magnitude (r=8)"):
        assert f"| {name} |" in md


@pytest.mark.slow  # about 40 s on two cores
def test_quantized_bases_train_at_the_reference_rate(tiny_model, tmp_path):
    """The quantized preset: MoRA on the float base sweeps; the int8 and NF4 forms take its rate (no sweep of
    their own), train the same parameters on their quantized base, and the table says whose rate they use."""
    c = _quick("quantized_quick", tiny_model, tmp_path / "cmp", sweep_steps=1, eval_steps=(2,), num_pairs=8)
    c.train.steps, c.train.batch_size = 2, 8
    c.experiment.methods.nf4.model.quantize.block_size = 16  # the tiny model's 32 features
    c.data.tokenizer = str(tiny_model)  # the preset names SmolLM2's converted directory (for its GGUF form)
    results = compare_finetuning.compare(c, ("float", "int8", "nf4"), seeds=(0,), command="pytest")
    chosen = results["sweep"]["float"]["chosen_lr"]
    assert len(results["sweep"]["float"]["runs"]) == 4
    for name in ("int8", "nf4"):
        assert results["sweep"][name]["runs"] == [] and results["sweep"][name]["from"] == "float"
        assert results["runs"][name][0]["lr"] == chosen
        assert results["runs"][name][0]["trainable_params"] == results["runs"]["float"][0]["trainable_params"]
    losses = {n: results["runs"][n][0]["eval"]["2"]["loss"] for n in ("float", "int8", "nf4")}
    assert losses["int8"] != losses["float"] and abs(losses["int8"] - losses["float"]) < 0.05 * losses["float"]
    assert "the rate chosen for MoRA 6 r=8, float32 base (reference)" in (tmp_path / "cmp" / "results.md").read_text()
    # each form of the base is scored before fine-tuning on its own (the base column of its row)
    bases = results["base_by_method"]
    assert bases["float"] == results["base"] and bases["int8"]["test"]["loss"] != bases["float"]["test"]["loss"]
    assert (tmp_path / "cmp" / "base" / "nf4" / "done.json").exists()
    assert f"| {bases['nf4']['test']['char_accuracy']:.1f} |" in (tmp_path / "cmp" / "results.md").read_text()
    with pytest.raises(ValueError, match="lr_from='float': name a method of this comparison"):
        compare_finetuning.compare(c, ("int8",), seeds=(0,))
    with pytest.raises(FileNotFoundError, match="q4_1.model.hf_path=.* does not exist"):
        c.experiment.methods.q4_1.model.hf_path = str(tmp_path / "missing.gguf")
        compare_finetuning.compare(c, ("float", "q4_1"), seeds=(0,))


def _kernel_shapes(model_dir):
    """(k, d) of the seven projections of every layer of the tiny model."""
    cfg = json.loads((model_dir / "config.json").read_text())
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)] * layers


def test_sweep_choice_ranks_by_the_task_metrics_and_puts_divergence_last():
    def rec(lr, acc, loss, diverged=None):
        return {"lr": lr, "diverged": diverged, "eval": {} if diverged else {"5": {"char_accuracy": acc, "loss": loss}}}

    select = finetune_tasks.Memorization.select
    assert compare_finetuning.choose_lr([rec(1e-3, 10, 2.0), rec(3e-3, 30, 1.0), rec(1e-2, 0, 0, "nan")], select, 5) == 3e-3
    assert compare_finetuning.choose_lr([rec(1e-3, 30, 2.0), rec(3e-3, 30, 1.0)], select, 5) == 3e-3
    # memorization ranks by loss first: a diverging rate that guesses more characters right loses
    assert compare_finetuning.choose_lr([rec(3e-3, 6.9, 2.31), rec(1e-2, 11.8, 5.96)], select, 5) == 3e-3
    assert compare_finetuning.choose_lr([rec(1e-3, 20, 1.0), rec(3e-3, 30, 1.0)], select, 5) == 3e-3  # tie: accuracy
    # word relations too: MoRA 6's sweep had 12.5% exact match at 3e-4 (answer loss 4.80) against 7.8% at 1e-3 (2.92)
    words = [{"lr": lr, "diverged": None, "eval": {"5": {"exact_match": em, "answer_loss": loss}}}
             for lr, em, loss in ((3e-4, 12.5, 4.80), (1e-3, 7.8, 2.92))]
    assert compare_finetuning.choose_lr(words, finetune_tasks.WordRelations.select, 5) == 1e-3
    assert compare_finetuning.choose_lr([rec(1e-3, 0, float("nan")), rec(3e-3, 0, 1.0)], select, 5) == 3e-3


def test_continual_task_builds_corpora_from_real_text_layouts(tiny_model, tmp_path):
    """A gzipped plain-text domain and a folder of reStructuredText become held-out splits, and the
    base model's perplexities on both are finite."""
    domain = tmp_path / "domain.txt.gz"
    paragraphs = [f"Absatz {i}: Dies ist ein deutscher Absatz mit genug Wörtern, damit er als Prosa zählt, und mehr."
                  for i in range(200)]
    domain.write_bytes(gzip.compress(("\n\n".join(paragraphs) + "\n\n+---+\n| table |\n").encode()))
    rst = tmp_path / "rst"
    rst.mkdir()
    for i in range(100):
        (rst / f"p{i}.rst.txt").write_text(f"Paragraph {i} of the general corpus has enough ordinary English words "
                                           "to count as prose for this test here.\n")
    c = _quick("continual_quick", tiny_model, tmp_path / "w", domain_source=str(domain), general_source=str(rst),
               eval_fraction=0.3)
    c.train.seq_len, c.train.batch_size = 32, 8
    c.experiment.eval_batches = 1
    cmp = compare_finetuning.Comparison(c, tmp_path / "w")
    assert (tmp_path / "w" / "data" / "domain_eval.txt").read_text().count("\n") > 10
    assert "table" not in (tmp_path / "w" / "data" / "domain_train.txt").read_text()
    rc = compare_finetuning.run_config(c, "lora", lr=1e-3, seed=0, steps=2, workdir=tmp_path / "w" / "x")
    base = cmp.evaluate_base(rc)
    assert set(base["valid"]) == {"domain_ppl"} and set(base["test"]) == {"domain_ppl", "general_ppl"}
    assert all(np.isfinite(v) and v > 1 for v in base["test"].values())
    c.experiment.domain_source = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="domain corpus source .*missing.txt does not exist"):
        finetune_tasks.make_task(c, cmp.tokenizer, tmp_path / "other")


def test_text_paragraphs_keep_prose_only():
    text = ("Ein Absatz, der lang genug ist, um als Prosa zu gelten, mit vielen Wörtern darin und\n"
            "einer zweiten Zeile.\n\n  * Ein Listenpunkt mit genug Wörtern, um ebenfalls als Prosa zu zählen, ja.\n\n"
            "+------+\n| a | b |\n\n$ apt-get install something with many words that look like prose here\n\nKurz.\n")
    assert prose.text_paragraphs(text) == [
        "Ein Absatz, der lang genug ist, um als Prosa zu gelten, mit vielen Wörtern darin und einer zweiten Zeile.",
        "Ein Listenpunkt mit genug Wörtern, um ebenfalls als Prosa zu zählen, ja."]


WORDNET = {  # a few synsets in WordNet 3.0's database format (wndb(5))
    "data.adj": ["  1 licence header line",
                 "00001740 00 a 01 hot 0 001 ! 00002098 a 0101 | used of physical heat",
                 "00002098 00 a 01 cold 0 001 ! 00001740 a 0101 | having a low temperature"],
    "index.adj": ["  1 licence header line", "hot a 1 1 ! 1 1 00001740  ", "cold a 1 1 ! 1 1 00002098  ",
                  "rare a 1 0 1 0 00001740  "],
    "data.noun": ["02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis",
                  "02083346 05 n 02 canine 0 canid 0 000 | any of various fissiped mammals"],
    "index.noun": ["dog n 1 1 @ 1 1 02084071  ", "canine n 1 0 1 1 02083346  "],
    "data.verb": [], "index.verb": [], "data.adv": [], "index.adv": [],
}


def test_wordnet_questions_from_the_database_format(tmp_path):
    for name, lines in WORDNET.items():
        (tmp_path / name).write_text("".join(line + "\n" for line in lines))
    records = {(r["relation"], r["word"]): r for r in wordnet.relation_records(tmp_path)}
    assert set(records) == {("antonym", "hot"), ("antonym", "cold"), ("hypernym", "dog")}  # "rare": never tagged
    assert records[("antonym", "hot")]["prompt"] == "The opposite of hot is" and records[("antonym", "hot")]["answers"] == ["cold"]
    assert records[("hypernym", "dog")]["prompt"] == "A dog is a kind of"
    assert records[("hypernym", "dog")]["answers"] == ["canine", "canid"]
    assert wordnet.is_correct(" Canine.\nmore", ["canine"]) and wordnet.is_correct("a canid", ["canine", "canid"])
    assert not wordnet.is_correct("animal", ["canine"])
    with pytest.raises(FileNotFoundError, match="apt-get install -y wordnet-base"):
        wordnet.relation_records(tmp_path / "nowhere")


@pytest.mark.skipif(not pathlib.Path("/usr/share/wordnet/data.noun").exists(),
                    reason="Debian's wordnet-base is not installed (apt-get install -y wordnet-base)")
def test_committed_sample_comes_from_the_real_wordnet():
    full = {(r["relation"], r["word"]): r for r in wordnet.relation_records("/usr/share/wordnet")}
    sample = wordnet.read_records(SAMPLE)
    assert len(full) > 10000 and all(full[(r["relation"], r["word"])] == r for r in sample)


def test_word_relation_task_scores_held_out_words(tiny_model, tmp_path):
    c = _quick("word_relations_quick", tiny_model, tmp_path, relations_file=str(SAMPLE), eval_examples=16)
    c.train.seq_len = 48  # the tiny tokenizer spells words out
    tok = data_lib.Tokenizer(tiny_model)
    task = finetune_tasks.make_task(c, tok, tmp_path / "data")
    words = {s: {r["word"] for r in rs} for s, rs in task.records.items()}
    assert not words["train"] & words["test"] and not words["valid"] & words["test"]
    assert len(task.records["test"]) == 16 and task.train_rows["input_ids"].shape == (48, 48)
    rows = task.train_rows
    first = task.records["train"][0]
    answer = tok.decode(rows["input_ids"][0][np.roll(rows["loss_mask"][0], 1).astype(bool)][:-1])
    assert answer.strip() == first["answer"]  # the loss covers the answer (and EOS) only


def test_shuffled_batches_resume_exactly():
    arrays = {"input_ids": np.arange(10)[:, None].repeat(3, 1)}
    a = task_data.ShuffledBatches(arrays, 3, seed=1)
    first = [next(a)["input_ids"][:, 0].tolist() for _ in range(5)]
    b = task_data.ShuffledBatches(arrays, 3, seed=1)
    for _ in range(2):
        next(b)
    c = task_data.ShuffledBatches(arrays, 3, seed=1)
    c.set_state(json.loads(json.dumps(b.get_state())))
    assert [next(c)["input_ids"][:, 0].tolist() for _ in range(3)] == first[2:]
    assert sorted(sum(first[:3], [])) == sorted(set(sum(first[:3], [])))  # an epoch draws each row once

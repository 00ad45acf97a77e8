"""The pretraining comparison runs every method on the same tokens, merges where configured, writes its
artifacts with provenance and resumes; the prose corpus builder keeps prose and drops markup and code."""

import json

import numpy as np
import pytest

from configs import compare_pretraining as compare_pretraining_config
from mora_jax import data as data_lib
from mora_jax.experiments import compare_pretraining, prose

RST = """Title of a page
===============

This paragraph is real running prose with a :func:`len` role, ``literal`` text, a
`link <https://example.org>`_ and **bold** words, long enough to count as prose here.

Some code follows::

    def f(x):
        return x + 1 and this line is long enough to look like prose if it were kept in

.. note::

   A directive body that is indented and should be skipped entirely by the parser here.

>>> print("interactive session lines are not prose, whatever their length may be")

Short line.
"""


def test_rst_paragraphs_keep_prose_only():
    paragraphs = prose.rst_paragraphs(RST)
    assert paragraphs == ["This paragraph is real running prose with a len role, literal text, a link and bold "
                          "words, long enough to count as prose here."]


def test_write_prose_corpus_splits_deterministically(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"page{i}.rst.txt").write_text(f"Paragraph number {i} " + "with enough ordinary words to be prose " * 2 + ".\n")
    counts = prose.write_prose_corpus(src, tmp_path / "train.txt", tmp_path / "eval.txt", eval_fraction=0.25)
    again = prose.write_prose_corpus(src, tmp_path / "train2.txt", tmp_path / "eval2.txt", eval_fraction=0.25)
    assert counts == again and sum(counts) == 40 and 0 < counts[1] < 40
    assert (tmp_path / "eval.txt").read_text() == (tmp_path / "eval2.txt").read_text()
    with pytest.raises(FileNotFoundError, match="python3.11-doc"):
        prose.write_prose_corpus(tmp_path / "missing", tmp_path / "a", tmp_path / "b")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    data_lib.write_synthetic_corpus(d / "corpus.txt", 600, seed=0)
    data_lib.write_synthetic_corpus(d / "corpus_eval.txt", 60, seed=1)
    data_lib.train_tokenizer(str(d / "corpus.txt"), str(d / "tok"), vocab_size=512)
    return d


def _config(corpus, workdir):
    c = compare_pretraining_config.get_config("tiny")
    c.workdir = str(workdir)
    c.data.source, c.data.eval_source = str(corpus / "corpus.txt"), str(corpus / "corpus_eval.txt")
    c.data.tokenizer = str(corpus / "tok.model")
    c.train.steps, c.train.eval_every, c.train.log_every, c.train.progress = 6, 3, 3, False
    c.remora.every = 2
    c.optim.warmup_steps, c.optim.restart_warmup = 1, 1
    c.checkpoint.every = 0
    c.experiment.sweep_steps = 3  # one merge in the sweep (remora.every = 2)
    return c


@pytest.mark.slow
def test_comparison_sweeps_each_method_then_runs_merges_where_configured_and_resumes(corpus, tmp_path, monkeypatch):
    config = _config(corpus, tmp_path / "cmp")
    config.experiment.lrs.full = (1e-4, 1e-3, 1e-2, 1e-1)
    results = compare_pretraining.compare(config, ("full", "relora", "remora"), seeds=(0,))
    runs = {r["method"]: r for r in results["runs"]}
    for method in ("full", "relora", "remora"):
        sw = results["sweep"][method]
        assert sw["lrs"] == sorted(float(x) for x in config.experiment.lrs[method]) and len(sw["runs"]) == 4
        assert all(r["steps"] == 3 and r["seed"] == 0 for r in sw["runs"])
        assert sw["chosen_lr"] == sw["lrs"][int(np.argmin(sw["scores"]))]
        assert runs[method]["lr"] == sw["chosen_lr"] and runs[method]["steps"] == 6  # the final run at the chosen rate
        for r in sw["runs"]:
            assert (tmp_path / "cmp" / "sweep" / method / f"lr{r['lr']:g}" / "done.json").exists()
    assert results["sweep"]["full"]["scores"][0] != results["sweep"]["full"]["scores"][-1]  # the rate matters
    assert len(results["sweep"]["relora"]["runs"][0]["merges"]) == 1  # the sweep runs merge too
    assert [m["step"] for m in runs["relora"]["merges"]] == [2, 4] and not runs["full"]["merges"]
    assert [m["mora_type"] for m in runs["remora"]["merges"]] == [2, 3]
    assert all("accumulated_effective_rank/" in " ".join(m) for m in runs["remora"]["merges"])
    assert [e[0] for e in runs["full"]["eval"]] == [3 * 8 * 64, 6 * 8 * 64]  # same token counts
    assert runs["full"]["trainable_params"] > runs["relora"]["trainable_params"]
    for name in ("results.md", "results.json", "perplexity.png", "sweep.png", "remora_diagnostics.png"):
        assert (tmp_path / "cmp" / name).exists(), name
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["provenance"]["seeds"] == [0] and saved["provenance"]["packages"]["jax"]
    text = (tmp_path / "cmp" / "results.md").read_text()
    assert "ReMoRA" in text and "lr (chosen)" in text and "Learning-rate sweep: 3 steps" in text
    assert (tmp_path / "cmp" / "relora" / "seed0" / "done.json").exists()  # a short sweep: seed 0 trains again
    assert f"**{results['sweep']['remora']['chosen_lr']:.0e}: " in text
    # a second call reads the finished runs (sweep included) instead of training again
    (tmp_path / "cmp" / "relora" / "seed0" / "metrics.jsonl").unlink()
    monkeypatch.setattr(compare_pretraining.recipes, "run", lambda *a, **k: pytest.fail("trained again"))
    again = compare_pretraining.compare(config, ("relora",), seeds=(0,))
    assert again["runs"][0] == runs["relora"] and again["sweep"]["relora"] == results["sweep"]["relora"]
    # another budget is another sweep: its runs are not mixed with the recorded ones
    config.experiment.sweep_steps = 4
    with pytest.raises(ValueError, match="sweep/relora/lr0.001/done.json was made with other settings"):
        compare_pretraining.compare(config, ("relora",), seeds=(0,))


@pytest.mark.slow
def test_a_sweep_as_long_as_the_run_is_the_first_seeds_run(corpus, tmp_path):
    config = _config(corpus, tmp_path / "cmp")
    config.experiment.sweep_steps = config.train.steps
    results = compare_pretraining.compare(config, ("mora",), seeds=(0, 1))
    chosen = results["sweep"]["mora"]["chosen_lr"]
    seed0 = next(r for r in results["sweep"]["mora"]["runs"] if r["lr"] == chosen)
    assert results["runs"][0] == seed0 and results["runs"][1]["seed"] == 1 and results["runs"][1]["lr"] == chosen
    assert not (tmp_path / "cmp" / "mora" / "seed0").exists() and (tmp_path / "cmp" / "mora" / "seed1").exists()


def _record(lr, loss, diverged=None):
    return {"method": "lora", "seed": 0, "lr": lr, "steps": 2, "tokens_per_step": 10, "diverged": diverged,
            "eval": [] if diverged else [(20, loss, float(np.exp(loss)))]}


def test_the_sweep_chooses_the_lowest_eval_loss_and_a_diverged_rate_loses(corpus, tmp_path, monkeypatch):
    config = _config(corpus, tmp_path / "cmp")
    losses = {1e-3: 5.0, 3e-3: 4.0, 1e-2: np.nan, 3e-2: None}  # NaN: a non-finite loss; None: diverged
    monkeypatch.setattr(compare_pretraining, "run_one", lambda c, m, s, w, lr, steps: _record(
        lr, losses[lr], diverged="loss is nan" if losses[lr] is None else None))
    sw = compare_pretraining.sweep(config, "lora", tmp_path)
    assert sw["chosen_lr"] == 3e-3 and not sw["at_edge"] and sw["scores"][2:] == [np.inf, np.inf]
    losses.update({3e-3: 6.0})
    assert compare_pretraining.sweep(config, "lora", tmp_path)["at_edge"]  # the grid's smallest rate won
    losses.update({1e-3: None, 3e-3: None})
    with pytest.raises(SystemExit, match="every learning rate of lora's sweep .* lower experiment.lrs.lora"):
        compare_pretraining.sweep(config, "lora", tmp_path)


def test_a_sweep_run_is_the_method_at_its_rate_for_the_sweep_budget(corpus, tmp_path):
    config = _config(corpus, tmp_path / "cmp")
    rc = compare_pretraining.method_config(config, "remora", 1, tmp_path, lr=1e-2, steps=3)
    assert (rc.optim.lr, rc.optim.lr_in_state, rc.train.steps, rc.train.eval_every) == (1e-2, True, 3, 3)
    assert rc.optim.warmup_steps == 1 and rc.remora.every == 2 and rc.seed == 1
    final = compare_pretraining.method_config(config, "remora", 0, tmp_path, lr=3e-3)
    assert (final.optim.lr, final.train.steps, final.train.eval_every) == (3e-3, 6, 3)


def test_a_sweep_that_cannot_run_is_refused_in_one_line(corpus, tmp_path):
    from configs import c4_pretrain

    with pytest.raises(ValueError, match="no experiment.lrs .* --config=configs/compare_pretraining.py:cpu"):
        compare_pretraining.check_sweep(c4_pretrain.get_config("tiny"), ("lora",))
    config = _config(corpus, tmp_path / "cmp")
    config.experiment.lrs.lora = (1e-3, 3e-3, 1e-2, 1e-2)
    with pytest.raises(ValueError, match="experiment.lrs.lora has 3 distinct rates; the sweep needs at least 4"):
        compare_pretraining.check_sweep(config, ("mora", "lora"))
    compare_pretraining.check_sweep(config, ("mora",))  # only the methods that run are checked
    config.experiment.sweep_steps = 2
    with pytest.raises(ValueError, match="sweep_steps=2 is not longer than remora.every=2: remora would be tuned"):
        compare_pretraining.check_sweep(config, ("mora", "remora"))
    config.experiment.sweep_steps = 7
    with pytest.raises(ValueError, match=r"sweep_steps=7 must lie in \[1, train.steps=6\]"):
        compare_pretraining.check_sweep(config, ("mora",))


def test_merging_methods_need_a_merge_period(corpus, tmp_path):
    config = _config(corpus, tmp_path / "cmp")
    config.remora.every = 0
    with pytest.raises(ValueError, match="remora.every is 0"):
        compare_pretraining.method_config(config, "remora", 0, tmp_path)
    with pytest.raises(ValueError, match="unknown method 'vera'"):
        compare_pretraining.method_config(config, "vera", 0, tmp_path)
    with pytest.raises(ValueError, match="remora_mag merges every remora.every steps"):
        compare_pretraining.method_config(config, "remora_mag", 0, tmp_path)
    config.remora.every = 10
    mag = compare_pretraining.method_config(config, "remora_mag", 0, tmp_path)
    assert mag.method == "mora" and mag.adapter.magnitude and mag.remora.every == 10 and not mag.export.adapter
    plain = compare_pretraining.method_config(config, "mora_mag", 0, tmp_path)
    assert plain.adapter.magnitude and plain.remora.every == 0
    assert not compare_pretraining.method_config(config, "remora", 0, tmp_path).adapter.magnitude


@pytest.mark.slow
def test_the_peft_family_joins_the_comparison_at_the_same_rank(corpus, tmp_path):
    config = _config(corpus, tmp_path / "cmp")
    results = compare_pretraining.compare(config, ("lora", "dora", "pissa", "hira", "remora", "remora_mag"), seeds=(0,))
    runs = {r["method"]: r for r in results["runs"]}
    lora = runs["lora"]["trainable_params"]
    # PiSSA and HiRA train LoRA's two factors; DoRA adds one magnitude per output feature of each kernel
    assert runs["pissa"]["trainable_params"] == runs["hira"]["trainable_params"] == lora
    assert lora < runs["dora"]["trainable_params"] < 1.1 * lora
    for method in ("dora", "pissa", "hira"):
        run = runs[method]
        assert [e[0] for e in run["eval"]] == [e[0] for e in runs["lora"]["eval"]] and not run["merges"]
        assert np.isfinite(run["eval"][-1][1]), method
    # ReMoRA with a magnitude: MoRA's M plus one magnitude per output feature, merged every remora.every steps
    assert runs["remora"]["trainable_params"] < runs["remora_mag"]["trainable_params"] < 1.1 * runs["remora"][
        "trainable_params"]
    assert len(runs["remora_mag"]["merges"]) == len(runs["remora"]["merges"]) > 0
    assert np.isfinite(runs["remora_mag"]["eval"][-1][1])
    text = (tmp_path / "cmp" / "results.md").read_text()
    assert all(label in text for label in ("DoRA", "PiSSA", "HiRA", "ReMoRA + magnitude"))

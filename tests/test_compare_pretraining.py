"""The pretraining comparison runs every method on the same tokens, merges where configured, writes its
artifacts with provenance and resumes; the prose corpus builder keeps prose and drops markup and code."""

import json

import numpy as np
import pytest

from configs import c4_pretrain
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
    c = c4_pretrain.get_config("tiny")
    c.workdir = str(workdir)
    c.data.source, c.data.eval_source = str(corpus / "corpus.txt"), str(corpus / "corpus_eval.txt")
    c.data.tokenizer = str(corpus / "tok.model")
    c.train.steps, c.train.eval_every, c.train.log_every, c.train.progress = 6, 3, 3, False
    c.remora.every = 2
    c.optim.warmup_steps, c.optim.restart_warmup = 1, 1
    c.checkpoint.every = 0
    return c


@pytest.mark.slow
def test_comparison_runs_merges_where_configured_and_resumes(corpus, tmp_path):
    config = _config(corpus, tmp_path / "cmp")
    results = compare_pretraining.compare(config, ("full", "relora", "remora"), seeds=(0,))
    runs = {r["method"]: r for r in results["runs"]}
    assert [m["step"] for m in runs["relora"]["merges"]] == [2, 4] and not runs["full"]["merges"]
    assert [m["mora_type"] for m in runs["remora"]["merges"]] == [2, 3]
    assert all("accumulated_effective_rank/" in " ".join(m) for m in runs["remora"]["merges"])
    assert [e[0] for e in runs["full"]["eval"]] == [3 * 8 * 64, 6 * 8 * 64]  # same token counts
    assert runs["full"]["trainable_params"] > runs["relora"]["trainable_params"]
    for name in ("results.md", "results.json", "perplexity.png", "remora_diagnostics.png"):
        assert (tmp_path / "cmp" / name).exists(), name
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert saved["provenance"]["seeds"] == [0] and saved["provenance"]["packages"]["jax"]
    assert "ReMoRA" in (tmp_path / "cmp" / "results.md").read_text()
    # a second call reads the finished runs instead of training again
    (tmp_path / "cmp" / "relora" / "seed0" / "metrics.jsonl").unlink()
    again = compare_pretraining.compare(config, ("relora",), seeds=(0,))
    assert again["runs"][0] == runs["relora"]


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

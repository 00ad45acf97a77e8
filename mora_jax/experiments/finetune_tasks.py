"""The fine-tuning comparison's three tasks on a pretrained model (``config.experiment.task``).

Each task holds its data (built once into ``<workdir>/data`` from real offline sources), gives the
training rows, and evaluates a train state on a split: ``"valid"`` (what the learning-rate sweep
picks by) or ``"test"`` (what the table reports).

* ``memorization``: the paper's UUID task (:mod:`mora_jax.experiments.uuid_task`'s pairs) with the
  model's own tokenizer: "<key> ->" then " <value>". Scored by character accuracy of the greedily
  generated values (the training pairs are the test: memorization), and their loss.
* ``continual``: continual pretraining on a domain corpus; perplexity on held-out domain text, and
  forgetting as perplexity on held-out text of a second, general corpus. Both corpora are
  paragraphs of real text (:mod:`mora_jax.experiments.prose`).
* ``word_relations``: WordNet questions (:mod:`mora_jax.experiments.wordnet`) answered by greedy
  generation, exact match against the accepted answers, on words held out of training; and the
  answers' loss.
"""

from __future__ import annotations

import pathlib

import numpy as np

from mora_jax.experiments import prose, task_data, uuid_task, wordnet


class Task:
    """What the comparison needs of a task (see the module docstring)."""

    name = ""
    # (metric, label, higher is better) shown per evaluated step in the results table
    columns: tuple[tuple[str, str, bool], ...] = ()
    # metrics the sweep ranks by on the "valid" split, in order (ties broken by the next)
    select: tuple[tuple[str, bool], ...] = ()

    def __init__(self, config, tokenizer, data_dir: pathlib.Path):
        self.config, self.experiment, self.tokenizer = config, config.experiment, tokenizer
        self.seq_len, self.batch_size = int(config.train.seq_len), int(config.train.batch_size)
        self.data_dir = data_dir

    def train_batches(self, seed: int) -> task_data.ShuffledBatches:
        return task_data.ShuffledBatches(self.train_rows, self.batch_size, seed)

    def evaluate(self, model, steps, state, split: str) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {}


class Memorization(Task):
    name = "memorization"
    columns = (("char_accuracy", "character accuracy (%)", True),)
    # sweeps rank by the values' loss: after a short sweep a few dozen characters of accuracy are noise (a
    # diverging rate can guess more of them right), the loss is not
    select = (("loss", False), ("char_accuracy", True))

    def __init__(self, config, tokenizer, data_dir):
        super().__init__(config, tokenizer, data_dir)
        e = self.experiment
        self.pairs = uuid_task.make_pairs(int(e.num_pairs), seed=int(e.data_seed))
        examples = [(f"{key} ->", f" {value}") for key, value in self.pairs]
        self.train_rows = task_data.encode_examples(tokenizer, examples, self.seq_len)
        self.prompts = [task_data.prompt_ids(tokenizer, prompt) for prompt, _ in examples]
        self.max_new_tokens = max(len(tokenizer.encode(answer)) for _, answer in examples) + 1

    def evaluate(self, model, steps, state, split):
        texts = task_data.generate_texts(model, self.tokenizer, state.params(), state.adapters, self.prompts,
                                         max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)
        values = [value for _, value in self.pairs]
        loss = task_data.mean_loss(steps, state, task_data.batches_of(self.train_rows, self.batch_size))
        return {"char_accuracy": uuid_task.text_char_accuracy([t.lstrip() for t in texts], values), "loss": loss}

    def describe(self):
        return {"pairs": len(self.pairs), "tokens_per_example": int(self.train_rows["input_ids"].astype(bool).sum(1).max())}


def _corpus(source: str, name: str, data_dir: pathlib.Path, eval_fraction: float) -> tuple[pathlib.Path, pathlib.Path]:
    """``<data_dir>/<name>_{train,eval}.txt`` from ``source``: a folder of reStructuredText (the
    Python documentation's sources) or a plain text file (``.gz`` too), built once."""
    train, held_out = data_dir / f"{name}_train.txt", data_dir / f"{name}_eval.txt"
    if train.exists() and held_out.exists():
        return train, held_out
    path = pathlib.Path(source)
    if path.is_dir():
        prose.write_prose_corpus(path, train, held_out, eval_fraction=eval_fraction)
    elif path.is_file():
        prose.write_paragraphs(prose.text_paragraphs(prose.read_text(path)), train, held_out,
                               eval_fraction=eval_fraction)
    else:
        raise FileNotFoundError(f"the {name} corpus source {source} does not exist: install the Debian package the "
                                "config names beside it, or set --config.experiment."
                                f"{name}_source to a text file or a folder of .rst files")
    return train, held_out


class Continual(Task):
    name = "continual"
    columns = (("domain_ppl", "domain perplexity", False), ("general_ppl", "general perplexity (forgetting)", False))
    select = (("domain_ppl", False),)

    def __init__(self, config, tokenizer, data_dir):
        super().__init__(config, tokenizer, data_dir)
        e = self.experiment
        domain_train, domain_eval = _corpus(e.domain_source, "domain", data_dir, float(e.eval_fraction))
        _, general_eval = _corpus(e.general_source, "general", data_dir, float(e.eval_fraction))
        self.train_rows = task_data.packed_rows(domain_train, tokenizer, self.seq_len, max_rows=e.get("train_rows"))
        n = int(e.eval_batches) * self.batch_size
        domain = task_data.packed_rows(domain_eval, tokenizer, self.seq_len, max_rows=2 * n)
        general = task_data.packed_rows(general_eval, tokenizer, self.seq_len, max_rows=n)
        if len(domain["input_ids"]) < 2 * n or len(general["input_ids"]) < n:
            raise ValueError(f"the held-out text gives {len(domain['input_ids'])} domain and {len(general['input_ids'])} "
                             f"general rows of {self.seq_len} tokens; experiment.eval_batches={e.eval_batches} needs "
                             f"{2 * n} and {n}: lower it or raise experiment.eval_fraction")
        self.splits = {"valid": task_data.batches_of({k: v[:n] for k, v in domain.items()}, self.batch_size),
                       "test": task_data.batches_of({k: v[n:] for k, v in domain.items()}, self.batch_size)}
        self.general = task_data.batches_of(general, self.batch_size)

    def evaluate(self, model, steps, state, split):
        out = {"domain_ppl": task_data.perplexity(task_data.mean_loss(steps, state, self.splits[split]))}
        if split == "test":
            out["general_ppl"] = task_data.perplexity(task_data.mean_loss(steps, state, self.general))
        return out

    def describe(self):
        e = self.experiment
        return {"domain_source": e.domain_source, "general_source": e.general_source,
                "train_rows": len(self.train_rows["input_ids"]), "seq_len": self.seq_len,
                "eval_tokens_per_split": int(e.eval_batches) * self.batch_size * self.seq_len}


class WordRelations(Task):
    name = "word_relations"
    columns = (("exact_match", "exact match (%)", True), ("exact_match/antonym", "exact match, antonyms (%)", True),
               ("exact_match/hypernym", "exact match, hypernyms (%)", True))
    # sweeps rank by the answers' loss, as memorization's by the values': after a short sweep the exact match of
    # a few dozen questions moves by single answers (one question of 64 is 1.6 points), the loss does not
    select = (("answer_loss", False), ("exact_match", True))

    def __init__(self, config, tokenizer, data_dir):
        super().__init__(config, tokenizer, data_dir)
        e = self.experiment
        path = pathlib.Path(e.relations_file) if e.relations_file else data_dir / "word_relations.jsonl"
        if not path.exists() and not e.relations_file:
            wordnet.write_records(wordnet.relation_records(e.wordnet_dir), path)
        records = wordnet.read_records(path)
        rng = np.random.default_rng(int(e.data_seed))
        by_split = {s: [records[i] for i in rng.permutation(len(records)) if records[i]["split"] == s]
                    for s in ("train", "valid", "test")}
        limits = {"train": int(e.train_examples), "valid": int(e.eval_examples), "test": int(e.eval_examples)}
        self.records = {s: rs[:limits[s]] for s, rs in by_split.items()}
        for split, rs in self.records.items():
            if len(rs) < min(limits[split], self.batch_size):
                raise ValueError(f"{path} has {len(rs)} {split} questions, fewer than a batch of {self.batch_size}")
        self.rows = {s: task_data.encode_examples(tokenizer, [(r["prompt"], " " + r["answer"]) for r in rs], self.seq_len)
                     for s, rs in self.records.items()}
        self.train_rows = self.rows["train"]
        self.max_new_tokens = int(e.max_new_tokens)

    def evaluate(self, model, steps, state, split):
        records = self.records[split]
        texts = task_data.generate_texts(model, self.tokenizer, state.params(), state.adapters,
                                         [task_data.prompt_ids(self.tokenizer, r["prompt"]) for r in records],
                                         max_new_tokens=self.max_new_tokens, batch_size=max(self.batch_size, 8))
        correct = [wordnet.is_correct(t, r["answers"]) for t, r in zip(texts, records)]
        loss = task_data.mean_loss(steps, state, task_data.batches_of(self.rows[split], self.batch_size))
        out = {"exact_match": 100.0 * float(np.mean(correct)), "answer_loss": loss}
        for relation in sorted({r["relation"] for r in records}):
            hits = [c for c, r in zip(correct, records) if r["relation"] == relation]
            out[f"exact_match/{relation}"] = 100.0 * float(np.mean(hits))
        return out

    def describe(self):
        return {split: len(rs) for split, rs in self.records.items()}


TASKS = {task.name: task for task in (Memorization, Continual, WordRelations)}


def make_task(config, tokenizer, data_dir: pathlib.Path) -> Task:
    name = config.experiment.task
    if name not in TASKS:
        raise ValueError(f"unknown experiment.task {name!r}: choose one of {sorted(TASKS)}")
    data_dir.mkdir(parents=True, exist_ok=True)
    return TASKS[name](config, tokenizer, data_dir)


__all__ = ["TASKS", "Continual", "Memorization", "Task", "WordRelations", "make_task"]

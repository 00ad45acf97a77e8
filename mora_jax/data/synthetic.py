"""A deterministic pseudo-English corpus from a built-in grammar and word list (no downloads)."""

from __future__ import annotations

import bisect
import functools
import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

_NOUNS = (
    "river cat dog bird house tree garden city road teacher child farmer king queen ship market "
    "stone window letter song forest mountain village doctor student book lamp horse bridge cloud "
    "island kitchen painter baker sailor clock field lake"
).split()
_VERBS = (
    "see:saw find:found carry:carried paint:painted follow:followed build:built watch:watched "
    "help:helped open:opened visit:visited clean:cleaned draw:drew keep:kept move:moved"
).split()
_ADJECTIVES = (
    "old young small large quiet bright dark green red happy tired busy gentle strange "
    "warm cold tall short clever brave"
).split()
_NAMES = "Anna Ben Clara David Elena Felix Grace Hugo Iris Jonas Lena Marco Nora Oscar".split()
_PLACES = "near behind under above beside across inside".split()
_TIMES = "in the morning|at night|every day|after the rain|before dinner|on monday|last winter".split("|")
_SENTENCE_PATTERNS = (
    "the {adj} {noun} {verb_past} the {noun2} {place} the {noun3}",
    "{name} {verb_past} {a_adj} {noun} {time}",
    "{a_noun} {verb_3s} the {adj} {noun2}",
    "{name} said that the {noun} was {adj}",
    "there are {number} {nouns} {place} the {adj} {noun2}",
    "the {noun} and the {noun2} {verb_past} {name} {time}",
    "{name} knows that {number} plus {number2} is {total}",
)


class _ReproducibleRandom:
    """Draws only from ``random.Random.random()``, whose stream Python keeps stable across versions."""

    def __init__(self, seed: int):
        import random

        self._random = random.Random(seed)

    def index(self, count: int, zipf: bool = False) -> int:
        """An index in ``range(count)``: uniform, or Zipf-distributed (index 0 the most frequent)."""
        if not zipf:
            return min(int(self._random.random() * count), count - 1)
        cumulative = _zipf_cumulative(count)
        return min(bisect.bisect_right(cumulative, self._random.random() * cumulative[-1]), count - 1)

    def choice(self, items: Sequence, zipf: bool = False):
        return items[self.index(len(items), zipf)]


@functools.cache
def _zipf_cumulative(count: int) -> tuple[float, ...]:
    return tuple(itertools.accumulate(1.0 / (rank + 1) for rank in range(count)))


def _with_s(word: str) -> str:
    """Plural of a noun, or third person of a verb: ``city -> cities``, ``watch -> watches``."""
    if word == "child":
        return "children"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + ("es" if word.endswith(("sh", "ch", "s", "x")) else "s")


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(rng: _ReproducibleRandom) -> str:
    base, past = rng.choice(_VERBS, zipf=True).split(":")
    number, number2 = rng.index(20) + 2, rng.index(20) + 2
    noun, adj = rng.choice(_NOUNS, zipf=True), rng.choice(_ADJECTIVES, zipf=True)
    words = dict(
        noun=noun,
        nouns=_with_s(noun),
        a_noun=_with_article(noun),
        noun2=rng.choice(_NOUNS, zipf=True),
        noun3=rng.choice(_NOUNS, zipf=True),
        adj=adj,
        a_adj=_with_article(adj),
        name=rng.choice(_NAMES),
        place=rng.choice(_PLACES),
        time=rng.choice(_TIMES),
        verb_past=past,
        verb_3s=_with_s(base),
        number=number,
        number2=number2,
        total=number + number2,
    )
    text = rng.choice(_SENTENCE_PATTERNS).format(**words)
    return text[0].upper() + text[1:] + "."


def synthetic_corpus_lines(num_lines: int, seed: int = 0) -> Iterator[str]:
    """Deterministic pseudo-English documents, one per line (1 to 5 sentences from a built-in
    grammar and Zipf-distributed word list, with a little arithmetic), for offline pipelines."""
    rng = _ReproducibleRandom(seed)
    for _ in range(num_lines):
        yield " ".join(_sentence(rng) for _ in range(rng.index(5) + 1))


def write_synthetic_corpus(path: str | os.PathLike, num_lines: int, seed: int = 0) -> int:
    """Write :func:`synthetic_corpus_lines` to ``path`` (creating its folder); returns the line count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for line in synthetic_corpus_lines(num_lines, seed):
            file.write(line + "\n")
    return num_lines


def synthetic_math_records(num_records: int, seed: int = 0) -> Iterator[dict]:
    """Deterministic MetaMathQA-style ``{"query", "response"}`` records of small arithmetic word problems,
    for running the fine-tuning pipeline offline."""
    rng = _ReproducibleRandom(seed)
    for _ in range(num_records):
        name, noun = rng.choice(_NAMES), rng.choice(_NOUNS)
        a, b = rng.index(90) + 10, rng.index(90) + 10
        if rng.index(2):
            query = f"{name} has {a} {noun}s and finds {b} more. How many {noun}s does {name} have now?"
            response = f"{name} has {a} + {b} = {a + b} {noun}s. The answer is: {a + b}"
        else:
            big, small = max(a, b), min(a, b)
            query = f"{name} has {big} {noun}s and gives away {small}. How many {noun}s are left?"
            response = f"{name} has {big} - {small} = {big - small} {noun}s left. The answer is: {big - small}"
        yield {"query": query, "response": response}


def write_synthetic_math(path: str | os.PathLike, num_records: int, seed: int = 0) -> int:
    """Write :func:`synthetic_math_records` as JSON lines to ``path``; returns the record count."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w") as f:
        for record in synthetic_math_records(num_records, seed):
            f.write(json.dumps(record) + "\n")
            count += 1
    return count

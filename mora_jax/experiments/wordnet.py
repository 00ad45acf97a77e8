"""Word-relation questions with exact answers, from Princeton WordNet 3.0's database files (Debian's
``wordnet-base`` installs them in ``/usr/share/wordnet``; the format is ``wndb(5)``).

Two relations, each asked of a word's senses as WordNet orders them (the first is the most frequent):

* ``antonym``: "The opposite of hot is" → "cold" (WordNet's direct antonyms, ``!`` pointers between
  words, of any part of speech); accepted answers: the direct antonyms of every sense of the word.
* ``hypernym``: "A dog is a kind of" → "canine" (the ``@`` pointers of the noun's first sense);
  accepted answers: every word of every hypernym synset of that sense.

Only single-word questions whose word was seen in WordNet's sense-tagged corpus (``tagsense_cnt``
> 0: common words) are asked; answers are lower case with spaces for underscores. A question's
split (train / valid / test) comes from a hash of its word, so no word is trained on and tested.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
from typing import Iterable, Iterator

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
PROMPTS = {"antonym": "The opposite of {word} is", "hypernym": "{article} {word} is a kind of"}
SPLITS = (("test", 0.1), ("valid", 0.2), ("train", 1.0))  # cumulative fractions of the word hash
_MARKER = re.compile(r"\([a-z]+\)$")  # adjective position markers: long(a), galore(ip)


def _word(raw: str) -> str:
    return _MARKER.sub("", raw).replace("_", " ").lower()


def read_data(path: pathlib.Path) -> dict[str, dict]:
    """A ``data.*`` file: synset offset -> ``{"words": [...], "pointers": [(symbol, offset, pos, source, target)]}``
    (``source``/``target``: 1-based word numbers, 0 for a relation between whole synsets)."""
    synsets = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line or line.startswith("  "):  # the licence header
            continue
        fields = line.split(" | ", 1)[0].split()
        offset, w_cnt = fields[0], int(fields[3], 16)
        words = [_word(fields[4 + 2 * i]) for i in range(w_cnt)]
        at = 4 + 2 * w_cnt
        pointers = []
        for i in range(int(fields[at])):
            symbol, target, pos, st = fields[at + 1 + 4 * i: at + 5 + 4 * i]
            pointers.append((symbol, target, "a" if pos == "s" else pos, int(st[:2], 16), int(st[2:], 16)))
        synsets[offset] = {"words": words, "pointers": pointers}
    return synsets


def read_index(path: pathlib.Path) -> Iterator[tuple[str, int, list[str]]]:
    """An ``index.*`` file's ``(lemma, tagsense_cnt, synset offsets in sense order)``."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line or line.startswith("  "):
            continue
        fields = line.split()
        p_cnt = int(fields[3])
        synset_cnt = int(fields[2])
        tagsense_cnt = int(fields[5 + p_cnt])
        yield fields[0], tagsense_cnt, fields[6 + p_cnt: 6 + p_cnt + synset_cnt]


def word_hash(word: str) -> float:
    """A word's place in [0, 1) by its SHA-256 (the same on every machine)."""
    return int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "big") / 2.0**64


def _split(word: str) -> str:
    u = word_hash(word)
    return next(name for name, bound in SPLITS if u < bound)


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def relation_records(wordnet_dir: str | pathlib.Path) -> list[dict]:
    """Every question of both relations (see the module docstring), sorted by relation and word:
    ``{"relation", "word", "prompt", "answer", "answers", "split"}``."""
    root = pathlib.Path(wordnet_dir)
    missing = [f"data.{name}" for name in POS_FILES.values() if not (root / f"data.{name}").is_file()]
    if missing:
        raise FileNotFoundError(f"{root} has no WordNet database ({', '.join(missing)} missing): install Debian's "
                                "wordnet-base (apt-get install -y wordnet-base) and pass /usr/share/wordnet")
    data = {pos: read_data(root / f"data.{name}") for pos, name in POS_FILES.items()}
    antonyms: dict[str, list[str]] = {}
    hypernyms: dict[str, list[str]] = {}
    for pos, name in POS_FILES.items():
        for lemma, tagged, offsets in read_index(root / f"index.{name}"):
            word = _word(lemma)
            if tagged == 0 or not word.isalpha():
                continue
            for offset in offsets:
                synset = data[pos][offset]
                number = synset["words"].index(word) + 1 if word in synset["words"] else 0
                for symbol, target, target_pos, source, target_word in synset["pointers"]:
                    if symbol == "!" and source == number:
                        found = data[target_pos][target]["words"][target_word - 1]
                        if found not in antonyms.setdefault(word, []):
                            antonyms[word].append(found)
            if pos == "n" and offsets and word not in hypernyms:
                first = data["n"][offsets[0]]
                answers = [w for symbol, target, *_ in first["pointers"] if symbol == "@"
                           for w in data["n"][target]["words"]]
                if answers:
                    hypernyms[word] = list(dict.fromkeys(answers))
    records = []
    for relation, table in (("antonym", antonyms), ("hypernym", hypernyms)):
        for word in sorted(table):
            answers = table[word]
            prompt = PROMPTS[relation].format(word=word, article=_article(word))
            records.append({"relation": relation, "word": word, "prompt": prompt, "answer": answers[0],
                            "answers": answers, "split": _split(word)})
    return records


def write_records(records: Iterable[dict], path: str | pathlib.Path) -> int:
    """Records as JSON lines; their count."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
            n += 1
    return n


def read_records(path: str | pathlib.Path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: build it with python -m train.make_word_relations "
                                "(needs Debian's wordnet-base)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def normalize(text: str) -> str:
    """An answer as compared: the first line, lower case, spaces collapsed, a leading article and
    trailing punctuation removed."""
    text = (text or "").strip().split("\n", 1)[0].lower()
    text = re.sub(r"\s+", " ", text).strip().rstrip(".,;:!?\"'").strip()
    return re.sub(r"^(a|an|the) ", "", text)


def is_correct(generated: str, answers: Iterable[str]) -> bool:
    return normalize(generated) in {normalize(a) for a in answers}


__all__ = ["PROMPTS", "is_correct", "normalize", "read_data", "read_index", "read_records", "relation_records",
           "word_hash", "write_records"]

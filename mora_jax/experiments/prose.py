"""Real English prose for the pretraining comparison, from text that ships in a package.

The Python documentation's reStructuredText sources (Debian's ``python3.11-doc`` installs them under
``/usr/share/doc/python3.11/html/_sources``) are a few megabytes of prose written by people outside
this project. :func:`rst_paragraphs` keeps the paragraphs of running text and drops what is not
prose: code blocks (after ``::`` and in directives), tables, directive and comment blocks, headings
and their underlines, and inline markup (``:func:`len``` becomes ``len``, ``**bold**`` becomes
``bold``). :func:`write_prose_corpus` writes one paragraph per line, split into a training and a
held-out file by a hash of the paragraph (the same split on every machine and every run).

:func:`text_paragraphs` does the same for plain text laid out in blank-line separated paragraphs
(e.g. Debian's ``debian-reference-de``, the Debian Reference in German, as
``/usr/share/debian-reference/debian-reference.de.txt.gz``): tables, bullets' markers, and lines
of commands are dropped; :func:`write_paragraphs` splits any paragraphs the same way.
"""

from __future__ import annotations

import gzip
import hashlib
import pathlib
import re
from typing import Iterable

_ROLE = re.compile(r":[\w:+-]+:`[!~]?(?:([^`<]*?)\s*<[^`>]*>|([^`]+))`")  # :func:`name`, :ref:`text <target>`
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`_{1,2}")  # `text <url>`_
_LITERAL = re.compile(r"``([^`]+)``")
_EMPHASIS = re.compile(r"\*\*?([^*\n]+?)\*\*?")
_REFERENCE = re.compile(r"`([^`]+)`_{1,2}|\|([^|\s]+)\|")
_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+.:_])\1{2,}\s*$")
_MIN_WORDS = 12


def _inline(text: str) -> str:
    text = _ROLE.sub(lambda m: m.group(1) or m.group(2), text)
    text = _LINK.sub(r"\1", text)
    text = _LITERAL.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _REFERENCE.sub(lambda m: m.group(1) or m.group(2), text)
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(paragraph: str) -> bool:
    words = paragraph.split()
    if len(words) < _MIN_WORDS:
        return False
    letters = sum(c.isalpha() for c in paragraph)
    return letters > 0.6 * len(paragraph) and paragraph[0].isalnum()


def rst_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of a reStructuredText document, inline markup removed."""
    paragraphs, current = [], []
    skip_indent: int | None = None  # inside a literal block / directive body: skip lines indented deeper

    def close():
        if current:
            paragraph = _inline(" ".join(current))
            if _is_prose(paragraph):
                paragraphs.append(paragraph)
            current.clear()

    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if not stripped:
            close()
            continue
        if _UNDERLINE.match(stripped):  # a heading's underline (or overline): the heading is not prose
            current.clear()
            continue
        if stripped.startswith(".."):  # directive, comment or target: skip it and its body
            close()
            skip_indent = indent
            continue
        if stripped.startswith(("+-", "|", ">>>", "...", "$ ")) or indent >= 4 and not current:
            close()  # tables, line blocks, interactive sessions, block quotes of code
            continue
        current.append(stripped[:-1] if stripped.endswith("::") and stripped != "::" else stripped)
        if stripped.endswith("::"):  # a literal block follows
            close()
            skip_indent = indent
    close()
    return paragraphs


def text_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of plain text whose paragraphs are separated by blank lines: a
    paragraph's lines joined, a list item's marker (``*``, ``-``, ``1.``) removed; tables, headings
    and command lines fail :func:`_is_prose` (too few words, too few letters) and are dropped."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if not lines or any(line.startswith(("+-", "|", "$ ", "# ")) for line in lines):
            continue
        lines[0] = re.sub(r"^(?:[*\-•]|\d+\.)\s+", "", lines[0])
        paragraph = re.sub(r"\s+", " ", " ".join(lines)).strip()
        if _is_prose(paragraph):
            paragraphs.append(paragraph)
    return paragraphs


def read_text(path: str | pathlib.Path) -> str:
    """A text file's contents (``.gz`` decompressed), undecodable bytes replaced."""
    path = pathlib.Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return data.decode("utf-8", errors="replace")


def write_paragraphs(paragraphs: Iterable[str], train_out: str | pathlib.Path, eval_out: str | pathlib.Path, *,
                     eval_fraction: float = 0.02) -> tuple[int, int]:
    """``paragraphs`` (duplicates dropped), one per line, into ``train_out`` and ``eval_out``: a
    paragraph goes to the held-out file when the first bytes of its SHA-256, as a fraction, fall
    below ``eval_fraction`` (the same split on every machine). Returns the line counts."""
    seen: set[str] = set()
    counts = [0, 0]
    train_path, eval_path = pathlib.Path(train_out), pathlib.Path(eval_out)
    for path in (train_path, eval_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with train_path.open("w") as train_f, eval_path.open("w") as eval_f:
        for paragraph in paragraphs:
            if paragraph in seen:
                continue
            seen.add(paragraph)
            digest = int.from_bytes(hashlib.sha256(paragraph.encode()).digest()[:8], "big") / 2.0**64
            held_out = digest < eval_fraction
            (eval_f if held_out else train_f).write(paragraph + "\n")
            counts[held_out] += 1
    return counts[0], counts[1]


def write_prose_corpus(source_dir: str | pathlib.Path, train_out: str | pathlib.Path,
                       eval_out: str | pathlib.Path, *, eval_fraction: float = 0.02) -> tuple[int, int]:
    """Paragraphs of every ``*.rst.txt`` / ``*.rst`` / ``*.txt`` file under ``source_dir`` (sorted),
    one per line, into ``train_out`` and ``eval_out`` (split by :func:`write_paragraphs`). Returns
    the line counts."""
    source_dir = pathlib.Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(
            f"{source_dir} is not a directory; install Debian's python3.11-doc (apt-get install python3.11-doc) "
            "and pass /usr/share/doc/python3.11/html/_sources, or any folder of reStructuredText files")
    files = sorted(p for p in source_dir.rglob("*") if p.is_file() and p.name.endswith((".rst.txt", ".rst", ".txt")))
    if not files:
        raise FileNotFoundError(f"no .rst.txt, .rst or .txt files under {source_dir}")
    paragraphs = (paragraph for path in files
                  for paragraph in rst_paragraphs(path.read_text(encoding="utf-8", errors="replace")))
    return write_paragraphs(paragraphs, train_out, eval_out, eval_fraction=eval_fraction)


__all__ = ["read_text", "rst_paragraphs", "text_paragraphs", "write_paragraphs", "write_prose_corpus"]

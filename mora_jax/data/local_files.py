"""Local text and JSON files read line by line, so that every record knows its file and line.

``.txt`` / ``.text`` / ``.md`` files give one record ``{"text": line}`` per line (line ends
``\\n`` or ``\\r\\n`` removed); ``.jsonl`` / ``.ndjson`` files one JSON value per non-blank line; a
``.json`` file is either JSON lines or one JSON array (its first character is ``[``), whose
elements are the records. Files may be compressed with gzip, bzip2 or xz (``.gz``, ``.bz2``,
``.xz``).

A line that is not valid UTF-8, or not valid JSON in a JSON-lines file, is yielded as a
:class:`BadLine` (file, line, what is wrong) instead of aborting the read: the batch iterators raise
it as an error naming the file and line (``on_bad_record='error'``, the default) or count and skip
it (``'skip'``). A malformed JSON *array* cannot be read past its error, so it always raises.

Positions are ``{"format", "file", "offset", "line", "index"}``: the file's index in the sorted
list, the byte offset and line number where the next record starts, and the number of records
before it in all files; resuming seeks there instead of re-reading. Process ``i`` of ``n`` takes
the records whose ``index % n == i``.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import json
import lzma
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from mora_jax.data.batching import DataError

LINES_STATE_FORMAT = "mora_jax.data.lines/1"
TEXT_SUFFIXES = (".txt", ".text", ".md")
JSON_LINES_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
_COMPRESSION_NAMES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}
_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A line that could not be read as a record."""

    file: str
    line: int
    problem: str

    def describe(self) -> str:
        return f"{self.file} line {self.line}: {self.problem}"


def _split_compression(path: str) -> tuple[str, str | None]:
    lower = path.lower()
    for suffix in _OPENERS:
        if lower.endswith(suffix):
            return lower[: -len(suffix)], suffix
    return lower, None


def line_file_kind(path: str) -> str | None:
    """``'text'`` or ``'json'`` for a file this module reads, None for others (e.g. Parquet, ``.zst``)."""
    name, _ = _split_compression(path)
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSON_LINES_SUFFIXES + JSON_SUFFIXES) and not name.endswith((".zst", ".lz4")):
        return "json"
    return None


def _open(path: str):
    _, compression = _split_compression(path)
    return _OPENERS[compression](path, "rb") if compression else open(path, "rb")


def _decode(raw: bytes, path: str, line: int) -> str | BadLine:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return BadLine(path, line, f"invalid UTF-8 (byte {raw[e.start:e.start + 1]!r} at column {e.start + 1})")


class LineFiles:
    """Records of local text / JSON files with their positions (see the module docstring)."""

    def __init__(self, files: Sequence[str]):
        self.files = [os.fspath(f) for f in files]
        kinds = {line_file_kind(f) for f in self.files}
        if None in kinds or len(kinds) != 1:
            raise ValueError(f"LineFiles reads text or JSON files of one kind, got {self.files[:5]}")
        self.kind = kinds.pop()

    def start(self) -> dict[str, Any]:
        return {"format": LINES_STATE_FORMAT, "file": 0, "offset": 0, "line": 1, "index": 0}

    def describe(self, position: dict) -> str:
        """``'<file> line <n>'`` (``'<file> element <i>'`` in a JSON array) of a position."""
        if position["line"] is None:
            return f"{self.files[position['file']]} element {position['offset']}"
        return f"{self.files[position['file']]} line {position['line']}"

    def records(self, position: dict | None = None) -> Iterator[tuple[Any, dict]]:
        """``(record or BadLine, position of that record)`` from ``position`` (default: the start)."""
        position = dict(position or self.start())
        if position.get("format") != LINES_STATE_FORMAT:
            raise ValueError(f"not a {LINES_STATE_FORMAT} position: {position!r}")
        index = int(position["index"])
        for file_index in range(int(position["file"]), len(self.files)):
            first = file_index == position["file"]
            offset, line = (int(position["offset"]), position["line"]) if first else (0, 1)
            for record, at_offset, at_line in self._file_records(self.files[file_index], offset, line):
                yield record, {"format": LINES_STATE_FORMAT, "file": file_index, "offset": at_offset,
                               "line": at_line, "index": index}
                index += 1

    def _file_records(self, path: str, offset: int, line: int):
        """The records of one file from a byte offset; a file that cannot be read or decompressed is
        a :class:`~mora_jax.data.batching.DataError` naming it."""
        _, compression = _split_compression(path)
        try:
            yield from self._read_file(path, offset, line)
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            error = f"{type(e).__name__}: {e}"
            what = (f"it is damaged or not {_COMPRESSION_NAMES[compression]}-compressed (decompressing it failed: "
                    f"{error})" if compression else f"reading it failed ({error})")
            raise DataError(f"data file {path}: {what}; replace it with a good copy or remove it from the "
                            "source") from None

    def _read_file(self, path: str, offset: int, line: int):
        with _open(path) as f:
            head = f.read(len(_BOM) + 64) if offset == 0 else b""
            is_array = self.kind == "json" and head.removeprefix(_BOM).lstrip().startswith(b"[")
            if is_array:
                yield from self._array_records(path, f, head, offset)
                return
            f.seek(offset)
            line = int(line)
            while raw := f.readline():
                start, start_line = offset, line
                offset, line = offset + len(raw), line + 1
                if start == 0:
                    raw = raw.removeprefix(_BOM)
                raw = raw.removesuffix(b"\n").removesuffix(b"\r")
                text = _decode(raw, path, start_line)
                if self.kind == "text":
                    record = text if isinstance(text, BadLine) else {"text": text}
                elif isinstance(text, BadLine):
                    record = text
                elif not text.strip():
                    continue  # blank lines separate nothing in JSON lines
                else:
                    try:
                        record = json.loads(text)
                    except json.JSONDecodeError as e:
                        record = BadLine(path, start_line, f"malformed JSON ({e.msg} at column {e.colno})")
                yield record, start, start_line

    def _array_records(self, path: str, f, head: bytes, offset: int):
        """Elements of a JSON array file; ``offset`` counts elements here (the array is parsed whole)."""
        raw = head + f.read()
        try:
            values = json.loads(raw.removeprefix(_BOM).decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ValueError(f"{path} line {line}: invalid UTF-8 in a JSON array file (fix or remove the bytes; "
                             "a JSON array cannot be read past a bad element)") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {e.lineno}: malformed JSON ({e.msg} at column {e.colno}); a JSON array "
                             "cannot be read past its error: fix the file (or write it as JSON lines, where "
                             "on_bad_record='skip' can skip bad lines)") from None
        if not isinstance(values, list):
            raise ValueError(f"{path} holds one JSON {type(values).__name__}, not an array of records or JSON lines")
        for i in range(offset, len(values)):
            yield values[i], i, None


__all__ = ["LINES_STATE_FORMAT", "BadLine", "LineFiles", "line_file_kind"]

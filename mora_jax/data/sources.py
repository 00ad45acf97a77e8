"""Where records come from: ``"c4"`` on the Hub, local files through ``datasets``, or in-memory
iterables, and how one process reads its own share of them, epoch after epoch, from any position."""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from mora_jax.data.batching import check_choice, check_process
from mora_jax.data.local_files import LINES_STATE_FORMAT, LineFiles, line_file_kind

C4_PATH, C4_CONFIG = "allenai/c4", "en"
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_FORMAT_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".parquet": "parquet",
}


def _file_format(path: str) -> str | None:
    name = path.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        name = name.removesuffix(suffix)
    return _FORMAT_BY_SUFFIX.get(os.path.splitext(name)[1])


def resolve_data_files(pattern: str | os.PathLike) -> list[str]:
    """Sorted local files named by a file path, a directory (its data files, recursively) or a glob."""
    pattern = os.path.expanduser(os.fspath(pattern))
    if os.path.isdir(pattern):
        files = sorted(str(p) for p in Path(pattern).rglob("*") if p.is_file() and _file_format(str(p)))
    else:
        files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        raise FileNotFoundError(
            f"no data files match {pattern!r}: pass an existing file, a directory or a glob such as "
            "'data/*.jsonl' (formats .txt, .json, .jsonl, .parquet, optionally .gz), or 'c4' to stream "
            "allenai/c4 from the Hugging Face Hub"
        )
    return files


@contextlib.contextmanager
def _no_hub_calls_for_local_files(datasets_module):
    # ``load_dataset`` pings the Hub to count downloads even for local files; offline that costs a
    # multi-second DNS timeout on every call, so local loads switch the counter off.
    config = datasets_module.config
    if not hasattr(config, "HF_UPDATE_DOWNLOAD_COUNTS"):  # versions without the counter
        yield
        return
    saved, config.HF_UPDATE_DOWNLOAD_COUNTS = config.HF_UPDATE_DOWNLOAD_COUNTS, False
    try:
        yield
    finally:
        config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def load_text_dataset(
    source: str | os.PathLike,
    *,
    split: str = "train",
    text_field: str | None = "text",
    streaming: bool = True,
    data_format: Literal["text", "json", "parquet"] | None = None,
):
    """A Hugging Face dataset for ``"c4"`` (``allenai/c4``, ``en``, from the Hub) or local files.

    Local ``source`` is a file, directory or glob; ``data_format`` defaults to the files' suffix
    (``.txt`` gives one record ``{"text": line}`` per line). Raises ``FileNotFoundError`` when nothing
    matches, and ``KeyError`` when the columns are known and lack ``text_field`` (``None``: no check).
    """
    import datasets

    if isinstance(source, str) and source.lower() == "c4":
        dataset = datasets.load_dataset(C4_PATH, C4_CONFIG, split=split, streaming=streaming)
    else:
        files = resolve_data_files(source)
        if data_format is None:
            formats = {_file_format(f) for f in files}
            if len(formats) != 1 or None in formats:
                raise ValueError(
                    f"cannot tell one data format for {files[:5]}{'...' if len(files) > 5 else ''}: use files of a "
                    "single kind (.txt, .json/.jsonl, .parquet) or pass data_format='text'|'json'|'parquet'"
                )
            data_format = formats.pop()
        check_choice("data_format", data_format, ("text", "json", "parquet"))
        with _no_hub_calls_for_local_files(datasets):
            dataset = datasets.load_dataset(data_format, data_files={split: files}, split=split, streaming=streaming)
    columns = dataset.column_names
    if text_field is not None and columns is not None and text_field not in columns:
        raise KeyError(
            f"{os.fspath(source)!r} has columns {columns} but no {text_field!r}: pass text_field=<one of them>"
        )
    return dataset


def _is_instance_of_datasets(obj, class_name: str) -> bool:
    module = sys.modules.get("datasets")  # an object can only be a datasets one if datasets is imported
    return module is not None and isinstance(obj, getattr(module, class_name))


class ProcessShard:
    """One process's share of a source, readable epoch after epoch from any saved position.

    A position is ``(records_read, source_state)``: records of this shard read so far in the epoch,
    and the source's own position there, so resuming seeks instead of re-reading: for local text and
    JSON files (read by :class:`~mora_jax.data.local_files.LineFiles`, which names the file and line
    of every record) the file, byte offset and line; for a ``datasets.IterableDataset`` (the Hub,
    Parquet files) its ``state_dict()``. IterableDatasets are split with ``split_dataset_by_node``
    (whole files per process when their number divides, else every ``n``-th record); other sources
    take every ``n``-th record.
    """

    def __init__(self, source, *, split: str, text_field: str | None, process_index: int, process_count: int):
        check_process(process_index, process_count)
        self.lines = _line_files(source, text_field)
        if self.lines is not None:
            source = self.lines.files
        elif isinstance(source, (str, os.PathLike)):
            source = load_text_dataset(source, split=split, text_field=text_field)
        elif isinstance(source, (bytes, Mapping)) or not (callable(source) or isinstance(source, Iterable)):
            raise TypeError(
                f"a source is 'c4', a path, a datasets dataset or an iterable of records, got {type(source)}"
            )
        self.source = source
        self.process_index, self.process_count = process_index, process_count
        self.is_iterable_dataset = _is_instance_of_datasets(source, "IterableDataset")
        # A generator can be read once; lists, datasets and callables give a fresh pass per epoch.
        self._one_shot = not (self.is_iterable_dataset or callable(source)) and iter(source) is source
        self._opened = False

    def describe(self) -> str:
        """The source in a few words, for messages: its files, or what it is."""
        if self.lines is not None:
            files = self.lines.files
            return ("data file " + files[0]) if len(files) == 1 else (
                f"{len(files)} data files ({', '.join(files[:3])}{', ...' if len(files) > 3 else ''})")
        return f"data source {self.source!r}"[:200]

    def where(self, position, fallback: str) -> str:
        """The file and line of the record at ``position`` (local files), else ``fallback``."""
        state = position[1]
        if self.lines is not None and isinstance(state, dict) and state.get("format") == LINES_STATE_FORMAT:
            return self.lines.describe(state)
        return fallback

    def _line_records(self, records_read: int, source_state):
        """This process's records of local files from a position (see :meth:`records`)."""
        start = source_state if isinstance(source_state, dict) and source_state.get("format") == LINES_STATE_FORMAT else None
        if start is None and source_state is not None and self.process_count > 1:
            raise ValueError("cannot resume: the data state was saved by a version that read local files through "
                             "datasets, which split them differently between processes; restart the data from the "
                             "beginning or resume with that version")
        read = records_read if start is not None else 0  # without a position, re-read up to records_read
        for record, state in self.lines.records(start):
            if state["index"] % self.process_count != self.process_index:
                continue
            if read < records_read:
                read += 1
                continue
            yield record, (read, state)
            read += 1
        if read < records_read:
            raise ValueError(f"cannot resume: the source now has {read} records for this process, the saved "
                             f"state read {records_read}; resume with the data the state was saved with")

    def records(self, epoch: int, records_read: int = 0, source_state: dict | None = None):
        """Yields ``(record, position_before_it)`` from the given position of ``epoch``."""
        if self.lines is not None:
            yield from self._line_records(records_read, source_state)
            return
        if self._one_shot and self._opened:
            raise ValueError(
                "this source is a one-shot iterator and was already read: for several epochs or a resume, "
                "pass a list or a zero-argument callable that returns a fresh iterable"
            )
        self._opened = True
        if self.is_iterable_dataset:
            from datasets.distributed import split_dataset_by_node

            shard = split_dataset_by_node(self.source, rank=self.process_index, world_size=self.process_count)
            shard.set_epoch(epoch)
            if source_state is not None:
                shard.load_state_dict(source_state)
            records = iter(shard)
            current_state = lambda: shard.state_dict()  # noqa: E731
        else:
            shard = self.source() if callable(self.source) else self.source
            records = itertools.islice(iter(shard), self.process_index, None, self.process_count)
            source_state, current_state = None, lambda: None  # noqa: E731
        if source_state is None and records_read:
            skipped = sum(1 for _ in itertools.islice(records, records_read))
            if skipped < records_read:
                raise ValueError(
                    f"cannot resume: the source now has {skipped} records for this process, the saved "
                    f"state read {records_read}; resume with the data the state was saved with"
                )
        position = (records_read, source_state)
        for record in records:
            yield record, position
            position = (position[0] + 1, current_state())


def _line_files(source, text_field: str | None) -> LineFiles | None:
    """A :class:`LineFiles` reader for a local path whose files are all text or all JSON, else None."""
    if not isinstance(source, (str, os.PathLike)) or (isinstance(source, str) and source.lower() == "c4"):
        return None
    files = resolve_data_files(source)
    kinds = {line_file_kind(f) for f in files}
    if len(kinds) != 1 or None in kinds:
        return None  # Parquet, other compressions or a mix: datasets reads them (or says why not)
    lines = LineFiles(files)
    if lines.kind == "text" and text_field not in (None, "text"):
        raise KeyError(f"{os.fspath(source)!r} holds text files, whose records have the one field 'text', "
                       f"not {text_field!r}: pass text_field='text'")
    return lines

"""Pretraining batches: documents tokenised, EOS-terminated and packed into fixed-length rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mora_jax.data.batching import (
    BadRecordError,
    DataError,
    bad_record_error,
    check_common_config,
    check_state,
    format_report,
    new_stats,
)
from mora_jax.data.local_files import BadLine
from mora_jax.data.sources import ProcessShard
from mora_jax.data.tokenizer import Tokenizer

PRETRAIN_STATE_FORMAT = "mora_jax.data.pretrain/v1"


@dataclass(frozen=True)
class PretrainDataConfig:
    """How documents become packed pretraining batches.

    Documents are tokenised, ``[bos] +`` (if ``add_bos``) ``tokens + [eos]``, concatenated into one
    stream and cut into rows of ``seq_len`` tokens; a document continues in the next row.
    ``batch_size`` is per process. ``max_document_tokens`` caps a document's length (``overlong``
    says whether longer ones are truncated, keeping their EOS, or dropped). With ``drop_remainder``
    the stream's last incomplete batch is dropped, otherwise it is padded (``segment_ids`` 0).
    A record without its text field, or a line of a local file that is not valid UTF-8 (or JSON),
    is an error naming the file and line (``on_bad_record='error'``) or is counted and skipped
    (``'skip'``); empty texts are always skipped and counted.
    """

    seq_len: int
    batch_size: int
    text_field: str = "text"
    split: str = "train"
    add_bos: bool = False
    num_epochs: int | None = 1
    max_document_tokens: int | None = None
    overlong: Literal["truncate", "drop"] = "truncate"
    on_bad_record: Literal["error", "skip"] = "error"
    drop_remainder: bool = True

    def __post_init__(self):
        check_common_config(self)
        if self.max_document_tokens is not None and self.max_document_tokens < 2:
            raise ValueError(f"max_document_tokens must be >= 2 or None, got {self.max_document_tokens!r}")


class PretrainBatchIterator:
    """Packed pretraining batches from a source; ``mora_jax.data``'s docstring describes the batch keys.

    The saved state is the position (epoch, records read, source state) *before* the document in
    progress plus how many of its tokens were used: resuming re-reads and re-tokenises that one
    document instead of storing a token buffer.
    """

    def __init__(
        self,
        source,
        tokenizer: Tokenizer,
        config: PretrainDataConfig,
        *,
        process_index: int = 0,
        process_count: int = 1,
        state: Mapping | None = None,
    ):
        if tokenizer.eos_id < 0 or (config.add_bos and tokenizer.bos_id < 0):
            raise ValueError(f"{tokenizer!r} lacks the EOS (or, with add_bos, BOS) token the packing needs")
        self.config, self.tokenizer = config, tokenizer
        self._shard = ProcessShard(
            source,
            split=config.split,
            text_field=config.text_field,
            process_index=process_index,
            process_count=process_count,
        )
        self.stats = new_stats()
        self._epoch, self._position, self._finished = 0, (0, None), False
        self._records = None  # live iterator over (record, position) of the current epoch
        self._document_tokens: np.ndarray | None = None  # the document in progress, started at self._position
        self._document_tokens_used = 0
        self._documents_this_epoch, self._epoch_read_from_start = 0, True
        if state is not None:
            self.set_state(state)

    def __iter__(self) -> PretrainBatchIterator:
        return self

    def report(self) -> str:
        return format_report("pretraining", self.stats)

    def _text_of(self, record, position, count: bool) -> str | None:
        field = self.config.text_field
        if isinstance(record, BadLine):
            if self.config.on_bad_record == "error":
                raise BadRecordError(bad_record_error(f"{record.file} line {record.line}", record.problem))
            self.stats["skipped_unreadable"] += count
            return None
        text = record if isinstance(record, str) else record.get(field) if isinstance(record, Mapping) else None
        if not isinstance(text, str):
            if self.config.on_bad_record == "error":
                found = sorted(record) if isinstance(record, Mapping) else type(record).__name__
                where = self._shard.where(position, f"record {position[0]} of process {self._shard.process_index}")
                raise BadRecordError(bad_record_error(
                    where, f"no text field {field!r} (found {found}); pass text_field=<the text column>"))
            self.stats["skipped_missing_fields"] += count
            return None
        if not text.strip():
            self.stats["skipped_empty"] += count
            return None
        return text

    def _tokenize(self, text: str, count: bool) -> np.ndarray | None:
        bos = [self.tokenizer.bos_id] if self.config.add_bos else []
        ids = bos + self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        limit = self.config.max_document_tokens
        if limit is not None and len(ids) > limit:
            if self.config.overlong == "drop":
                self.stats["dropped"] += count
                return None
            ids = ids[: limit - 1] + [self.tokenizer.eos_id]
            self.stats["truncated"] += count
        self.stats["documents"] += count
        self.stats["tokens"] += count * len(ids)
        return np.asarray(ids, dtype=np.int32)

    def _next_document(self) -> np.ndarray:
        while True:
            if self._records is None:
                self._records = self._shard.records(self._epoch, *self._position)
                self._documents_this_epoch, self._epoch_read_from_start = 0, self._position[0] == 0
            try:
                record, position = next(self._records)
            except StopIteration:
                if self._documents_this_epoch == 0 and self._epoch_read_from_start:
                    raise DataError(
                        f"no usable documents in {self._shard.describe()} for process {self._shard.process_index}: "
                        f"{self.report()}; check the source, text_field and max_document_tokens"
                    ) from None
                self._epoch += 1
                self._position, self._records, self._document_tokens = (0, None), None, None
                if self.config.num_epochs is not None and self._epoch >= self.config.num_epochs:
                    self._finished = True
                    raise
                continue
            text = self._text_of(record, position, count=True)
            tokens = None if text is None else self._tokenize(text, count=True)
            if tokens is not None:
                self._documents_this_epoch += 1
                self._position = position
                return tokens

    def __next__(self) -> dict[str, np.ndarray]:
        if self._finished:
            raise StopIteration
        batch_size, seq_len = self.config.batch_size, self.config.seq_len
        pieces, filled, needed = [], 0, batch_size * seq_len
        while filled < needed:
            if self._document_tokens is None or self._document_tokens_used == len(self._document_tokens):
                try:
                    self._document_tokens, self._document_tokens_used = self._next_document(), 0
                except StopIteration:
                    if filled == 0 or self.config.drop_remainder:
                        raise
                    break
            start = self._document_tokens_used
            take = min(needed - filled, len(self._document_tokens) - start)
            pieces.append(self._document_tokens[start : start + take])
            self._document_tokens_used += take
            filled += take
        input_ids_N = np.full(needed, self.tokenizer.pad_id, dtype=np.int32)
        input_ids_N[:filled] = np.concatenate(pieces)
        segment_ids_N = (np.arange(needed) < filled).astype(np.int32)
        loss_mask_N = (np.arange(needed) < filled - 1).astype(np.int32)
        shape = (batch_size, seq_len)
        loss_mask_BT = loss_mask_N.reshape(shape)
        loss_mask_BT[:, -1] = 0
        self.stats["batches"] += 1
        return {
            "input_ids": input_ids_N.reshape(shape),
            "loss_mask": loss_mask_BT,
            "segment_ids": segment_ids_N.reshape(shape),
            "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)) * segment_ids_N.reshape(shape),
        }

    def _identity(self) -> dict[str, Any]:
        return {
            "seq_len": self.config.seq_len,
            "process_index": self._shard.process_index,
            "process_count": self._shard.process_count,
        }

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: give it to ``set_state`` or ``state=`` to continue from here."""
        in_progress = self._document_tokens is not None
        return {
            "format": PRETRAIN_STATE_FORMAT,
            **self._identity(),
            "epoch": self._epoch,
            "records_read": self._position[0],
            "source_state": self._position[1],
            "document_tokens_used": self._document_tokens_used if in_progress else None,
            "finished": self._finished,
            "stats": dict(self.stats),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``get_state()`` dict (same source, tokenizer, ``seq_len`` and process split)."""
        check_state(state, PRETRAIN_STATE_FORMAT, self._identity())
        self.stats = {**new_stats(), **state["stats"]}
        self._epoch, self._finished = int(state["epoch"]), bool(state["finished"])
        self._position = (int(state["records_read"]), state["source_state"])
        self._records, self._document_tokens, self._document_tokens_used = None, None, 0
        if state["document_tokens_used"] is not None and not self._finished:
            self._records = self._shard.records(self._epoch, *self._position)
            self._documents_this_epoch, self._epoch_read_from_start = 1, False
            record, _ = next(self._records, (None, None))
            text = None if record is None else self._text_of(record, self._position, count=False)
            tokens = None if text is None else self._tokenize(text, count=False)
            if tokens is None or len(tokens) < state["document_tokens_used"]:
                raise ValueError(
                    "cannot resume: the saved document in progress is no longer in the source; "
                    "resume with the data and tokenizer the state was saved with"
                )
            self._document_tokens, self._document_tokens_used = tokens, int(state["document_tokens_used"])


def pretrain_batches(
    source,
    tokenizer: Tokenizer,
    config: PretrainDataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    state: Mapping | None = None,
) -> PretrainBatchIterator:
    """Packed pretraining batches of this process's shard of ``source`` (resumed from ``state`` if given)."""
    return PretrainBatchIterator(
        source, tokenizer, config, process_index=process_index, process_count=process_count, state=state
    )

"""Conventions and bookkeeping shared by the pretraining and fine-tuning batch iterators."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from mora_jax.errors import UserError

STATS_KEYS = ("documents", "tokens", "batches", "skipped_empty", "skipped_missing_fields", "skipped_unreadable",
              "truncated", "dropped")
ON_BAD_RECORD = ("error", "skip")  # what a record without its fields, or an unreadable line, does


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_process(process_index: int, process_count: int) -> None:
    if not (isinstance(process_count, int) and process_count >= 1 and 0 <= process_index < process_count):
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")


def check_common_config(config) -> None:
    for name in ("seq_len", "batch_size"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "seq_len" else 1):
            raise ValueError(f"{name} must be an int >= {2 if name == 'seq_len' else 1}, got {value!r}")
    if config.num_epochs is not None and (not isinstance(config.num_epochs, int) or config.num_epochs < 1):
        raise ValueError(f"num_epochs must be a positive int or None (repeat forever), got {config.num_epochs!r}")
    check_choice("overlong", config.overlong, ("truncate", "drop"))
    check_choice("on_bad_record", config.on_bad_record, ON_BAD_RECORD)


def new_stats() -> dict[str, int]:
    return dict.fromkeys(STATS_KEYS, 0)


def format_report(kind: str, stats: Mapping[str, int]) -> str:
    unreadable = stats.get("skipped_unreadable", 0)
    return (
        f"{kind} data: {stats['documents']} documents, {stats['tokens']} tokens, {stats['batches']} batches; "
        f"skipped {stats['skipped_empty']} empty and {stats['skipped_missing_fields']} with missing fields"
        + (f" and {unreadable} unreadable lines (invalid UTF-8 or malformed JSON)" if unreadable else "")
        + f"; {stats['truncated']} truncated, {stats['dropped']} dropped as too long"
    )


class DataError(UserError, ValueError):
    """The data cannot feed the run (no usable record, a file that cannot be read); the message
    names the source or file and what to do."""


class BadRecordError(DataError):
    """A record lacks a field the pipeline needs, or a line of a local file is unreadable (invalid
    UTF-8 or JSON); the message names the file and line (or the record's index)."""


def bad_record_error(where: str, problem: str) -> str:
    """The message of a bad record under ``on_bad_record='error'``: where it is, what is wrong, the way out."""
    return (f"{where}: {problem}; fix the data, or pass on_bad_record='skip' (data.on_bad_record='skip' in a "
            "run config) to count and skip such records")


def check_state(state: Mapping, expected_format: str, expected: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or state.get("format") != expected_format:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"not a {expected_format} iterator state (format {found!r})")
    for key, value in expected.items():
        if state.get(key) != value:
            raise ValueError(
                f"cannot resume: the state was saved with {key}={state.get(key)!r}, this iterator has "
                f"{key}={value!r}; build it with the saved settings"
            )


def next_token_targets(input_ids_BT: np.ndarray, pad_id: int) -> np.ndarray:
    """``targets[:, t] = input_ids[:, t + 1]``, ``pad_id`` in the last column (where ``loss_mask`` is 0)."""
    input_ids_BT = np.asarray(input_ids_BT)
    pad_B1 = np.full_like(input_ids_BT[:, :1], pad_id)
    return np.concatenate([input_ids_BT[:, 1:], pad_B1], axis=1)

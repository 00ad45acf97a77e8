"""The data of Hugging Face PEFT's MetaMathQA method comparison, as this project's fine-tuning records.

PEFT's benchmark (github.com/huggingface/peft, method_comparison/MetaMathQA/data.py) trains on
MetaMathQA without the records whose ``f"{query} {response}"`` is longer than 1,300 characters (a
proxy for 768 tokens, the same for every tokenizer), validates on 50 records of GSM8K's train split
(the first 50 of a permutation by NumPy's legacy generator seeded 0) and tests on all of GSM8K's test
split. GSM8K's ``question`` / ``answer`` fields become ``query`` / ``response``, the MetaMathQA
format (``data.format = "metamathqa"``); its answers end in ``#### N``, which
:func:`mora_jax.accuracy.extract_answer` reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import numpy as np

CHAR_LIMIT = 1300  # PEFT's CHAR_LIMIT: len(f"{query} {response}") of a kept MetaMathQA record
VALID_SIZE = 50  # PEFT's VALID_SIZE: GSM8K train records in the validation split
VALID_SEED = 0  # PEFT seeds NumPy's global (legacy) generator with 0 before the permutation


def within_char_limit(records: Iterable[Mapping], limit: int = CHAR_LIMIT) -> Iterator[dict]:
    """MetaMathQA ``query`` / ``response`` records whose ``"query response"`` has at most ``limit`` characters."""
    for number, record in enumerate(records):
        if "query" not in record or "response" not in record:
            raise ValueError(f"MetaMathQA record {number} has no query or response field (fields: {sorted(record)})")
        if len(f"{record['query']} {record['response']}") <= limit:
            yield {"query": record["query"], "response": record["response"]}


def gsm8k_records(records: Iterable[Mapping]) -> list[dict]:
    """GSM8K ``question`` / ``answer`` records as ``query`` / ``response`` records."""
    out = []
    for number, record in enumerate(records):
        missing = [f for f in ("question", "answer") if f not in record]
        if missing:
            raise ValueError(f"GSM8K record {number} has no {' or '.join(missing)} field (fields: {sorted(record)})")
        out.append({"query": record["question"], "response": record["answer"]})
    return out


def valid_indices(num_records: int, size: int = VALID_SIZE, seed: int = VALID_SEED) -> np.ndarray:
    """The indices of PEFT's validation records among ``num_records`` GSM8K train records."""
    indices = np.arange(num_records)
    np.random.RandomState(seed).shuffle(indices)
    return indices[:size]


__all__ = ["CHAR_LIMIT", "VALID_SEED", "VALID_SIZE", "gsm8k_records", "valid_indices", "within_char_limit"]

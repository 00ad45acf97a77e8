"""Data pipelines: text sources, tokenizers (SentencePiece ``.model`` or a checkpoint's
``tokenizer.json``, with its chat template), packed pretraining batches and masked fine-tuning
batches, all deterministic and resumable.

Sources
-------
Every pipeline reads a *source*, one of:

* ``"c4"``: ``allenai/c4`` (config ``en``) streamed from the Hugging Face Hub;
* a local path, directory or glob of ``.txt`` (one record per line), ``.json``/``.jsonl`` or ``.parquet``
  files (optionally ``.gz``-compressed), read with ``datasets.load_dataset(..., streaming=True)``;
* a ``datasets.IterableDataset`` or ``datasets.Dataset``;
* an in-memory iterable of strings or dicts (a list, or a zero-argument callable returning a fresh
  iterable, so that generated records can go through the same path and be read for several epochs).

Batches
-------
Both pipelines yield dicts of NumPy ``int32`` arrays, all of shape ``(batch_size, seq_len)``, where
``batch_size`` is the batch of *this process*:

``input_ids``
    token ids; padding holds ``tokenizer.pad_id``.
``loss_mask``
    1 where the prediction made *at* position ``t`` (of token ``t + 1``) is trained. Targets are
    shifted inside the loss (see :func:`next_token_targets`)::

        loss = sum(ce(logits[:, :-1], input_ids[:, 1:]) * loss_mask[:, :-1]) / sum(loss_mask)

    The last column is always 0 (its next token is not in the row).
``segment_ids``
    which example each token belongs to, numbered 1, 2, ... within a row; 0 is padding. Attention
    stays within a segment: query ``q`` may see key ``k`` iff ``segment_ids[q] == segment_ids[k] != 0``
    and ``k <= q`` (a plain ``attention_mask`` is ``segment_ids > 0``).
``positions``
    index of each token inside its segment (for RoPE), restarting at 0 for every segment; 0 on padding.

Pretraining rows are one causal stream each (GPT-style packing: documents separated by EOS,
``segment_ids`` all 1 and ``positions`` ``0..seq_len-1``). Fine-tuning rows hold one padded example,
or several packed examples with their own segments, and train on response tokens only.

Iterators expose ``stats`` (counts of ``documents``, ``tokens``, ``batches``, ``skipped_empty``,
``skipped_missing_fields``, ``skipped_unreadable``, ``truncated``, ``dropped``), ``report()``, and
``get_state()`` / ``set_state(state)`` (or ``state=`` at construction): a small JSON-serialisable dict
from which a new iterator yields exactly the batches the old one would have yielded next.

Bad records: a record without the fields it needs, or a line of a local file that is not valid UTF-8
(or JSON), is a :class:`BadRecordError` naming the file and line (``on_bad_record='error'``, the
default) or is counted and skipped (``'skip'``; ``skipped_missing_fields`` / ``skipped_unreadable``).

Modules: ``sources`` (files, the Hub, per-process sharding), ``local_files`` (text and JSON files read
line by line), ``tokenizer``, ``pretrain``, ``finetune``, ``synthetic`` (the offline corpus) and
``batching`` (bookkeeping the iterators share).
"""

from mora_jax.data.batching import STATS_KEYS, next_token_targets
from mora_jax.data.finetune import (
    ALPACA_PROMPT_TEMPLATE,
    ALPACA_PROMPT_TEMPLATE_NO_INPUT,
    METAMATHQA_PROMPT_TEMPLATE,
    BadRecordError,
    FinetuneBatchIterator,
    FinetuneDataConfig,
    finetune_batches,
    format_prompt_response,
    template_fields,
)
from mora_jax.data.pretrain import PretrainBatchIterator, PretrainDataConfig, pretrain_batches
from mora_jax.data.sources import load_text_dataset, resolve_data_files
from mora_jax.data.synthetic import (
    synthetic_corpus_lines,
    synthetic_math_records,
    write_synthetic_corpus,
    write_synthetic_math,
)
from mora_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer, Tokenizer, train_tokenizer

__all__ = [
    "ALPACA_PROMPT_TEMPLATE",
    "ALPACA_PROMPT_TEMPLATE_NO_INPUT",
    "METAMATHQA_PROMPT_TEMPLATE",
    "STATS_KEYS",
    "BadRecordError",
    "FinetuneBatchIterator",
    "FinetuneDataConfig",
    "HFTokenizer",
    "PretrainBatchIterator",
    "PretrainDataConfig",
    "SentencePieceTokenizer",
    "Tokenizer",
    "finetune_batches",
    "format_prompt_response",
    "load_text_dataset",
    "next_token_targets",
    "pretrain_batches",
    "resolve_data_files",
    "synthetic_corpus_lines",
    "synthetic_math_records",
    "template_fields",
    "train_tokenizer",
    "write_synthetic_corpus",
    "write_synthetic_math",
]

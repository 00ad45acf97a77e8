"""SentencePiece tokenizer: load a ``.model`` file, or train one deterministically from a source."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from mora_jax.data.sources import ProcessShard


class Tokenizer:
    """A SentencePiece model loaded from a ``.model`` file (ours, or e.g. LLaMA's ``tokenizer.model``)."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece

        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(
                f"no SentencePiece model at {str(path)!r}: train one with `python -m train.train_tokenizer "
                "--input corpus.txt --vocab-size 512 --out tok` (writes tok.model), or use a LLaMA tokenizer.model"
            )
        self.model_file = str(path)
        self._processor = sentencepiece.SentencePieceProcessor(model_file=self.model_file)

    @property
    def vocab_size(self) -> int:
        return int(self._processor.get_piece_size())

    @property
    def bos_id(self) -> int:
        """Beginning-of-sequence id, -1 when the model has none."""
        return int(self._processor.bos_id())

    @property
    def eos_id(self) -> int:
        """End-of-sequence id, -1 when the model has none."""
        return int(self._processor.eos_id())

    @property
    def pad_id(self) -> int:
        """The model's pad id, or ``eos_id`` when it defines none (LLaMA); padding is never trained."""
        pad_id = int(self._processor.pad_id())
        return pad_id if pad_id >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS or EOS."""
        return self._processor.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (control tokens such as BOS, EOS and pad decode to nothing)."""
        return self._processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def id_to_piece(self, token_id: int) -> str:
        return self._processor.id_to_piece(int(token_id))

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


def _training_lines(source, text_field: str) -> Iterator[str]:
    """Non-empty lines of a source's texts (SentencePiece skips over-long "sentences", so split documents)."""
    shard = ProcessShard(source, split="train", text_field=text_field, process_index=0, process_count=1)
    for record, _ in shard.records(epoch=0):
        text = record if isinstance(record, str) else record.get(text_field) if isinstance(record, Mapping) else None
        if isinstance(text, str):
            yield from (line for line in text.splitlines() if line.strip())


def train_tokenizer(
    source,
    out_prefix: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: Literal["bpe", "unigram"] = "bpe",
    text_field: str = "text",
    max_sentences: int | None = 2_000_000,
    byte_fallback: bool = True,
    character_coverage: float = 1.0,
    num_threads: int = 1,
    seed: int = 0,
    verbose: bool = False,
) -> Tokenizer:
    """Train a SentencePiece model on the lines of a source; writes ``out_prefix.model`` and ``.vocab``.

    Settings follow LLaMA's tokenizer (byte fallback, split digits, identity normalisation, so
    ``decode(encode(text)) == text``) with ids ``unk=0, bos=1, eos=2, pad=3``. The first
    ``max_sentences`` non-empty lines are used in order and ``num_threads=1``, so the same input gives
    the same model; the vocabulary size is a soft limit (a small corpus may give fewer pieces). Byte
    fallback reserves 256 ids, so it needs ``vocab_size`` above ~260 + the corpus's characters.
    """
    import sentencepiece

    out_prefix = str(out_prefix).removesuffix(".model")
    Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    sentencepiece.set_random_generator_seed(seed)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=itertools.islice(_training_lines(source, text_field), max_sentences),
            model_prefix=out_prefix,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            hard_vocab_limit=False,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=num_threads,
            minloglevel=0 if verbose else 2,
        )
    except RuntimeError as error:
        hint = " (byte_fallback uses 256 ids: raise vocab_size or pass byte_fallback=False)" if byte_fallback else ""
        raise RuntimeError(f"SentencePiece training failed: {error}{hint}") from None
    return Tokenizer(out_prefix + ".model")

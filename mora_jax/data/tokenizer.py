"""Tokenizers behind one interface: a SentencePiece ``.model`` (ours, LLaMA 1/2's) or a Hugging Face
``tokenizer.json`` (the ``tokenizers`` library: Llama 3, Qwen2, Mistral ship only this), with the
checkpoint's special tokens and chat template; and training a SentencePiece model deterministically.

``Tokenizer(path)`` picks the kind from ``path``: a ``.model`` file, a ``tokenizer.json`` file, or a
checkpoint directory holding either (``tokenizer.json`` preferred, as ``transformers`` does). Every
tokenizer has ``vocab_size``, ``bos_id`` / ``eos_id`` / ``pad_id`` (-1 when absent), ``adds_bos``,
``encode(text)`` (no special tokens added), ``decode(ids)``, ``id_to_piece``, and, when the
checkpoint has one, ``chat_template`` / ``apply_chat_template(messages)``. :meth:`Tokenizer.check_fits`
refuses a tokenizer whose vocabulary does not fit a model, or whose BOS / EOS are not the model's.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mora_jax.data import chat_template as chat_lib
from mora_jax.data.sources import ProcessShard

HF_TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


def _tokenizer_class(path) -> type:
    p = Path(path)
    if p.is_dir():
        if (p / HF_TOKENIZER_FILE).is_file():
            return HFTokenizer
        if (p / SENTENCEPIECE_FILE).is_file():
            return SentencePieceTokenizer
        raise FileNotFoundError(
            f"no {HF_TOKENIZER_FILE} or {SENTENCEPIECE_FILE} in {p}; give the checkpoint's tokenizer (copy it from the "
            "base model's directory) or a SentencePiece .model file"
        )
    return HFTokenizer if p.suffix == ".json" else SentencePieceTokenizer


class Tokenizer:
    """A tokenizer (see the module docstring). ``Tokenizer(path)`` returns a
    :class:`SentencePieceTokenizer` or an :class:`HFTokenizer` according to ``path``."""

    directory: Path | None = None  # where tokenizer_config.json / the chat template are looked up
    _template: str | None = None
    _template_path = None  # the file the chat template came from
    _special: dict[str, str | None] = {}

    def __new__(cls, path=None, *args, **kwargs):
        if cls is Tokenizer:
            if path is None:
                raise TypeError("Tokenizer(path): give a .model file, a tokenizer.json or a checkpoint directory")
            cls = _tokenizer_class(path)
        return super().__new__(cls)

    # ---- subclasses provide ----
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- shared ----
    @property
    def adds_bos(self) -> bool:
        """Whether sequences start with BOS (HF: the checkpoint's ``add_bos_token``; Qwen2 has none)."""
        return self.bos_id >= 0

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's chat template (jinja2 source), or None."""
        return self._template

    def _load_extras(self, directory: Path | None) -> None:
        """Special-token strings and the chat template from the checkpoint directory's files."""
        self.directory = directory
        self._special, self._config = {}, {}
        if directory is None:
            return
        for fname in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            path = directory / fname
            if path.is_file():
                try:
                    data = json.loads(path.read_text())
                except ValueError as e:
                    raise ValueError(f"{path} is not valid JSON ({e}); re-download it") from None
                except RecursionError:
                    raise ValueError(f"{path} is nested too deeply to read as JSON; re-download it") from None
                if not isinstance(data, Mapping):
                    raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}; re-download it")
                if fname == "tokenizer_config.json":
                    self._config = data
                for name in _SPECIAL_NAMES:
                    if name in data:
                        value = data[name]
                        self._special[name] = value.get("content") if isinstance(value, Mapping) else value
        found = chat_lib.locate_chat_template(directory)
        self._template, self._template_path = found if found is not None else (None, None)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                            **variables) -> str:
        """The chat text of ``messages`` (as ``transformers``' ``apply_chat_template(tokenize=False)``);
        it already holds the template's BOS, so encode it with :meth:`encode` (no BOS added)."""
        if self._template is None:
            where = self.directory or "the tokenizer's directory"
            raise chat_lib.ChatTemplateError(
                f"{self!r} has no chat template (looked for {', '.join(chat_lib.TEMPLATE_FILES)} in {where}); use the "
                "instruct checkpoint's tokenizer files, or plain prompts (data.chat_template=False)"
            )
        return chat_lib.render(self._template, messages, add_generation_prompt=add_generation_prompt,
                               special_tokens=self._special, source=self._template_path, **variables)

    def check_fits(self, vocab_size: int, *, bos_token_id: int | None = None,
                   eos_token_id: int | Sequence[int] | None = None, model: str = "the model") -> None:
        """Raise ``ValueError`` unless every token id fits a model of ``vocab_size`` and the special
        ids the model's config names are this tokenizer's (a tokenizer from another model)."""
        if self.vocab_size > vocab_size:
            raise ValueError(
                f"{self!r} has {self.vocab_size} tokens but {model} only {vocab_size} embeddings: ids past "
                f"{vocab_size - 1} would be out of range. Use the tokenizer of the same checkpoint"
            )
        eos_ids = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
        wrong = []
        if bos_token_id is not None and self.bos_id >= 0 and bos_token_id != self.bos_id:
            wrong.append(f"BOS is {self.bos_id} here, {bos_token_id} in the model's config")
        outside = [i for i in eos_ids if i >= self.vocab_size]
        if outside:
            wrong.append(f"the model's EOS id(s) {outside} are not in this vocabulary of {self.vocab_size}")
        elif eos_ids and self.eos_id >= 0 and self.eos_id not in eos_ids and all(
                self.id_to_piece(i) not in self._special.values() for i in eos_ids):
            wrong.append(f"EOS is {self.eos_id} here, {list(eos_ids)} in the model's config")
        if wrong:
            raise ValueError(
                f"{self!r} is not the tokenizer of {model}: {'; '.join(wrong)}. Use the tokenizer files from the "
                "same checkpoint (leave data.tokenizer empty to take them from model.hf_path)"
            )


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model loaded from a ``.model`` file (ours, or e.g. LLaMA's ``tokenizer.model``),
    or from a checkpoint directory holding ``tokenizer.model``."""

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece

        path = Path(model_file)
        if path.is_dir():
            path = path / SENTENCEPIECE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"no SentencePiece model at {str(path)!r}: train one with `python -m train.train_tokenizer "
                "--input corpus.txt --vocab-size 512 --out tok` (writes tok.model), or use a LLaMA tokenizer.model"
            )
        self.model_file = str(path)
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a SentencePiece model ({e}); re-download or re-train it") from None
        self._load_extras(path.parent if (path.parent / "tokenizer_config.json").is_file() else None)

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


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (``tokenizer.json``, via the ``tokenizers`` library), with the
    special tokens and chat template of ``tokenizer_config.json`` next to it.

    ``encode`` adds no special tokens (the pipelines add BOS / EOS themselves, and a chat template
    writes its own); ``decode`` skips special tokens. Special-token strings inside a text (e.g. a
    rendered chat template's ``<|begin_of_text|>``) encode to their ids, as in ``transformers``.
    """

    def __init__(self, path: str | os.PathLike):
        try:
            import tokenizers
        except ImportError as e:  # pragma: no cover - a dependency
            raise ImportError("tokenizer.json files need the tokenizers library (pip install tokenizers)") from e
        path = Path(path)
        if path.is_dir():
            path = path / HF_TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {str(path)!r}; copy tokenizer.json from the checkpoint")
        self.tokenizer_file = str(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.tokenizer_file)
        except Exception as e:  # tokenizers raises its own Exception type on malformed files
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({e}); re-download it") from None
        self._load_extras(path.parent)
        self._vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self._ids = {name: self._token_id(name) for name in _SPECIAL_NAMES}

    def _token_id(self, name: str) -> int:
        token = self._special.get(name)
        if token is None:
            return -1
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"{self.directory}: {name} {token!r} (tokenizer_config.json) is not in {self.tokenizer_file}; the "
                "files come from different tokenizers: copy all tokenizer files from one checkpoint"
            )
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        """One more than the largest token id, added tokens included."""
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._ids["bos_token"]

    @property
    def eos_id(self) -> int:
        return self._ids["eos_token"]

    @property
    def pad_id(self) -> int:
        """The pad token's id, or ``eos_id`` when there is none (Llama 3); padding is never trained."""
        return self._ids["pad_token"] if self._ids["pad_token"] >= 0 else self.eos_id

    @property
    def adds_bos(self) -> bool:
        """``add_bos_token`` from tokenizer_config.json, else whether the tokenizer's own post-processor
        starts sequences with BOS (Llama yes, Qwen2 no)."""
        if self.bos_id < 0:
            return False
        if isinstance(self._config.get("add_bos_token"), bool):
            return self._config["add_bos_token"]
        return self._tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS or EOS (special-token strings in ``text`` are recognised)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, special tokens (BOS, EOS, chat markers) skipped."""
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        piece = self._tok.id_to_token(int(token_id))
        if piece is None:
            raise ValueError(f"token id {token_id} is not in {self.tokenizer_file} (vocabulary of {self.vocab_size})")
        return piece

    def __repr__(self) -> str:
        return f"Tokenizer({self.tokenizer_file!r}, vocab_size={self.vocab_size})"


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
) -> SentencePieceTokenizer:
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
    return SentencePieceTokenizer(out_prefix + ".model")

"""A GGUF file's tokenizer as Hugging Face files: ``tokenizer.json`` (built with the ``tokenizers``
library) and ``tokenizer_config.json`` (special tokens, BOS / EOS flags, chat template), which
``mora_jax.data.tokenizer.Tokenizer`` and ``transformers`` both read.

A GGUF file has no ``tokenizer.json``; it keeps the vocabulary as metadata under llama.cpp's names:

- ``tokenizer.ggml.model = "gpt2"``: byte-level BPE. Tokens are spelled in GPT-2's byte alphabet
  (``Ġ`` for a space), ``tokenizer.ggml.merges`` lists the merges (``"a b"``) in rank order, and
  ``tokenizer.ggml.pre`` names the pre-tokenizer: the regular expression that cuts text into words
  before BPE (:data:`PRE_TOKENIZERS`; llama.cpp refuses names it does not know, and so do we).
- ``tokenizer.ggml.model = "llama"``: a SentencePiece vocabulary (``▁`` for a space, ``<0xNN>``
  byte tokens, a score per token, no merges). llama.cpp merges the adjacent pair whose result scores
  highest, which is BPE with merges ranked by the merged token's score, falling back to bytes. The
  space prefix is ``transformers``' (a ``Metaspace`` that prepends ``▁`` to the first piece of text,
  unless it already starts with a space), so a text beginning with a space, or text right after a
  special token, is cut as ``transformers`` cuts it, where SentencePiece and llama.cpp add one more ``▁``.
- ``tokenizer.ggml.token_type``: 1 normal, 2 unknown, 3 control (special, e.g. ``<s>``,
  ``<|im_end|>``), 4 user-defined (added, not special), 5 unused, 6 byte. Control and unknown tokens
  become special added tokens, user-defined ones plain added tokens, so that their text in a prompt
  (a rendered chat template) encodes to their id.

The special tokens and ``add_bos_token`` / ``add_eos_token`` come from the ``tokenizer.ggml.*_token_id``
and ``add_*_token`` keys (a SentencePiece vocabulary without the key adds BOS, as llama.cpp and
``transformers`` do), the chat template from ``tokenizer.chat_template``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TOKENIZER_MODELS = ("gpt2", "llama")  # byte-level BPE, SentencePiece
SPIECE_SPACE = "\u2581"  # ▁

# Pre-tokenizer regexes (public definitions of the models' tokenizers).
_GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (how words are cut, whether a whole word found in the vocabulary skips the merges)
#   "gpt2": GPT-2's regex; "digits": each digit alone, then GPT-2's regex; else a regex.
PRE_TOKENIZERS: dict[str, tuple[str, bool]] = {
    "default": ("gpt2", False), "gpt2": ("gpt2", False),
    "smollm": ("digits", False), "starcoder": ("digits", False), "refact": ("digits", False),
    "codeshell": ("digits", False),
    "llama3": (_LLAMA3_WORDS, True), "llama-v3": (_LLAMA3_WORDS, True), "llama-bpe": (_LLAMA3_WORDS, True),
    "smaug-bpe": (_LLAMA3_WORDS, True), "dbrx": (_LLAMA3_WORDS, False), "falcon3": (_LLAMA3_WORDS, False),
    "qwen2": (_QWEN2_WORDS, False), "deepseek-r1-qwen": (_QWEN2_WORDS, False),
}  # fmt: skip


def _ids_by_type(types: list[int], *wanted: int) -> list[int]:
    return [i for i, t in enumerate(types) if t in wanted]


def score_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's "merge the best-scoring pair" rule: every split of a
    normal token into two vocabulary tokens, the higher the merged token's score the earlier (ties:
    longer left piece first, then vocabulary order)."""
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}  # the first id of a repeated token
    found = []
    for token, score, kind in zip(tokens, scores, types):
        if kind != NORMAL:
            continue
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in vocab and token[k:] in vocab]
        pairs.sort(key=lambda p: (vocab[p[0]], vocab[p[1]]))
        found += [(-score, -len(left), -len(right), left, right) for left, right in pairs]
    found.sort(key=lambda m: m[:3])  # stable: equal keys keep the vocabulary order
    return [(left, right) for *_, left, right in found]


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    words, _ = PRE_TOKENIZERS[pre]
    if words == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if words == "digits":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(words), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _bpe(make, where: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer(make())
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on merges naming unknown tokens
        raise ValueError(f"{where}: the GGUF vocabulary is inconsistent ({e}); re-download or re-convert the file") from None


def build_tokenizer(get: Callable[..., Any], *, where: str):
    """``(tokenizers.Tokenizer, tokenizer_config dict)`` from GGUF metadata; ``get(key, default)`` reads
    a metadata value. ``ValueError`` (naming ``where``) for a vocabulary kind or pre-tokenizer not supported."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

    kind = get("tokenizer.ggml.model")
    if kind not in TOKENIZER_MODELS:
        raise ValueError(f"{where}: GGUF tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level "
                         "BPE: Llama 3, Qwen2, SmolLM) and 'llama' (SentencePiece: Llama 1/2, Mistral)")
    tokens = list(get("tokenizer.ggml.tokens"))
    types = list(get("tokenizer.ggml.token_type", None) or [NORMAL] * len(tokens))
    vocab = {t: i for i, t in reversed(list(enumerate(tokens)))}
    special = {name: get(f"tokenizer.ggml.{key}_token_id", None) for name, key in
               (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))}
    special = {name: tokens[i] for name, i in special.items() if i is not None and 0 <= i < len(tokens)}
    if kind == "gpt2":
        pre = get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZERS:
            raise ValueError(f"{where}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                             f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
        merges = [tuple(m.split(" ")) for m in get("tokenizer.ggml.merges", [])]
        if any(len(m) != 2 for m in merges):
            raise ValueError(f"{where}: tokenizer.ggml.merges has entries that are not two tokens separated by a space")
        tok = _bpe(lambda: models.BPE(vocab, merges, ignore_merges=PRE_TOKENIZERS[pre][1]), where)
        tok.pre_tokenizer = _pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        add_bos = get("tokenizer.ggml.add_bos_token", False)
    else:
        scores = list(get("tokenizer.ggml.scores", None) or [0.0] * len(tokens))
        merges = score_merges(tokens, scores, types)
        tok = _bpe(lambda: models.BPE(vocab, merges, unk_token=special.get("unk_token"), fuse_unk=True,
                                      byte_fallback=True), where)
        prefix = bool(get("tokenizer.ggml.add_space_prefix", True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="first" if prefix else "never",
                                                     split=False)
        steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
        add_bos = get("tokenizer.ggml.add_bos_token", True)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                            for i in _ids_by_type(types, CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in _ids_by_type(types, USER_DEFINED)])
    add_eos = get("tokenizer.ggml.add_eos_token", False)
    first = [special["bos_token"]] if add_bos and "bos_token" in special else []
    last = [special["eos_token"]] if add_eos and "eos_token" in special else []
    if first or last:  # the tokenizer adds BOS / EOS itself when asked to (transformers' add_special_tokens)
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(first + ["$A"] + last), pair=" ".join(first + ["$A"] + last + first + ["$B"] + last),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(first + last)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "add_bos_token": bool(add_bos),
              "add_eos_token": bool(add_eos), "clean_up_tokenization_spaces": False}
    if get("tokenizer.chat_template", None) is not None:
        config["chat_template"] = get("tokenizer.chat_template")
    return tok, config


def tokenizer_files(get: Callable[..., Any], *, where: str, model_max_length: int | None = None) -> dict[str, str]:
    """``{file name: text}`` of ``tokenizer.json`` and ``tokenizer_config.json`` (see :func:`build_tokenizer`)."""
    tok, config = build_tokenizer(get, where=where)
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    return {"tokenizer.json": tok.to_str(pretty=True) + "\n",
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"}


__all__ = ["PRE_TOKENIZERS", "TOKENIZER_MODELS", "build_tokenizer", "score_merges", "tokenizer_files"]

"""The paper's memorization task: learn random UUID key → value pairs, scored by character accuracy.

Sequences are character-level: ``<bos> key <sep> value <eos>`` (36 + 36 characters), padded to a
fixed length. The loss covers the value and ``<eos>`` only (what must be memorised); evaluation
greedily generates 36 characters after ``<bos> key <sep>`` and reports the fraction of characters
equal to the true value.
"""

from __future__ import annotations

import uuid

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax.experiments.task_data import ShuffledBatches
from mora_jax.generate import generate
from mora_jax.models.llama import LlamaForCausalLM

PAD, BOS, EOS, SEP = 0, 1, 2, 3
CHARS = "0123456789abcdef-"
CHAR_TO_ID = {c: i + 4 for i, c in enumerate(CHARS)}
ID_TO_CHAR = {i: c for c, i in CHAR_TO_ID.items()}
VOCAB_SIZE = 4 + len(CHARS)
UUID_LEN = 36
SEQ_LEN = 1 + UUID_LEN + 1 + UUID_LEN + 1  # bos key sep value eos
PROMPT_LEN = 1 + UUID_LEN + 1


def make_pairs(n: int, seed) -> list[tuple[str, str]]:
    """``n`` distinct random (version-4) UUID pairs, reproducible from ``seed`` (an int or a list of ints)."""
    rng = np.random.default_rng(seed)
    uuids: list[str] = []
    seen = set()
    while len(uuids) < 2 * n:
        u = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        if u not in seen:
            seen.add(u)
            uuids.append(u)
    return list(zip(uuids[0::2], uuids[1::2]))


def encode(text: str) -> list[int]:
    try:
        return [CHAR_TO_ID[c] for c in text]
    except KeyError as e:
        raise ValueError(f"character {e.args[0]!r} is not in the UUID vocabulary {CHARS!r}") from None


def decode(ids) -> str:
    return "".join(ID_TO_CHAR.get(int(i), "?") for i in ids)


def encode_pairs(pairs: list[tuple[str, str]]) -> dict[str, np.ndarray]:
    """A batch ``{input_ids (N, SEQ_LEN) int32, loss_mask (N, SEQ_LEN) int32}``; ``loss_mask[t] = 1`` where
    position ``t`` predicts a value character or ``<eos>``."""
    input_ids = np.array([[BOS, *encode(k), SEP, *encode(v), EOS] for k, v in pairs], np.int32)
    loss_mask = np.zeros_like(input_ids)
    loss_mask[:, PROMPT_LEN - 1 : SEQ_LEN - 1] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask}


class PairBatches(ShuffledBatches):
    """Endless shuffled mini-batches over a fixed set of pairs, with a checkpointable position."""

    def __init__(self, pairs, batch_size: int, seed: int):
        if batch_size > len(pairs):
            raise ValueError(f"batch_size {batch_size} exceeds the number of pairs {len(pairs)}; lower it")
        super().__init__(encode_pairs(pairs), batch_size, seed)


class RandomPairBatches:
    """Endless batches of fresh random pairs (teaches the format, not any pair): base-model pretraining.
    The loss covers every position."""

    def __init__(self, batch_size: int, seed: int):
        self._batch_size = batch_size
        self._seed = seed
        self._batches_served = 0

    def __iter__(self):
        return self

    def __next__(self):
        pairs = make_pairs(self._batch_size, seed=[self._seed, self._batches_served])
        self._batches_served += 1
        batch = encode_pairs(pairs)
        batch["loss_mask"] = np.ones_like(batch["loss_mask"])
        batch["loss_mask"][:, -1] = 0
        return batch

    def get_state(self) -> dict:
        return {"batches_served": self._batches_served}

    def set_state(self, state) -> None:
        self._batches_served = int(state["batches_served"])


def greedy_values(model, keys_NxP, params=None, adapters=None) -> jax.Array:
    """Greedily generate ``UUID_LEN`` tokens after the prompts ``keys_NxP`` (``<bos> key <sep>``).

    ``model`` is a ``LlamaForCausalLM`` (with its ``params`` and, unmerged, ``adapters``): decoding
    is :func:`mora_jax.generate` (a KV cache, the prompt encoded once), never stopping early. Any
    other callable is taken as ``logits_fn(input_ids (N, SEQ_LEN)) -> logits`` of a model without a
    cache (e.g. an oracle): each step then re-encodes the sequence, the positions after the prompt
    starting as padding (causal attention makes them invisible to earlier positions).
    """
    if isinstance(model, LlamaForCausalLM):
        return generate(model, params, keys_NxP, max_new_tokens=UUID_LEN, adapters=adapters, eos_token_id=[])
    logits_fn = model
    n = keys_NxP.shape[0]
    ids = jnp.zeros((n, SEQ_LEN), jnp.int32).at[:, :PROMPT_LEN].set(keys_NxP)

    def body(t, ids):
        logits = logits_fn(ids)
        next_token = jnp.argmax(logits[:, PROMPT_LEN - 1 + t], axis=-1).astype(jnp.int32)
        return ids.at[:, PROMPT_LEN + t].set(next_token)

    ids = jax.lax.fori_loop(0, UUID_LEN, body, ids)
    return ids[:, PROMPT_LEN : PROMPT_LEN + UUID_LEN]


def char_accuracy(generated_NxL, pairs) -> float:
    """Percentage of generated characters equal to the true values."""
    target = np.array([encode(v) for _, v in pairs], np.int32)
    return float(100.0 * np.mean(np.asarray(generated_NxL) == target))


def text_char_accuracy(texts, values) -> float:
    """Percentage of the values' characters that the generated texts hold at the same position (a
    text shorter than its value misses the rest): character accuracy with any tokenizer."""
    hits = sum(sum(a == b for a, b in zip(text, value)) for text, value in zip(texts, values))
    return float(100.0 * hits / max(sum(len(v) for v in values), 1))

"""Batches and scoring that the fine-tuning comparison's tasks share.

* :class:`ShuffledBatches`: endless batches over fixed rows, in an order drawn from the run's seed
  per epoch, with a checkpointable position (``get_state`` / ``set_state``).
* :func:`encode_examples`: prompt/answer pairs as padded rows with the loss on the answer (and the
  end-of-sequence token) only.
* :func:`packed_rows`: a text file as rows of ``seq_len`` tokens (documents packed, EOS between).
* :func:`generate_texts`: greedy continuations of prompts through :func:`mora_jax.generate`
  (adapters unmerged), decoded up to the first end-of-sequence token.
* :func:`mean_loss`: the mean next-token loss of rows under a train state (the run's eval step).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np

from mora_jax import data as data_lib
from mora_jax.generate import generate, left_pad


class ShuffledBatches:
    """Endless batches over fixed rows (a dict of equally long numpy arrays), reshuffled each epoch
    from ``[seed, epoch]``; the last rows of an epoch that do not fill a batch wait for the next one."""

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int):
        self._data = {k: np.asarray(v) for k, v in arrays.items()}
        rows = len(next(iter(self._data.values())))
        if batch_size > rows:
            raise ValueError(f"batch_size {batch_size} exceeds the {rows} training rows; lower train.batch_size")
        self._rows, self._batch_size, self._seed = rows, batch_size, seed
        self._batches_served = 0

    def __iter__(self):
        return self

    def __next__(self):
        per_epoch = self._rows // self._batch_size
        epoch, index = divmod(self._batches_served, per_epoch)
        order = np.random.default_rng([self._seed, epoch]).permutation(self._rows)
        rows = order[index * self._batch_size:(index + 1) * self._batch_size]
        self._batches_served += 1
        return {k: v[rows] for k, v in self._data.items()}

    def get_state(self) -> dict:
        return {"batches_served": self._batches_served, "seed": self._seed}

    def set_state(self, state) -> None:
        self._batches_served = int(state["batches_served"])


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """BOS (when the tokenizer adds one) and the prompt's tokens."""
    return ([tokenizer.bos_id] if tokenizer.adds_bos else []) + tokenizer.encode(prompt)


def encode_examples(tokenizer, examples: Sequence[tuple[str, str]], seq_len: int) -> dict[str, np.ndarray]:
    """``{input_ids, loss_mask}`` (N, seq_len) int32 for (prompt, answer) pairs: prompt tokens, then
    the answer's and EOS, padded; the loss covers the answer and EOS. The prompt and the answer are
    tokenized separately, so the prompt's tokens are the ones generation starts from."""
    if tokenizer.eos_id < 0:
        raise ValueError("the tokenizer has no end-of-sequence token; the answers need one to end")
    pad = max(tokenizer.pad_id, 0)
    ids = np.full((len(examples), seq_len), pad, np.int32)
    mask = np.zeros((len(examples), seq_len), np.int32)
    for row, (prompt, answer) in enumerate(examples):
        p, a = prompt_ids(tokenizer, prompt), tokenizer.encode(answer) + [tokenizer.eos_id]
        if len(p) + len(a) > seq_len:
            raise ValueError(f"an example takes {len(p) + len(a)} tokens, more than train.seq_len={seq_len}: "
                             f"raise train.seq_len ({prompt!r} -> {answer!r})")
        ids[row, :len(p) + len(a)] = p + a
        mask[row, len(p) - 1:len(p) + len(a) - 1] = 1  # position t predicts token t + 1
    return {"input_ids": ids, "loss_mask": mask}


def packed_rows(path, tokenizer, seq_len: int, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """The documents (lines) of a text file, tokenized and packed into rows of ``seq_len`` tokens
    (``mora_jax.data.pretrain_batches``: EOS after each document, one pass, the last partial row
    dropped): ``{input_ids}`` (rows, seq_len) int32, at most ``max_rows`` rows."""
    config = data_lib.PretrainDataConfig(seq_len=seq_len, batch_size=1, add_bos=tokenizer.adds_bos, num_epochs=1)
    rows = []
    for batch in data_lib.pretrain_batches(str(path), tokenizer=tokenizer, config=config):
        rows.append(batch["input_ids"][0])
        if max_rows and len(rows) >= max_rows:
            break
    if not rows:
        raise ValueError(f"{path} holds fewer than {seq_len} tokens: no full row of train.seq_len tokens")
    return {"input_ids": np.stack(rows).astype(np.int32)}


def batches_of(arrays: Mapping[str, np.ndarray], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Consecutive full batches of the rows (the remainder dropped: one program shape)."""
    n = len(next(iter(arrays.values()))) // batch_size
    return [{k: v[i * batch_size:(i + 1) * batch_size] for k, v in arrays.items()} for i in range(n)]


def mean_loss(steps, state, batches) -> float:
    """Mean next-token loss (nats per target token) of ``batches`` under ``state`` (the run's eval step)."""
    loss_sum = tokens = 0.0
    for batch in batches:
        out = jax.device_get(steps.eval(state, steps.shard_batch(batch)))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    return loss_sum / max(tokens, 1.0)


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def generate_texts(model, tokenizer, params, adapters, prompts: Sequence[list[int]], *, max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Greedy continuations (``mora_jax.generate``, adapters unmerged) of token-id prompts, decoded up
    to the first EOS. Prompts go in batches of ``batch_size`` rows left-padded to one width (the last
    batch repeats rows), so the program compiles once."""
    ids, mask = left_pad(list(prompts), pad_id=max(tokenizer.pad_id, 0))
    eos = sorted(set(model.config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id >= 0 else set()))
    n, b = len(prompts), min(batch_size, len(prompts))
    texts = []
    for start in range(0, n, b):
        rows = np.arange(start, start + b) % n
        out = generate(model, params, ids[rows], attention_mask=mask[rows], max_new_tokens=max_new_tokens,
                       adapters=adapters, eos_token_id=eos)
        for tokens in np.asarray(jax.device_get(out))[: n - start].tolist():
            stop = next((j for j, t in enumerate(tokens) if t in eos), len(tokens))
            texts.append(tokenizer.decode(tokens[:stop]))
    return texts


__all__ = ["ShuffledBatches", "batches_of", "encode_examples", "generate_texts", "mean_loss", "packed_rows",
           "perplexity", "prompt_ids"]

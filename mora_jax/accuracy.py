"""Task accuracy during fine-tuning: exact-match answers generated on held-out records.

The model continues each held-out prompt (built exactly as the training prompts are: the data
format's template, BOS or the chat template) greedily with :func:`mora_jax.generate`, adapters
unmerged; the final answer is extracted from the generated text and from the record's reference
response, GSM8K-style: what follows the last ``#### `` or ``The answer is:`` (MetaMathQA's format).
Two answers match when their normalised forms are equal (numbers compared as numbers: ``1,000`` =
``1000`` = ``1000.0``); a generation without an answer counts as wrong.

:class:`AccuracyEvaluator` scores a parameter/adapter pair; its :meth:`~AccuracyEvaluator.callback`
plugs into :func:`mora_jax.loop.run` (every ``eval_every`` steps and at the last step), logging
``accuracy`` (percent) and ``accuracy_examples`` beside the loss in the run's metrics. The math
recipe enables it with ``data.accuracy_source``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal

import numpy as np

from mora_jax import sharding
from mora_jax.data.finetune import BadRecordError, format_prompt_response
from mora_jax.data.sources import ProcessShard
from mora_jax.generate import generate

_MARKER = re.compile(r"####|[Tt]he (?:final )?answer is:?")
_NUMBER = re.compile(r"[-+]?\d*\.?\d+")
_FRACTION = re.compile(r"([-+]?\d*\.?\d+)/([-+]?\d*\.?\d+)")


def extract_answer(text: str) -> str | None:
    """The final answer of a GSM8K / MetaMathQA-style text, normalised, or None if it states none:
    the rest of the line after the last ``####`` or ``The answer is:``."""
    markers = list(_MARKER.finditer(text or ""))
    if not markers:
        return None
    answer = normalize_answer(text[markers[-1].end():].split("\n", 1)[0])
    return answer or None


def normalize_answer(answer: str) -> str:
    """Canonical form for exact match: a number as a plain decimal (``$1,000.50`` -> ``1000.5``,
    ``18.0`` -> ``18``, ``50%`` -> ``50`` as GSM8K writes percentages, ``10/4`` -> ``2.5`` as Hugging
    Face PEFT's MetaMathQA benchmark compares fractions), anything else stripped of surrounding space,
    ``$`` and final ``.``, ``!``, ``?``."""
    answer = answer.strip().rstrip(".!?%").strip()
    digits = re.sub(r"[\s,$]", "", answer)
    if _NUMBER.fullmatch(digits):
        return _plain(Decimal(digits))
    fraction = _FRACTION.fullmatch(digits)
    if fraction and Decimal(fraction[2]) != 0:
        return _plain(Decimal(fraction[1]) / Decimal(fraction[2]))
    return answer.strip("$ ")


def _plain(number: Decimal) -> str:
    text = format(number.normalize(), "f")
    return "0" if text in ("-0", "+0") else text.lstrip("+")


def answers_match(predicted: str | None, reference: str | None) -> bool:
    return predicted is not None and reference is not None and predicted == reference


class AccuracyEvaluator:
    """Exact-match accuracy of generated answers on held-out prompt/response records.

    Args:
      model: the ``LlamaForCausalLM`` being fine-tuned.
      tokenizer: its tokenizer (``mora_jax.data.Tokenizer``).
      records: held-out records in the training data's format (e.g. MetaMathQA ``query`` / ``response``).
      data_config: the ``FinetuneDataConfig`` the training batches use (prompt template, BOS, chat template).
      max_new_tokens: generation budget per answer (cut to the model's maximum length).
      batch_size: prompts per generate call (rounded up to the mesh's batch shards).
      mesh, rules: generate sharded like training.

    Records without a reference answer, or whose prompt leaves no room to answer, are not scored
    (``skipped``). All prompts are left-padded to one width and batches to one size, so the
    generation program compiles once per run.
    """

    def __init__(self, model, tokenizer, records: Iterable[Mapping], data_config, *, max_new_tokens: int = 256,
                 batch_size: int = 8, mesh=None, rules=None):
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.model, self.tokenizer, self.mesh, self.rules = model, tokenizer, mesh, rules
        self.eos_ids = sorted(set(model.config.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id >= 0 else set()))
        limit = model.config.max_position_embeddings
        prompts, self.references, self.skipped = [], [], 0
        for record in records:
            try:
                prompt, response = format_prompt_response(record, data_config)
            except BadRecordError:
                self.skipped += 1
                continue
            reference = extract_answer(response)
            ids = self._prompt_ids(prompt, data_config)
            if reference is None or len(ids) >= limit:
                self.skipped += 1
                continue
            prompts.append(ids)
            self.references.append(reference)
        if not prompts:
            raise ValueError(
                f"none of the {self.skipped} held-out records can be scored: each needs a response stating its answer "
                "('#### N' or 'The answer is: N') and a prompt shorter than the model's maximum length"
            )
        width = max(len(p) for p in prompts)
        self.max_new_tokens = min(int(max_new_tokens), limit - width)
        shards = 1
        if mesh is not None:
            shards = math.prod(mesh.shape[a] for a in sharding.batch_axes(mesh, rules or sharding.DEFAULT_RULES))
        self.batch_size = -(-min(batch_size, len(prompts)) // shards) * shards
        pad = max(tokenizer.pad_id, 0)
        self.input_ids = np.full((len(prompts), width), pad, np.int32)
        self.attention_mask = np.zeros((len(prompts), width), np.int32)
        for row, ids in enumerate(prompts):
            self.input_ids[row, width - len(ids):] = ids
            self.attention_mask[row, width - len(ids):] = 1
        self.predictions: list[str | None] = []
        self.texts: list[str] = []

    def _prompt_ids(self, prompt: str, data_config) -> list[int]:
        if getattr(data_config, "chat_template", False):
            system = [{"role": "system", "content": data_config.system_prompt}] if data_config.system_prompt else []
            return self.tokenizer.encode(self.tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": prompt}], add_generation_prompt=True))
        return ([self.tokenizer.bos_id] if data_config.add_bos else []) + self.tokenizer.encode(prompt)

    def __len__(self) -> int:
        return len(self.references)

    def evaluate(self, params, adapters=None) -> dict:
        """``{"accuracy": percent correct, "accuracy_examples": n}``; the generated texts and extracted
        answers are kept in ``texts`` / ``predictions``."""
        import jax

        n, b = len(self.references), self.batch_size
        texts = []
        for start in range(0, n, b):
            rows = np.arange(start, start + b) % n  # the last batch repeats rows to keep its size
            out = generate(self.model, params, self.input_ids[rows], attention_mask=self.attention_mask[rows],
                           max_new_tokens=self.max_new_tokens, adapters=adapters, eos_token_id=self.eos_ids,
                           mesh=self.mesh, rules=self.rules)
            for tokens in np.asarray(jax.device_get(out))[: n - start].tolist():
                stop = next((j for j, t in enumerate(tokens) if t in self.eos_ids), len(tokens))
                texts.append(self.tokenizer.decode(tokens[:stop]))
        self.texts = texts
        self.predictions = [extract_answer(t) for t in texts]
        correct = sum(answers_match(p, r) for p, r in zip(self.predictions, self.references))
        result = {"accuracy": 100.0 * correct / n, "accuracy_examples": n}
        return {**result, "accuracy_skipped": self.skipped} if self.skipped else result

    def callback(self, every: int, last_step: int):
        """A :func:`mora_jax.loop.run` callback evaluating every ``every`` steps (0: only) and at ``last_step``."""

        def on_step(step, state, log):
            if (every and step % every == 0) or step == last_step:
                log(self.evaluate(state.params(), state.adapters))

        return on_step


def read_records(source, *, split: str = "train", limit: int = 0) -> list[Mapping]:
    """The first ``limit`` (0 = all) records of a local file / glob / Hub data set, in order."""
    shard = ProcessShard(source, split=split, text_field=None, process_index=0, process_count=1)
    records = []
    for record, _ in shard.records(epoch=0):
        records.append(record)
        if limit and len(records) >= limit:
            break
    return records


def score(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percent of texts whose extracted answers match (both lists are full texts)."""
    if len(predictions) != len(references) or not references:
        raise ValueError(f"need as many predictions as references (got {len(predictions)} and {len(references)})")
    hits = sum(answers_match(extract_answer(p), extract_answer(r)) for p, r in zip(predictions, references))
    return 100.0 * hits / len(references)


__all__ = ["AccuracyEvaluator", "answers_match", "extract_answer", "normalize_answer", "read_records", "score"]

"""Fine-tuning batches: prompt/response records, loss on response tokens only, padded or packed."""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from mora_jax.data.batching import (
    BadRecordError,
    DataError,
    bad_record_error,
    check_common_config,
    check_process,
    check_state,
    format_report,
    new_stats,
)
from mora_jax.data.local_files import BadLine
from mora_jax.data.sources import ProcessShard
from mora_jax.data.tokenizer import Tokenizer

FINETUNE_STATE_FORMAT = "mora_jax.data.finetune/v1"

# Stanford Alpaca's prompts; MetaMathQA trains with the no-input one, its question in ``query``.
ALPACA_PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
METAMATHQA_PROMPT_TEMPLATE = ALPACA_PROMPT_TEMPLATE_NO_INPUT.replace("{instruction}", "{query}")
# With a chat template the record's text is the user turn as it is (the template adds the roles).
CHAT_PROMPT_TEMPLATES = {"alpaca": ("{instruction}\n\n{input}", "{instruction}"), "metamathqa": ("{query}", None)}


@dataclass(frozen=True)
class FinetuneDataConfig:
    """How prompt/response records become fine-tuning batches.

    A record's prompt is ``prompt_template.format(**record)``, or ``prompt_template_no_input`` when
    ``input_field`` is missing or empty; its response is ``record[response_field]``. Tokens are
    ``[bos] + prompt + response + [eos]`` and only response tokens (EOS included) are trained.
    Examples longer than ``seq_len`` are truncated on the right or dropped (``overlong``); one whose
    prompt fills ``seq_len`` is always dropped. Each epoch visits the examples in a fresh permutation
    of ``seed`` (``shuffle``), process ``i`` of ``n`` taking every ``n``-th. With ``packing``,
    examples are placed first-fit into the rows of a batch, else one per row. The last batch of the
    data is padded unless ``drop_remainder``. A record without the fields the templates need, or a
    line of a local file that is not valid UTF-8 or JSON, is an error naming the file and line
    (``on_bad_record='error'``) or is counted and skipped (``'skip'``). Defaults match Alpaca; see
    :meth:`metamathqa`.

    ``chat_template``: the prompt becomes the user turn of the tokenizer's chat template (from the
    checkpoint's ``tokenizer_config.json``) followed by the assistant header, the response the
    assistant's reply ending in EOS (Llama 3 instruct: ``<|eot_id|>``); the template writes its own
    BOS, so ``add_bos`` is not used. ``alpaca()`` / ``metamathqa()`` then default to the bare
    instruction / query as the user turn (``CHAT_PROMPT_TEMPLATES``); ``system_prompt`` adds a
    system turn.
    """

    seq_len: int
    batch_size: int
    prompt_template: str = ALPACA_PROMPT_TEMPLATE
    prompt_template_no_input: str | None = ALPACA_PROMPT_TEMPLATE_NO_INPUT
    input_field: str | None = "input"
    response_field: str = "output"
    split: str = "train"
    add_bos: bool = True
    chat_template: bool = False
    system_prompt: str | None = None
    packing: bool = False
    shuffle: bool = True
    seed: int = 0
    num_epochs: int | None = 1
    overlong: Literal["truncate", "drop"] = "truncate"
    on_bad_record: Literal["error", "skip"] = "error"
    drop_remainder: bool = False

    def __post_init__(self):
        check_common_config(self)
        for template in (self.prompt_template, self.prompt_template_no_input):
            if template is not None:
                template_fields(template)  # raises on a malformed template

    @classmethod
    def alpaca(cls, seq_len: int, batch_size: int, **overrides) -> FinetuneDataConfig:
        """Alpaca records: ``instruction``, optional ``input``, ``output``."""
        if overrides.get("chat_template"):
            with_input, without = CHAT_PROMPT_TEMPLATES["alpaca"]
            overrides = {"prompt_template": with_input, "prompt_template_no_input": without, **overrides}
        return cls(seq_len=seq_len, batch_size=batch_size, **overrides)

    @classmethod
    def metamathqa(cls, seq_len: int, batch_size: int, **overrides) -> FinetuneDataConfig:
        """MetaMathQA records: ``query``, ``response``."""
        fields = dict(
            prompt_template=METAMATHQA_PROMPT_TEMPLATE,
            prompt_template_no_input=None,
            input_field=None,
            response_field="response",
        )
        if overrides.get("chat_template"):
            fields["prompt_template"] = CHAT_PROMPT_TEMPLATES["metamathqa"][0]
        return cls(seq_len=seq_len, batch_size=batch_size, **{**fields, **overrides})


def template_fields(template: str) -> list[str]:
    """Names of the fields a ``str.format`` template reads, e.g. ``["instruction", "input"]``."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(
            f"malformed prompt template {template!r}: {error} (write literal braces as {{{{ }}}})"
        ) from None
    if any(not name.isidentifier() for name in names):
        raise ValueError(f"prompt template {template!r} must use named fields such as {{instruction}}, got {names}")
    return names


def format_prompt_response(record: Mapping[str, Any], config: FinetuneDataConfig) -> tuple[str, str]:
    """``(prompt, response)`` of a record, per ``config``'s templates and field names.

    Raises :class:`BadRecordError` naming the missing (or non-string) fields.
    """
    if not isinstance(record, Mapping):
        raise BadRecordError(f"a fine-tuning record must be a dict, got {type(record).__name__}")
    template = config.prompt_template
    if config.prompt_template_no_input is not None and config.input_field is not None:
        value = record.get(config.input_field)
        if not (isinstance(value, str) and value.strip()):
            template = config.prompt_template_no_input
    needed = [*dict.fromkeys(template_fields(template)), config.response_field]
    missing = [name for name in needed if not isinstance(record.get(name), str)]
    if missing:
        raise BadRecordError(
            f"record has no string field(s) {missing} (found {sorted(record)}): set response_field / "
            "prompt_template / input_field to your data's field names (FinetuneDataConfig.alpaca() reads "
            "instruction/input/output, .metamathqa() reads query/response)"
        )
    return template.format(**{name: record[name] for name in needed[:-1]}), record[config.response_field]


class FinetuneBatchIterator:
    """Fine-tuning batches, loss on response tokens only; ``mora_jax.data``'s docstring describes the keys.

    The records are read and checked once (they are small); tokenisation happens as examples are
    used. The state is (epoch, index in this process's order for that epoch).
    """

    def __init__(
        self,
        source,
        tokenizer: Tokenizer,
        config: FinetuneDataConfig,
        *,
        process_index: int = 0,
        process_count: int = 1,
        state: Mapping | None = None,
    ):
        if tokenizer.eos_id < 0 or (config.add_bos and not config.chat_template and tokenizer.bos_id < 0):
            raise ValueError(f"{tokenizer!r} lacks the EOS (or, with add_bos, BOS) token fine-tuning needs")
        if config.chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"chat_template=True but {tokenizer!r} has no chat template (tokenizer_config.json); "
                             "use the instruct checkpoint's tokenizer files or set chat_template=False")
        check_process(process_index, process_count)
        self.config, self.tokenizer = config, tokenizer
        self.stats = new_stats()
        shard = ProcessShard(source, split=config.split, text_field=None, process_index=0, process_count=1)
        self.examples = self._load_examples(shard)
        self.process_index, self.process_count = process_index, process_count
        if len(self.examples) < process_count:
            raise ValueError(f"{len(self.examples)} usable examples cannot feed {process_count} processes")
        self._epoch, self._index, self._finished = 0, 0, False
        self._order_cache: tuple[int, np.ndarray] | None = None
        self._lookahead: tuple[tuple[int, int], tuple[np.ndarray, int, bool]] | None = None
        if state is not None:
            self.set_state(state)

    def __iter__(self) -> FinetuneBatchIterator:
        return self

    def report(self) -> str:
        return format_report("fine-tuning", self.stats) + f"; {len(self.examples)} usable examples"

    def _load_examples(self, shard: ProcessShard) -> list[tuple[str, str]]:
        examples, records_read, first_problem = [], 0, None
        for record, position in shard.records(epoch=0):
            records_read += 1
            where = shard.where(position, f"record {position[0]}")
            if isinstance(record, BadLine):
                if self.config.on_bad_record == "error":
                    raise BadRecordError(bad_record_error(where, record.problem))
                self.stats["skipped_unreadable"] += 1
                first_problem = first_problem or record.describe()
                continue
            try:
                prompt, response = format_prompt_response(record, self.config)
            except BadRecordError as error:
                if self.config.on_bad_record == "error":
                    raise BadRecordError(bad_record_error(where, str(error))) from None
                self.stats["skipped_missing_fields"] += 1
                first_problem = first_problem or f"{where}: {error}"
                continue
            if not response.strip():
                self.stats["skipped_empty"] += 1
                first_problem = first_problem or f"{where}: empty {self.config.response_field!r}"
                continue
            examples.append((prompt, response))
        if not examples:
            raise DataError(
                f"none of the {records_read} records is usable ({shard.describe()})"
                + (f"; the first problem: {first_problem}" if first_problem else "; check the source and data.format")
            )
        return examples

    def _order(self, epoch: int) -> np.ndarray:
        """Indices of this process's examples for ``epoch``: every n-th of the epoch's global order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            count = len(self.examples)
            order = (
                np.random.default_rng([self.config.seed, epoch]).permutation(count)
                if self.config.shuffle
                else np.arange(count)
            )
            self._order_cache = (epoch, order[self.process_index :: self.process_count])
        return self._order_cache[1]

    def _tokenize(self, prompt: str, response: str) -> tuple[np.ndarray, int, bool] | None:
        """``(ids, response_start, truncated)``, or None when the example must be dropped."""
        if self.config.chat_template:
            system = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
            chat = self.tokenizer.apply_chat_template([*system, {"role": "user", "content": prompt}],
                                                      add_generation_prompt=True)
            prompt_ids = self.tokenizer.encode(chat)
        else:
            bos = [self.tokenizer.bos_id] if self.config.add_bos else []
            prompt_ids = bos + self.tokenizer.encode(prompt)
        ids = prompt_ids + self.tokenizer.encode(response) + [self.tokenizer.eos_id]
        seq_len = self.config.seq_len
        truncated = len(ids) > seq_len
        if truncated and (self.config.overlong == "drop" or len(prompt_ids) >= seq_len):
            return None
        return np.asarray(ids[:seq_len], dtype=np.int32), len(prompt_ids), truncated

    def _peek(self) -> tuple[np.ndarray, int, bool] | None:
        """The next example to place (dropping overlong ones as configured), or None when finished."""
        while not self._finished:
            order = self._order(self._epoch)
            if self._index >= len(order):
                self._epoch, self._index = self._epoch + 1, 0
                self._finished = self.config.num_epochs is not None and self._epoch >= self.config.num_epochs
                continue
            key = (self._epoch, self._index)
            if self._lookahead is None or self._lookahead[0] != key:
                self._lookahead = (key, self._tokenize(*self.examples[order[self._index]]))
            if self._lookahead[1] is not None:
                self._consecutive_drops = 0
                return self._lookahead[1]
            self.stats["dropped"] += 1
            self._consecutive_drops = getattr(self, "_consecutive_drops", 0) + 1
            if self._consecutive_drops >= len(order):  # a whole epoch without one usable example
                raise ValueError(
                    f"every one of this process's {len(order)} fine-tuning examples is dropped as too long for "
                    f"seq_len={self.config.seq_len} (overlong={self.config.overlong!r}; an example whose prompt "
                    "alone fills seq_len is always dropped): raise seq_len or shorten the prompt template"
                )
            self._index += 1
        return None

    def __next__(self) -> dict[str, np.ndarray]:
        batch_size, seq_len = self.config.batch_size, self.config.seq_len
        batch = {
            "input_ids": np.full((batch_size, seq_len), self.tokenizer.pad_id, dtype=np.int32),
            **{
                key: np.zeros((batch_size, seq_len), dtype=np.int32)
                for key in ("loss_mask", "segment_ids", "positions")
            },
        }
        row_fill_B, row_segments_B = [0] * batch_size, [0] * batch_size
        placed, example = 0, None
        while self.config.packing or placed < batch_size:
            if (example := self._peek()) is None:
                break
            ids, response_start, truncated = example
            length = len(ids)
            rows = range(batch_size) if self.config.packing else [placed]
            row = next((r for r in rows if row_fill_B[r] + length <= seq_len), None)
            if row is None:
                break
            start, segment = row_fill_B[row], row_segments_B[row] + 1
            batch["input_ids"][row, start : start + length] = ids
            batch["segment_ids"][row, start : start + length] = segment
            batch["positions"][row, start : start + length] = np.arange(length)
            batch["loss_mask"][row, start + max(response_start - 1, 0) : start + length - 1] = 1
            row_fill_B[row], row_segments_B[row] = start + length, segment
            self.stats["documents"] += 1
            self.stats["tokens"] += length
            self.stats["truncated"] += truncated
            self._index += 1
            placed += 1
        data_ran_out = example is None
        if placed == 0 or (
            data_ran_out and self.config.drop_remainder and (self.config.packing or placed < batch_size)
        ):
            raise StopIteration
        self.stats["batches"] += 1
        return batch

    def _identity(self) -> dict[str, Any]:
        config = self.config
        return {
            "seq_len": config.seq_len,
            "batch_size": config.batch_size,
            "packing": config.packing,
            "shuffle": config.shuffle,
            "seed": config.seed,
            "process_index": self.process_index,
            "process_count": self.process_count,
            "num_examples": len(self.examples),
        }

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: give it to ``set_state`` or ``state=`` to continue from here."""
        return {
            "format": FINETUNE_STATE_FORMAT,
            **self._identity(),
            "epoch": self._epoch,
            "index": self._index,
            "finished": self._finished,
            "stats": dict(self.stats),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``get_state()`` dict (same records, tokenizer and batch settings)."""
        check_state(state, FINETUNE_STATE_FORMAT, self._identity())
        self._epoch, self._index, self._finished = int(state["epoch"]), int(state["index"]), bool(state["finished"])
        self.stats = {**new_stats(), **state["stats"]}
        self._lookahead = None


def finetune_batches(
    source,
    tokenizer: Tokenizer,
    config: FinetuneDataConfig,
    *,
    process_index: int = 0,
    process_count: int = 1,
    state: Mapping | None = None,
) -> FinetuneBatchIterator:
    """Fine-tuning batches of this process's share of ``source`` (resumed from ``state`` if given)."""
    return FinetuneBatchIterator(
        source, tokenizer, config, process_index=process_index, process_count=process_count, state=state
    )

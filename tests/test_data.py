"""Data layer: sources, tokenizer, packed pretraining batches, masked fine-tuning batches, resume.

Everything runs offline on a tiny SentencePiece model trained here on the synthetic corpus.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mora_jax.data import (
    ALPACA_PROMPT_TEMPLATE_NO_INPUT,
    BadRecordError,
    FinetuneDataConfig,
    PretrainDataConfig,
    Tokenizer,
    finetune_batches,
    format_prompt_response,
    load_text_dataset,
    next_token_targets,
    pretrain_batches,
    synthetic_corpus_lines,
    train_tokenizer,
    write_synthetic_corpus,
)

VOCAB_SIZE = 384
BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")
SHORT_TEMPLATE = "Q: {instruction}\nIn: {input}\nA:"
SHORT_TEMPLATE_NO_INPUT = "Q: {instruction}\nA:"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    write_synthetic_corpus(path, num_lines=1500, seed=0)
    return path


@pytest.fixture(scope="module")
def tokenizer(corpus_file, tmp_path_factory):
    return train_tokenizer(corpus_file, tmp_path_factory.mktemp("tok") / "tok", vocab_size=VOCAB_SIZE)


def documents(count: int, seed: int = 1) -> list[str]:
    """Distinct documents (numbered), so that they can be recognised after packing."""
    return [f"Doc {i}. {line}" for i, line in enumerate(synthetic_corpus_lines(count, seed))]


def alpaca_records(count: int, seed: int = 2) -> list[dict]:
    lines = list(synthetic_corpus_lines(2 * count, seed))
    return [
        {
            "instruction": f"Task {i}: {lines[2 * i][:40]}",
            "input": "" if i % 3 else f"note {i}",
            "output": lines[2 * i + 1][:60],
        }
        for i in range(count)
    ]


def short_config(**overrides) -> FinetuneDataConfig:
    fields = dict(
        seq_len=128, batch_size=3, prompt_template=SHORT_TEMPLATE, prompt_template_no_input=SHORT_TEMPLATE_NO_INPUT
    )
    return FinetuneDataConfig(**{**fields, **overrides})


def assert_same_batches(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for batch_a, batch_b in zip(batches_a, batches_b, strict=True):
        assert sorted(batch_a) == sorted(batch_b) == sorted(BATCH_KEYS)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)


def stream_documents(batches, tokenizer) -> list[str]:
    """Texts of the documents in a pretraining token stream (split at EOS, padding removed)."""
    ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches]) if batches else np.zeros(0, np.int32)
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    return [tokenizer.decode(piece) for piece in np.split(ids, ends + 1) if len(piece)]


# ------------------------------------------------------------------ corpus and tokenizer


def test_synthetic_corpus_is_deterministic(tmp_path):
    first = list(synthetic_corpus_lines(200, seed=0))
    assert first == list(synthetic_corpus_lines(200, seed=0))
    assert first != list(synthetic_corpus_lines(200, seed=1))
    assert all(line and line[0].isupper() and line.endswith(".") and "\n" not in line for line in first)
    assert len(set(first)) > 190

    from train.make_corpus import main

    main(["--out", str(tmp_path / "sub" / "corpus.txt"), "--lines", "50", "--seed", "3"])
    assert (tmp_path / "sub" / "corpus.txt").read_text().splitlines() == list(synthetic_corpus_lines(50, seed=3))


def test_tokenizer_round_trip_and_special_ids(tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 3)
    text = "Anna saw 12 cats  near the river.\n  Naïve ☃ — unseen characters go through byte fallback."
    ids = tokenizer.encode(text)
    assert all(isinstance(i, int) and 0 <= i < VOCAB_SIZE for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.asarray([tokenizer.bos_id, *ids, tokenizer.eos_id, tokenizer.pad_id])) == text
    assert len(tokenizer.encode("the river")) < len("the river")  # merges were learned


def test_train_tokenizer_cli_is_deterministic(tokenizer, corpus_file, tmp_path):
    from train.train_tokenizer import main

    main(["--input", str(corpus_file), "--vocab-size", str(VOCAB_SIZE), "--out", str(tmp_path / "tok")])
    # The same pieces and scores (the .model files differ only in the output path they record).
    reference_vocab = Path(tokenizer.model_file).with_suffix(".vocab").read_text(encoding="utf-8")
    assert (tmp_path / "tok.vocab").read_text(encoding="utf-8") == reference_vocab
    assert Tokenizer(tmp_path / "tok.model").encode("Anna saw a cat.") == tokenizer.encode("Anna saw a cat.")


def test_tokenizer_errors_say_how_to_fix(corpus_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m train.train_tokenizer"):
        Tokenizer(tmp_path / "missing.model")
    with pytest.raises(RuntimeError, match="byte_fallback"):
        train_tokenizer(corpus_file, tmp_path / "tiny", vocab_size=200)


# ------------------------------------------------------------------ sources


def test_local_text_json_parquet_sources(tmp_path):
    import datasets

    records = [{"text": f"line {i}", "id": i} for i in range(7)]
    (tmp_path / "a.txt").write_text("".join(r["text"] + "\n" for r in records))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[4:]))
    (tmp_path / "array.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "a.parquet"))

    texts = [r["text"] for r in records]
    assert [r["text"] for r in load_text_dataset(tmp_path / "a.txt")] == texts
    assert [r["text"] for r in load_text_dataset(str(tmp_path / "*.jsonl"))] == texts  # a glob, files in order
    assert [r["id"] for r in load_text_dataset(tmp_path / "array.json")] == list(range(7))
    assert list(load_text_dataset(tmp_path / "a.parquet")) == records

    with pytest.raises(FileNotFoundError, match=r"no data files match .*nothing\*\.jsonl.*'c4'"):
        load_text_dataset(str(tmp_path / "nothing*.jsonl"))
    with pytest.raises(ValueError, match="single kind"):
        load_text_dataset(str(tmp_path / "a.*"))
    with pytest.raises(KeyError, match="text_field"):
        load_text_dataset(tmp_path / "a.parquet", text_field="content")


# ------------------------------------------------------------------ pretraining


def test_pretrain_packing_keeps_every_token(tokenizer):
    docs = documents(30)
    config = PretrainDataConfig(seq_len=32, batch_size=2, drop_remainder=False)
    iterator = pretrain_batches(docs, tokenizer, config)
    batches = list(iterator)

    expected_ids = np.concatenate([tokenizer.encode(d) + [tokenizer.eos_id] for d in docs])
    stream_ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches])
    np.testing.assert_array_equal(stream_ids, expected_ids)  # EOS after each document, nothing lost
    assert stream_documents(batches, tokenizer) == docs

    for batch in batches:
        assert sorted(batch) == sorted(BATCH_KEYS)
        for value in batch.values():
            assert value.shape == (2, 32) and value.dtype == np.int32
        assert not batch["loss_mask"][:, -1].any()
    full, last = batches[0], batches[-1]
    assert full["loss_mask"][:, :-1].all() and full["segment_ids"].all()
    np.testing.assert_array_equal(full["positions"], np.tile(np.arange(32), (2, 1)))
    # The final batch is padded: pad ids, segment 0, no loss on padding nor on the last real token.
    real = last["segment_ids"].reshape(-1) > 0
    count = int(real.sum())
    assert 0 < count < 64 and real[:count].all()
    assert (last["input_ids"].reshape(-1)[count:] == tokenizer.pad_id).all()
    assert last["loss_mask"].reshape(-1)[count - 1 :].sum() == 0

    assert iterator.stats["documents"] == 30 and iterator.stats["tokens"] == len(expected_ids)
    assert iterator.stats["batches"] == len(batches) == -(-len(expected_ids) // 64)
    assert "30 documents" in iterator.report()


def test_pretrain_drop_remainder_and_targets(tokenizer):
    docs = documents(12)
    batches = list(pretrain_batches(docs, tokenizer, PretrainDataConfig(seq_len=16, batch_size=3)))
    expected_ids = np.concatenate([tokenizer.encode(d) + [tokenizer.eos_id] for d in docs])
    assert len(batches) == len(expected_ids) // 48
    np.testing.assert_array_equal(
        np.concatenate([b["input_ids"].reshape(-1) for b in batches]), expected_ids[: 48 * len(batches)]
    )

    targets = next_token_targets(batches[0]["input_ids"], tokenizer.pad_id)
    np.testing.assert_array_equal(targets[:, :-1], batches[0]["input_ids"][:, 1:])
    assert (targets[:, -1] == tokenizer.pad_id).all()


@pytest.mark.parametrize("kind", ["list", "text_file", "two_jsonl_files"])
def test_pretrain_shards_are_disjoint_and_cover_the_data(kind, tokenizer, tmp_path):
    docs = documents(41)
    if kind == "list":
        source = docs
    elif kind == "text_file":
        source = tmp_path / "docs.txt"
        source.write_text("".join(d + "\n" for d in docs))
    else:  # two files for two processes: datasets gives each process whole files
        for name, part in (("a", docs[:20]), ("b", docs[20:])):
            (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
        source = str(tmp_path / "*.jsonl")
    config = PretrainDataConfig(seq_len=24, batch_size=2, drop_remainder=False)
    seen = [
        stream_documents(list(pretrain_batches(source, tokenizer, config, process_index=i, process_count=2)), tokenizer)
        for i in range(2)
    ]
    assert seen[0] and seen[1]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(docs)


def write_source(kind: str, docs: list[str], tmp_path):
    if kind == "list":
        return docs
    if kind == "text_file":
        path = tmp_path / "docs.txt"
        path.write_text("".join(d + "\n" for d in docs))
        return path
    import datasets

    datasets.Dataset.from_list([{"text": d} for d in docs]).to_parquet(str(tmp_path / "docs.parquet"))
    return tmp_path / "docs.parquet"


@pytest.mark.parametrize(
    "kind, process_count, num_epochs",
    [("list", 1, 1), ("list", 2, 2), ("text_file", 1, 2), ("text_file", 2, 1), ("parquet", 1, 1)],
)
def test_pretrain_resume_gives_the_same_batches(kind, process_count, num_epochs, tokenizer, tmp_path):
    docs = documents(25)
    docs[3] = ""  # a skipped record inside the stream
    source = write_source(kind, docs, tmp_path)
    config = PretrainDataConfig(seq_len=20, batch_size=2, num_epochs=num_epochs)
    process = process_count - 1
    reference = pretrain_batches(source, tokenizer, config, process_index=process, process_count=process_count)
    uninterrupted = list(reference)
    assert len(uninterrupted) >= 6
    for consumed in (0, 1, 3, len(uninterrupted) // 2 + 1, len(uninterrupted) - 1, len(uninterrupted)):
        iterator = pretrain_batches(source, tokenizer, config, process_index=process, process_count=process_count)
        head = [next(iterator) for _ in range(consumed)]
        state = json.loads(json.dumps(iterator.get_state()))  # JSON-serialisable
        resumed = pretrain_batches(
            source, tokenizer, config, process_index=process, process_count=process_count, state=state
        )
        assert_same_batches(head + list(resumed), uninterrupted)
        assert resumed.stats == reference.stats  # counters continue across the resume
    if kind != "list":
        assert state["source_state"] is not None  # the source's own position (file offset, datasets state): a seek


def test_pretrain_set_state_rejects_other_settings(tokenizer):
    docs = documents(10)
    iterator = pretrain_batches(docs, tokenizer, PretrainDataConfig(seq_len=16, batch_size=2))
    next(iterator)
    state = iterator.get_state()
    with pytest.raises(ValueError, match="seq_len=16"):
        pretrain_batches(docs, tokenizer, PretrainDataConfig(seq_len=32, batch_size=2), state=state)
    with pytest.raises(ValueError, match="process_count"):
        pretrain_batches(docs, tokenizer, PretrainDataConfig(seq_len=16, batch_size=2), process_count=2, state=state)
    # Another batch size reads the same token stream, so the state carries over.
    other = pretrain_batches(docs, tokenizer, PretrainDataConfig(seq_len=16, batch_size=1), state=state)
    np.testing.assert_array_equal(next(other)["input_ids"][0], next(iterator)["input_ids"][0])


def test_pretrain_bad_records_are_counted_or_raise(tokenizer):
    records = [
        "First good document.",
        "",
        "   \n",
        {"text": "Second good one."},
        {"body": "no text field"},
        {"text": None},
        7,
    ]
    skip = PretrainDataConfig(seq_len=8, batch_size=1, drop_remainder=False, on_bad_record="skip")
    iterator = pretrain_batches(records, tokenizer, skip)
    assert stream_documents(list(iterator), tokenizer) == ["First good document.", "Second good one."]
    assert iterator.stats["skipped_empty"] == 2 and iterator.stats["skipped_missing_fields"] == 3
    assert "skipped 2 empty and 3 with missing fields" in iterator.report()

    strict = PretrainDataConfig(seq_len=8, batch_size=1)  # on_bad_record="error" is the default
    with pytest.raises(
        ValueError, match=r"record 4 .*no text field 'text' \(found \['body'\]\).*text_field=.*on_bad_record='skip'"
    ):
        list(pretrain_batches(records, tokenizer, strict))
    with pytest.raises(ValueError, match="no usable documents.*3 with missing fields.*text_field"):
        next(pretrain_batches([{"body": "x"}] * 3, tokenizer, dataclasses.replace(skip, drop_remainder=True)))


def test_pretrain_overlong_documents_truncate_or_drop(tokenizer):
    docs = ["Short one.", "A much longer document that certainly has more than twelve tokens in it.", "Tail."]
    lengths = [len(tokenizer.encode(d)) + 1 for d in docs]
    assert lengths[0] <= 12 < lengths[1] and lengths[2] <= 12
    for overlong, expected_tokens in (("truncate", lengths[0] + 12 + lengths[2]), ("drop", lengths[0] + lengths[2])):
        config = PretrainDataConfig(
            seq_len=8, batch_size=1, max_document_tokens=12, overlong=overlong, drop_remainder=False
        )
        iterator = pretrain_batches(docs, tokenizer, config)
        batches = list(iterator)
        ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches])
        assert len(ids) == expected_tokens == iterator.stats["tokens"]
        assert (ids == tokenizer.eos_id).sum() == (
            3 if overlong == "truncate" else 2
        )  # a truncated document keeps its EOS
        assert iterator.stats["truncated" if overlong == "truncate" else "dropped"] == 1


def test_generator_and_callable_sources(tokenizer):
    docs = documents(6)
    config = PretrainDataConfig(seq_len=8, batch_size=1, drop_remainder=False)
    assert stream_documents(list(pretrain_batches((d for d in docs), tokenizer, config)), tokenizer) == docs
    two_epochs = PretrainDataConfig(seq_len=8, batch_size=1, drop_remainder=False, num_epochs=2)
    with pytest.raises(ValueError, match="one-shot iterator"):
        list(pretrain_batches((d for d in docs), tokenizer, two_epochs))
    assert stream_documents(list(pretrain_batches(lambda: iter(docs), tokenizer, two_epochs)), tokenizer) == docs + docs


# ------------------------------------------------------------------ fine-tuning


def trained_text(row_ids, row_loss_mask, tokenizer) -> str:
    """The text of the tokens whose prediction is trained (token t+1 where loss_mask[t] is 1)."""
    return tokenizer.decode(row_ids[1:][row_loss_mask[:-1] > 0])


def test_prompt_templates_and_field_names():
    alpaca = FinetuneDataConfig.alpaca(seq_len=512, batch_size=1)
    prompt, response = format_prompt_response({"instruction": "Add.", "input": "2 and 3", "output": "5"}, alpaca)
    assert "### Input:\n2 and 3" in prompt and prompt.endswith("### Response:") and response == "5"
    prompt, _ = format_prompt_response({"instruction": "Add.", "input": "", "output": "5"}, alpaca)
    assert prompt == ALPACA_PROMPT_TEMPLATE_NO_INPUT.format(instruction="Add.")
    metamath = FinetuneDataConfig.metamathqa(seq_len=512, batch_size=1)
    prompt, response = format_prompt_response({"query": "What is 2+3?", "response": "5"}, metamath)
    assert "### Instruction:\nWhat is 2+3?\n\n### Response:" in prompt and response == "5"
    with pytest.raises(BadRecordError, match=r"no string field\(s\) \['query'\].*metamathqa"):
        format_prompt_response({"question": "?", "response": "5"}, metamath)


@pytest.mark.parametrize("packing", [False, True])
def test_finetune_loss_only_on_response_tokens(packing, tokenizer):
    records = alpaca_records(10)
    config = short_config(packing=packing, shuffle=False)
    iterator = finetune_batches(records, tokenizer, config)
    batches = list(iterator)
    examples = []
    for batch in batches:
        for key in BATCH_KEYS:
            assert batch[key].shape == (3, 128) and batch[key].dtype == np.int32
        for row in range(3):
            segment_ids = batch["segment_ids"][row]
            assert not batch["loss_mask"][row][segment_ids == 0].any()  # no loss on padding
            assert (batch["input_ids"][row][segment_ids == 0] == tokenizer.pad_id).all()
            for segment in range(1, segment_ids.max() + 1):
                where = np.flatnonzero(segment_ids == segment)
                assert where.size and (np.diff(where) == 1).all()  # one contiguous run
                np.testing.assert_array_equal(batch["positions"][row][where], np.arange(where.size))
                ids, loss_mask = batch["input_ids"][row][where], batch["loss_mask"][row][where]
                assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id and loss_mask[-1] == 0
                first_trained = np.flatnonzero(loss_mask)[0] + 1
                examples.append((tokenizer.decode(ids[:first_trained]), trained_text(ids, loss_mask, tokenizer)))
            if not packing:
                assert segment_ids.max() <= 1
    expected = [format_prompt_response(r, config) for r in records]
    # Prompt untrained, response trained; in order without packing (shuffle off), first-fit with it.
    assert (sorted(examples) if packing else examples) == (sorted(expected) if packing else expected)
    assert any(prompt.startswith("Q: Task 0") and "In: note 0" in prompt for prompt, _ in examples)
    assert "In:" not in examples[1][0]  # the no-input template for an empty input
    if packing:
        assert len(batches) < 4 and max(b["segment_ids"].max() for b in batches) > 1
    else:
        assert len(batches) == 4  # 10 examples, 3 per batch, the last batch padded
        assert batches[-1]["segment_ids"][1:].sum() == 0
    assert iterator.stats["documents"] == 10 and iterator.stats["batches"] == len(batches)
    assert iterator.stats["truncated"] == iterator.stats["dropped"] == 0


def test_finetune_epochs_shuffle_and_shards(tokenizer):
    records = alpaca_records(11)
    prompts = {format_prompt_response(r, short_config())[0]: i for i, r in enumerate(records)}

    def example_order(batches):
        order = []
        for batch in batches:
            for row in range(batch["input_ids"].shape[0]):
                for segment in range(1, batch["segment_ids"][row].max() + 1):
                    where = batch["segment_ids"][row] == segment
                    ids, loss_mask = batch["input_ids"][row][where], batch["loss_mask"][row][where]
                    order.append(prompts[tokenizer.decode(ids[: np.flatnonzero(loss_mask)[0] + 1])])
        return order

    config = short_config(num_epochs=2, batch_size=2, seed=5)
    order = example_order(finetune_batches(records, tokenizer, config))
    assert sorted(order[:11]) == sorted(order[11:]) == list(range(11))  # each epoch sees every example once
    assert order[:11] != list(range(11)) and order[:11] != order[11:]  # shuffled, differently per epoch
    assert example_order(finetune_batches(records, tokenizer, config)) == order  # deterministic
    assert (
        example_order(finetune_batches(records, tokenizer, short_config(num_epochs=2, batch_size=2, seed=6))) != order
    )

    per_process = [
        example_order(finetune_batches(records, tokenizer, config, process_index=i, process_count=2)) for i in range(2)
    ]
    for epoch in range(2):
        halves = [per_process[0][6 * epoch : 6 * epoch + 6], per_process[1][5 * epoch : 5 * epoch + 5]]
        assert not set(halves[0]) & set(halves[1]) and sorted(halves[0] + halves[1]) == list(range(11))


@pytest.mark.parametrize("packing, process_count", [(False, 1), (True, 1), (True, 2)])
def test_finetune_resume_gives_the_same_batches(packing, process_count, tokenizer):
    records = alpaca_records(13)
    config = short_config(packing=packing, num_epochs=3, batch_size=2)
    process = process_count - 1
    uninterrupted = list(
        finetune_batches(records, tokenizer, config, process_index=process, process_count=process_count)
    )
    for consumed in (0, 1, len(uninterrupted) // 3 + 1, len(uninterrupted) // 2, len(uninterrupted)):
        iterator = finetune_batches(records, tokenizer, config, process_index=process, process_count=process_count)
        head = [next(iterator) for _ in range(consumed)]
        state = json.loads(json.dumps(iterator.get_state()))
        resumed = finetune_batches(
            records, tokenizer, config, process_index=process, process_count=process_count, state=state
        )
        assert_same_batches(head + list(resumed), uninterrupted)
        iterator.set_state(state)  # set_state on a used iterator works too
        assert_same_batches(head + list(iterator), uninterrupted)
    with pytest.raises(ValueError, match="seed=0"):
        finetune_batches(
            records,
            tokenizer,
            short_config(packing=packing, num_epochs=3, batch_size=2, seed=1),
            process_index=process,
            process_count=process_count,
            state=state,
        )


def test_finetune_bad_records_are_counted_or_raise(tokenizer):
    good = alpaca_records(3)
    records = [
        good[0],
        {"instruction": "no output"},
        {"prompt": "x", "completion": "y"},
        "a string",
        good[1],
        {"instruction": "empty output", "output": "  "},
        {"instruction": "Q", "output": None},
        good[2],
    ]
    iterator = finetune_batches(records, tokenizer, short_config(shuffle=False, on_bad_record="skip"))
    list(iterator)
    assert len(iterator.examples) == 3 and iterator.stats["documents"] == 3
    assert iterator.stats["skipped_missing_fields"] == 4 and iterator.stats["skipped_empty"] == 1
    assert "3 usable examples" in iterator.report()

    with pytest.raises(BadRecordError, match=r"record 1: .*\['output'\].*response_field.*on_bad_record='skip'"):
        finetune_batches(records, tokenizer, short_config())  # on_bad_record="error" is the default
    with pytest.raises(ValueError, match=r"none of the 2 records is usable.*record 0: .*\['instruction', 'output'\]"):
        finetune_batches([{"question": "q", "answer": "a"}] * 2, tokenizer, short_config(on_bad_record="skip"))


def test_finetune_overlong_examples_truncate_or_drop(tokenizer):
    short = {"instruction": "Hi", "input": "", "output": "Yes."}
    long = {"instruction": "Hi", "input": "", "output": " ".join(synthetic_corpus_lines(3, seed=4))}
    long_prompt = {"instruction": " ".join(synthetic_corpus_lines(3, seed=5)), "input": "", "output": "Yes."}
    records = [short, long, long_prompt]
    iterator = finetune_batches(records, tokenizer, short_config(shuffle=False, batch_size=4))
    batch = next(iterator)
    assert iterator.stats["truncated"] == 1 and iterator.stats["dropped"] == 1  # the prompt fills seq_len: dropped
    assert batch["segment_ids"][1].all() and batch["input_ids"][1, -1] != tokenizer.eos_id
    assert long["output"].startswith(trained_text(batch["input_ids"][1], batch["loss_mask"][1], tokenizer))
    assert batch["segment_ids"][2:].sum() == 0

    iterator = finetune_batches(records, tokenizer, short_config(shuffle=False, batch_size=4, overlong="drop"))
    batch = next(iterator)
    assert iterator.stats["truncated"] == 0 and iterator.stats["dropped"] == 2
    assert trained_text(batch["input_ids"][0], batch["loss_mask"][0], tokenizer) == "Yes."
    assert batch["segment_ids"][1:].sum() == 0


def test_finetune_from_local_json_files(tokenizer, tmp_path):
    queries = [
        {"query": f"What is {i} plus {i}?", "response": f"It is {2 * i}.", "type": "GSM_Rephrased"} for i in range(5)
    ]
    (tmp_path / "metamath.json").write_text(json.dumps(queries))  # MetaMathQA ships a JSON array
    config = FinetuneDataConfig.metamathqa(seq_len=256, batch_size=5, shuffle=False, add_bos=False)
    batch = next(finetune_batches(tmp_path / "metamath.json", tokenizer, config))
    assert [trained_text(batch["input_ids"][r], batch["loss_mask"][r], tokenizer) for r in range(5)] == [
        q["response"] for q in queries
    ]
    assert batch["input_ids"][0, 0] != tokenizer.bos_id

    records = alpaca_records(4)
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    batch = next(finetune_batches(tmp_path / "alpaca.jsonl", tokenizer, short_config(shuffle=False, batch_size=4)))
    assert [trained_text(batch["input_ids"][r], batch["loss_mask"][r], tokenizer) for r in range(4)] == [
        r["output"] for r in records
    ]


def test_finetune_all_examples_too_long_is_an_error_not_a_hang(tmp_path):
    from mora_jax import data as data_lib

    records = [{"query": "word " * 200, "response": "yes"} for _ in range(5)]
    corpus = tmp_path / "c.txt"
    data_lib.write_synthetic_corpus(corpus, 300)
    tok = data_lib.train_tokenizer(str(corpus), str(tmp_path / "tok"), vocab_size=400)
    config = data_lib.FinetuneDataConfig.metamathqa(32, 2, num_epochs=None)
    it = data_lib.finetune_batches(records, tok, config)
    with pytest.raises(ValueError, match="every one of this process's 5 fine-tuning examples is dropped.*raise seq_len"):
        next(it)

"""Bad bytes in local data files: invalid UTF-8 and malformed JSON lines are an error naming the file
and line (``on_bad_record='error'``, the default) or are counted and skipped (``'skip'``, shown in the
end-of-run report); resuming from a position in a file stays exact around them."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from configs import c4_pretrain
from mora_jax import recipes
from mora_jax.data import (
    BadRecordError,
    FinetuneDataConfig,
    PretrainDataConfig,
    finetune_batches,
    pretrain_batches,
    synthetic_corpus_lines,
    train_tokenizer,
    write_synthetic_corpus,
)
from mora_jax.run_config import RunConfig


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    write_synthetic_corpus(path, num_lines=600, seed=0)
    return train_tokenizer(path, tmp_path_factory.mktemp("tok") / "tok", vocab_size=384)


def _documents(tokenizer, batches) -> list[str]:
    ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] for b in batches])
    ends = np.flatnonzero(ids == tokenizer.eos_id)
    return [tokenizer.decode(piece) for piece in np.split(ids, ends + 1) if len(piece)]


def _config(**overrides) -> PretrainDataConfig:
    return PretrainDataConfig(**{"seq_len": 16, "batch_size": 2, "drop_remainder": False, **overrides})


def test_invalid_utf8_in_a_text_file_names_the_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"First line is fine.\nSecond one too.\nBroken \xff\xfe bytes here.\r\nLast line.\n")
    with pytest.raises(BadRecordError) as err:
        list(pretrain_batches(path, tokenizer, _config()))
    message = str(err.value)
    assert f"{path} line 3: invalid UTF-8" in message and "on_bad_record='skip'" in message

    iterator = pretrain_batches(path, tokenizer, _config(on_bad_record="skip"))
    assert _documents(tokenizer, list(iterator)) == ["First line is fine.", "Second one too.", "Last line."]
    assert iterator.stats["skipped_unreadable"] == 1 and iterator.stats["documents"] == 3
    assert "1 unreadable lines (invalid UTF-8 or malformed JSON)" in iterator.report()


def _bad_jsonl(path, opener=open):
    lines = [b'{"text": "Alpha document."}', b'{"text": "cut sh', b'', b'{"text": "Gamma \xc3\x28 bad."}',
             b'{"body": "no text"}', b'{"text": "Delta document."}']
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("name, opener", [("data.jsonl", open), ("data.jsonl.gz", gzip.open)])
def test_malformed_json_lines_are_named_or_counted(tokenizer, tmp_path, name, opener):
    path = tmp_path / name
    _bad_jsonl(path, opener)
    with pytest.raises(BadRecordError, match=rf"{path} line 2: malformed JSON \(Unterminated string"):
        list(pretrain_batches(path, tokenizer, _config()))
    iterator = pretrain_batches(path, tokenizer, _config(on_bad_record="skip"))
    assert _documents(tokenizer, list(iterator)) == ["Alpha document.", "Delta document."]
    assert iterator.stats["skipped_unreadable"] == 2 and iterator.stats["skipped_missing_fields"] == 1


def test_a_record_without_its_text_field_is_named_by_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n{"body": "no text"}\n')  # the blank line 2 is counted
    with pytest.raises(BadRecordError, match=rf"{path} line 3: no text field 'text' \(found \['body'\]\)"):
        list(pretrain_batches(path, tokenizer, _config()))


def test_fine_tuning_records_name_their_file_and_line(tokenizer, tmp_path):
    good = {"query": "What is one plus one?", "response": "Two."}
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"query": "q"}) + "\n" + '{"query": \n' + json.dumps(good) + "\n")
    config = FinetuneDataConfig.metamathqa(seq_len=64, batch_size=2)
    with pytest.raises(BadRecordError, match=rf"{path} line 2: record has no string field\(s\) \['response'\]"):
        finetune_batches(path, tokenizer, config)
    path.write_text(json.dumps(good) + "\n" + '{"query": \n' + json.dumps(good) + "\n")
    with pytest.raises(BadRecordError, match=rf"{path} line 2: malformed JSON"):
        finetune_batches(path, tokenizer, config)
    iterator = finetune_batches(path, tokenizer, FinetuneDataConfig.metamathqa(seq_len=64, batch_size=2,
                                                                               on_bad_record="skip"))
    assert len(iterator.examples) == 2 and iterator.stats["skipped_unreadable"] == 1
    assert "1 unreadable lines" in iterator.report()


def test_a_malformed_json_array_file_is_named(tokenizer, tmp_path):
    path = tmp_path / "records.json"
    path.write_text('[\n  {"text": "one"},\n  {"text": "two",\n]\n')
    with pytest.raises(ValueError, match=rf"{path} line 4: malformed JSON"):
        next(pretrain_batches(path, tokenizer, _config(on_bad_record="skip")))
    path.write_text(json.dumps([{"text": "Alpha document."}, {"text": "Beta document."}]))
    assert _documents(tokenizer, list(pretrain_batches(path, tokenizer, _config()))) == ["Alpha document.",
                                                                                       "Beta document."]


@pytest.mark.parametrize("process_count", [1, 2])
def test_resume_from_a_file_position_is_exact_around_bad_lines(tokenizer, tmp_path, process_count):
    lines = [line.encode() for line in synthetic_corpus_lines(40, seed=3)]
    lines[5], lines[17] = b"bad \xff byte", b"another \xc0 bad one"
    path = tmp_path / "docs.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    config = PretrainDataConfig(seq_len=12, batch_size=2, num_epochs=2, on_bad_record="skip")
    process = process_count - 1
    reference = pretrain_batches(path, tokenizer, config, process_index=process, process_count=process_count)
    uninterrupted = list(reference)
    offsets = []
    for consumed in (1, len(uninterrupted) // 3, len(uninterrupted) // 2 + 1):
        iterator = pretrain_batches(path, tokenizer, config, process_index=process, process_count=process_count)
        head = [next(iterator) for _ in range(consumed)]
        state = json.loads(json.dumps(iterator.get_state()))
        assert state["source_state"]["format"] == "mora_jax.data.lines/1"  # a byte offset to seek to
        offsets.append(state["source_state"]["offset"])
        resumed = pretrain_batches(path, tokenizer, config, process_index=process, process_count=process_count,
                                   state=state)
        got = head + list(resumed)
        assert len(got) == len(uninterrupted)
        for a, b in zip(got, uninterrupted):
            np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        assert resumed.stats == reference.stats
    assert max(offsets) > 0 and reference.stats["skipped_unreadable"] >= 1


def test_the_run_config_passes_on_bad_record_to_the_data(tokenizer, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"Good line.\nBad \xff line.\n" * 40)
    config = c4_pretrain.get_config("tiny")
    config.data.source = str(path)
    config.data.eval_source = ""
    run_config = RunConfig.from_dict(config)
    assert run_config.data.on_bad_record == "error"
    train, _ = recipes.build_data(run_config, "pretrain", tokenizer)
    with pytest.raises(BadRecordError, match=rf"{path} line 2: invalid UTF-8"):
        next(train)
    config.data.on_bad_record = "skip"
    train, _ = recipes.build_data(RunConfig.from_dict(config), "pretrain", tokenizer)
    next(train)
    assert train.stats["skipped_unreadable"] >= 1 and "unreadable lines" in train.report()
    config.data.on_bad_record = "ignore"
    with pytest.raises(ValueError, match="data.on_bad_record='ignore': choose 'error'.*or 'skip'"):
        RunConfig.from_dict(config)

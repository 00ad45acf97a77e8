"""Tokenizers: a checkpoint's tokenizer.json through the ``tokenizers`` library (against
``transformers``' own tokenizer), its chat template, the one ``Tokenizer`` interface over it and
SentencePiece, fine-tuning batches with the chat template, the pipelines taking the tokenizer from
the checkpoint, and tokenizers that do not fit a model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiny_families as tf

from mora_jax.data import FinetuneDataConfig, Tokenizer, finetune_batches, train_tokenizer
from mora_jax.data.chat_template import ChatTemplateError, render
from mora_jax.data.tokenizer import HFTokenizer, SentencePieceTokenizer

TEXTS = ["the cat sat on the mat", "what is two plus three?", "  spaces  and\nnewlines ", "unseen words: zebra"]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus three"},
        {"role": "assistant", "content": "five"}, {"role": "user", "content": "and the cat?"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tf.write_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenizer_json_matches_transformers(tok_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
    ours = Tokenizer(tok_dir)
    assert isinstance(ours, HFTokenizer) and isinstance(ours, Tokenizer)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.eos_token_id)
    assert ours.vocab_size == len(theirs) and ours.adds_bos
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.decode([ours.bos_id, *ids, ours.eos_id]) == theirs.decode(ids, skip_special_tokens=True)
    for generation_prompt in (False, True):
        text = ours.apply_chat_template(CHAT, add_generation_prompt=generation_prompt)
        assert text == theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=generation_prompt)
        expected = theirs.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=generation_prompt)
        expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
        assert ours.encode(text) == list(expected)  # special-token strings encode to their ids, BOS once
    assert ours.encode(ours.apply_chat_template(CHAT[:2]))[0] == ours.bos_id


def test_one_interface_picks_the_kind(tok_dir, tmp_path):
    Tokenizer(tok_dir / "tokenizer.json").encode("the cat")  # the file itself works too
    sp = train_tokenizer(tf.CORPUS * 20, tmp_path / "sp" / "tokenizer", vocab_size=300)
    assert isinstance(Tokenizer(tmp_path / "sp"), SentencePieceTokenizer)  # a directory with tokenizer.model
    assert isinstance(Tokenizer(sp.model_file), SentencePieceTokenizer) and sp.chat_template is None
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        sp.apply_chat_template(CHAT)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        Tokenizer(bad)


def test_chat_template_variants_and_errors(tok_dir, tmp_path):
    out = tmp_path / "t"
    shutil.copytree(tok_dir, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "{{ messages[0]['content'] | upper }}"},
                            {"name": "tool_use", "template": "x"}]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer(out).apply_chat_template(CHAT) == "BE BRIEF"
    (out / "chat_template.jinja").write_text("{{ bos_token }}{{ messages | length }}")  # the separate file wins
    assert Tokenizer(out).apply_chat_template(CHAT) == "<|begin_of_text|>4"
    with pytest.raises(ChatTemplateError, match="failed on these messages: no"):
        render("{{ raise_exception('no') }}", CHAT)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render("{% for %}", CHAT)
    with pytest.raises(ChatTemplateError, match="list of dicts"):
        render("x", {"role": "user"})


def test_check_fits_refuses_a_tokenizer_of_another_model(tok_dir):
    tok = Tokenizer(tok_dir)
    tok.check_fits(128, bos_token_id=1, eos_token_id=2)
    tok.check_fits(128, bos_token_id=1, eos_token_id=[2, 5])
    with pytest.raises(ValueError, match=r"has \d+ tokens but the model only 100 embeddings"):
        tok.check_fits(100)
    with pytest.raises(ValueError, match="is not the tokenizer of llama3: BOS is 1 here, 128000 in the model's config"):
        tok.check_fits(128256, bos_token_id=128000, eos_token_id=128001, model="llama3")
    with pytest.raises(ValueError, match=r"EOS id\(s\) \[128001\] are not in this vocabulary"):
        tok.check_fits(128256, eos_token_id=128001)


def test_finetune_batches_with_the_chat_template(tok_dir):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(tok_dir)
    tok = Tokenizer(tok_dir)
    records = [{"query": "what is two plus three", "response": "the answer is five"}]
    config = FinetuneDataConfig.metamathqa(64, 1, chat_template=True, system_prompt="be brief", shuffle=False)
    batch = next(iter(finetune_batches(records, tok, config)))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": records[0]["query"]}]
    prompt = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = theirs(prompt, add_special_tokens=False)["input_ids"]
    expected += theirs("the answer is five", add_special_tokens=False)["input_ids"] + [tok.eos_id]
    n = len(expected)
    np.testing.assert_array_equal(batch["input_ids"][0, :n], expected)
    assert list(batch["input_ids"][0, :2]) == [tok.bos_id, tok.encode("<|start_header_id|>")[0]]  # BOS once
    trained = np.flatnonzero(batch["loss_mask"][0])
    prompt_len = len(theirs(prompt, add_special_tokens=False)["input_ids"])
    assert trained[0] == prompt_len - 1 and trained[-1] == n - 2  # predictions of the response and EOS only
    with pytest.raises(ValueError, match="has no chat template"):
        finetune_batches(records, train_tokenizer(tf.CORPUS * 20, tok_dir.parent / "sp", vocab_size=300), config)


def test_pipelines_take_the_checkpoint_tokenizer(tok_dir, tmp_path):
    from configs import base
    from mora_jax import recipes
    from mora_jax.run_config import RunConfig

    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tf.checkpoint("llama3"), checkpoint)
    for f in tok_dir.iterdir():
        shutil.copy(f, checkpoint / f.name)
    c = base.base_config()
    c.model.hf_path = str(checkpoint)
    c.data.tokenizer = ""
    tokenizer = recipes._tokenizer(RunConfig.from_dict(c))
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.directory == checkpoint
    # a tokenizer.json of another model (its vocabulary is larger than this model's) is refused
    words = [" ".join(f"{a}{b}{c}" for b in "aeiou" for c in "rstlnm") for a in "bcdfghjkpqvwxyz"]
    other = tf.write_tokenizer(tmp_path / "other", vocab_size=300, chat=False, corpus=words)
    assert Tokenizer(other).vocab_size > 128
    c.data.tokenizer = str(other)
    with pytest.raises(ValueError, match="tokens but .*ckpt only 128 embeddings"):
        recipes._tokenizer(RunConfig.from_dict(c))

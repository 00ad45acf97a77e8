"""``mora_jax.generate``: greedy output equal to Hugging Face ``generate`` on random tiny Llama 3 /
Mistral / Qwen2 checkpoints (plain, left-padded, with a MoRA adapter unmerged or merged, scanned,
sharded), EOS and padding, sampling, a decode step whose cost does not grow with the prefix, bad
input, the CLI and the UUID task's decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny_families as tf

import mora_jax as mj
from mora_jax.generate import encode_prompts, left_pad, lower_decode_step
from mora_jax.hf import load_llama, save_adapter, save_llama
from mora_jax.models import LlamaForCausalLM

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW = 10


def _hf_generate(directory, ids, mask=None, new=NEW):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    with torch.no_grad():
        out = hf_model.generate(torch.tensor(ids), max_new_tokens=new, do_sample=False, **kwargs).numpy()
    out = out[:, ids.shape[1]:]
    pad = hf_model.generation_config.pad_token_id
    pad = hf_model.generation_config.eos_token_id if pad is None else pad
    pad = pad[0] if isinstance(pad, list) else pad
    return np.pad(out, ((0, 0), (0, new - out.shape[1])), constant_values=pad)  # HF stops when all rows are done


def _prompts(seed=1):
    """Two rows of different lengths, left-padded, and the same rows unpadded at equal length."""
    ids, mask = left_pad([list(tf.ids((1, 9), seed=seed)[0]), list(tf.ids((1, 4), seed=seed + 1)[0])], pad_id=0)
    return ids, mask


def _mora(params, seed=1):
    config = mj.MoRAConfig(r=4, mora_type=6)
    adapters = mj.init_adapters(params, config, jax.random.key(0))
    leaves, tree = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return config, jax.tree_util.tree_unflatten(tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


@pytest.mark.torch
@pytest.mark.parametrize("name", tf.MAIN)
def test_greedy_equals_hf_generate_plain_and_left_padded(name):
    directory = tf.checkpoint(name)
    model, params = load_llama(directory)
    ids, mask = _prompts()
    plain = tf.ids((2, 9), seed=7)
    np.testing.assert_array_equal(mj.generate(model, params, plain, max_new_tokens=NEW), _hf_generate(directory, plain))
    ours = mj.generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW)
    assert ours.shape == (2, NEW) and ours.dtype == jnp.int32
    np.testing.assert_array_equal(ours, _hf_generate(directory, ids, mask))
    # a left-padded row continues exactly as it does alone
    alone = mj.generate(model, params, ids[1:, 5:], max_new_tokens=NEW)
    np.testing.assert_array_equal(ours[1], alone[0])


@pytest.mark.torch
@pytest.mark.parametrize("name", tf.MAIN)
def test_greedy_with_a_mora_adapter_unmerged_and_merged(name, tmp_path):
    model, params = load_llama(tf.checkpoint(name))
    _, adapters = _mora(params)
    merged = mj.merge(params, adapters)
    save_llama(tmp_path / "merged", model, merged)
    ids, mask = _prompts(seed=3)
    ours = mj.generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW, adapters=adapters)
    np.testing.assert_array_equal(ours, _hf_generate(tmp_path / "merged", ids, mask))
    np.testing.assert_array_equal(
        mj.generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW, adapters=adapters,
                    merge_adapters=True), ours)
    assert not np.array_equal(ours, mj.generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW))


def test_scanned_model_and_adapters_give_the_same_tokens():
    directory = tf.checkpoint("qwen2")
    model, params = load_llama(directory)
    scanned, sparams = load_llama(directory, scan_layers=True)
    _, adapters = _mora(params)
    ids, mask = _prompts(seed=5)
    ours = mj.generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW, adapters=adapters)
    stacked = mj.models.stack_layers(adapters)
    np.testing.assert_array_equal(
        mj.generate(scanned, sparams, ids, attention_mask=mask, max_new_tokens=NEW, adapters=stacked), ours)


def test_sharded_over_a_mesh_like_training():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (tests/conftest.py forces 8 CPU devices)")
    from mora_jax import mesh as mesh_lib

    model, params = load_llama(tf.checkpoint("mistral"))
    _, adapters = _mora(params)
    ids, mask = _prompts(seed=2)
    expected = mj.generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW, adapters=adapters)
    mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(axis_sizes=(2, 1, 2)), devices=jax.devices()[:4])
    out = mj.generate(model, params, ids, attention_mask=mask, max_new_tokens=NEW, adapters=adapters, mesh=mesh)
    np.testing.assert_array_equal(out, expected)
    with pytest.raises(ValueError, match="cannot be split over the mesh's 2 batch shards"):
        mj.generate(model, params, ids[:1], max_new_tokens=NEW, mesh=mesh)


def test_eos_stops_a_row_and_pads_after_it():
    model, params = load_llama(tf.checkpoint("llama3"))
    ids = tf.ids((2, 6), seed=11)
    free = np.asarray(mj.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=[]))
    eos = int(free[0, 2])  # make row 0's third token the EOS
    out = np.asarray(mj.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0))
    first = np.flatnonzero(free[0] == eos)[0]
    np.testing.assert_array_equal(out[0, : first + 1], free[0, : first + 1])
    assert (out[0, first + 1:] == 0).all()
    row1_stop = np.flatnonzero(free[1] == eos)
    end = row1_stop[0] + 1 if row1_stop.size else NEW
    np.testing.assert_array_equal(out[1, :end], free[1, :end])


def test_sampling():
    model, params = load_llama(tf.checkpoint("qwen2"))
    ids = tf.ids((2, 6), seed=4)
    greedy = mj.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=[])
    top1 = mj.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=[], temperature=1.0, top_k=1,
                       rng=jax.random.key(3))
    np.testing.assert_array_equal(top1, greedy)  # top-k 1 is greedy
    nucleus = mj.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=[], temperature=0.7, top_p=1e-6,
                          rng=jax.random.key(3))
    np.testing.assert_array_equal(nucleus, greedy)  # a tiny nucleus keeps the most likely token only
    a = mj.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=[], temperature=2.0, rng=jax.random.key(1))
    b = mj.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=[], temperature=2.0, rng=jax.random.key(1))
    c = mj.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=[], temperature=2.0, rng=jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, greedy)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_decode_step_cost_does_not_grow_like_re_encoding():
    model, params = load_llama(tf.checkpoint("llama3"))
    short, long = 16, 256
    step = {n: _flops(lower_decode_step(model, params, batch_size=1, cache_length=n).compile()) for n in (short, long)}
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
    encode = {n: _flops(forward.lower(params, jnp.zeros((1, n), jnp.int32)).compile()) for n in (short, long)}
    assert encode[long] / encode[short] > 10  # re-encoding the prefix: ~16x the work
    assert step[long] / step[short] < encode[long] / encode[short] / 4
    # a cached step grows only by reading the longer cache: q·k and p·v, 2·2·N·H flops per slot and
    # layer (x2 for the softmax and the mask), not by running the layers on the prefix again
    c = model.config
    per_slot = 2 * 4 * c.num_attention_heads * c.resolved_head_dim * c.num_hidden_layers
    assert step[long] - step[short] <= per_slot * (long - short)
    assert step[long] < encode[short]  # one new token against 256 cached ones costs less than encoding 16


def test_bad_input_is_refused():
    model, params = load_llama(tf.checkpoint("llama3"))  # max_position_embeddings 64
    ids = tf.ids((1, 8))
    with pytest.raises(ValueError, match="longer than the model's maximum length 64"):
        mj.generate(model, params, tf.ids((1, 65)), max_new_tokens=1)
    with pytest.raises(ValueError, match="exceed the model's maximum length 64.*at most 56 new tokens"):
        mj.generate(model, params, ids, max_new_tokens=57)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive int"):
            mj.generate(model, params, ids, max_new_tokens=bad)
    with pytest.raises(ValueError, match="left padding"):
        mj.generate(model, params, ids, attention_mask=np.array([[1] * 6 + [0] * 2]), max_new_tokens=2)
    with pytest.raises(ValueError, match="all padding"):
        mj.generate(model, params, ids, attention_mask=np.zeros((1, 8), int), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"outside \[0, 128\)"):
        mj.generate(model, params, ids + 200, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        mj.generate(model, params, ids, max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        mj.generate(object(), params, ids, max_new_tokens=2)


def test_dynamic_rope_generates_past_max_position_embeddings():
    directory = tf.checkpoint("llama-dynamic")  # max_position_embeddings 8: dynamic NTK extends it
    model, params = load_llama(directory)
    ids = tf.ids((1, 6), seed=9)
    np.testing.assert_array_equal(mj.generate(model, params, ids, max_new_tokens=8), _hf_generate(directory, ids, new=8))


# ---- The CLI and the UUID task -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    import shutil

    directory = tmp_path_factory.mktemp("chat") / "llama3"
    shutil.copytree(tf.checkpoint("llama3"), directory)
    tf.write_tokenizer(directory)
    return directory


def test_cli_generate(chat_checkpoint, tmp_path, capsys):
    from mora_jax.cli import main
    from mora_jax.data import Tokenizer

    model, params = load_llama(chat_checkpoint)
    config, adapters = _mora(params)
    save_adapter(tmp_path / "adapter", config, adapters)
    tokenizer = Tokenizer(chat_checkpoint)
    prompt = "what is two plus three"
    assert main(["generate", "--base", str(chat_checkpoint), "--adapter", str(tmp_path / "adapter"), "--prompt", prompt,
                 "--max-new-tokens", "6", "--chat"]) == 0
    printed = capsys.readouterr().out.strip()
    ids, mask = encode_prompts(tokenizer, [prompt], chat=True)
    assert ids[0, 0] == tokenizer.bos_id and list(ids[0]).count(tokenizer.bos_id) == 1
    expected = np.asarray(mj.generate(model, params, ids, attention_mask=mask, max_new_tokens=6, adapters=adapters,
                                      eos_token_id=[2]))[0].tolist()
    expected = expected[: expected.index(2)] if 2 in expected else expected
    assert printed == tokenizer.decode(expected)
    # errors: one line, nothing loaded
    assert main(["generate", "--base", str(chat_checkpoint), "--prompt", "x", "--max-new-tokens", "0"]) == 1
    assert "--max-new-tokens must be positive" in capsys.readouterr().err
    assert main(["generate", "--base", str(chat_checkpoint), "--prompt", "the cat " * 40]) == 1
    assert "exceeds the model's maximum length 64" in capsys.readouterr().err
    other = tf.write_tokenizer(tmp_path / "other", vocab_size=300, chat=False, corpus=[
        " ".join(f"{a}{b}{c}" for b in "aeiou" for c in "rstlnm") for a in "bcdfghjkpqvwxyz"])
    assert main(["generate", "--base", str(chat_checkpoint), "--prompt", "x", "--tokenizer", str(other)]) == 1
    assert "only 128 embeddings" in capsys.readouterr().err


def test_uuid_task_decodes_with_the_kv_cache():
    from mora_jax.experiments import uuid_task

    config = mj.LlamaConfig(vocab_size=uuid_task.VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=uuid_task.SEQ_LEN)
    model = LlamaForCausalLM(config)
    params = mj.models.init_params(config, jax.random.key(0))
    pairs = uuid_task.make_pairs(3, seed=0)
    keys = jnp.asarray(uuid_task.encode_pairs(pairs)["input_ids"][:, : uuid_task.PROMPT_LEN])
    cached = uuid_task.greedy_values(model, keys, params=params)
    re_encoded = uuid_task.greedy_values(jax.jit(lambda ids: model.apply({"params": params}, ids)), keys)
    assert cached.shape == (3, uuid_task.UUID_LEN)
    np.testing.assert_array_equal(cached, re_encoded)


def test_cli_generate_on_a_quantized_base(chat_checkpoint, capsys):
    """--quantize stores the projections quantized: the output is mj.generate's on the quantized params; a
    block size that does not divide a kernel is one line before any weight is read."""
    from mora_jax.cli import main
    from mora_jax.data import Tokenizer
    from mora_jax.quant.config import QuantConfig
    from mora_jax.quant.transform import quantize, quantized_paths

    model, params = load_llama(chat_checkpoint)
    quantized = quantize(params, QuantConfig("nf4", block_size=4))
    assert len(quantized_paths(quantized)) == 7 * model.config.num_hidden_layers
    tokenizer = Tokenizer(chat_checkpoint)
    ids, mask = encode_prompts(tokenizer, ["the cat"])
    assert main(["generate", "--base", str(chat_checkpoint), "--prompt", "the cat", "--max-new-tokens", "5",
                 "--quantize", "nf4", "--block-size", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    expected = np.asarray(mj.generate(model, quantized, ids, attention_mask=mask, max_new_tokens=5,
                                      eos_token_id=[2]))[0].tolist()
    expected = expected[: expected.index(2)] if 2 in expected else expected
    assert printed == tokenizer.decode(expected)
    assert main(["generate", "--base", str(chat_checkpoint), "--prompt", "x", "--quantize", "int4",
                 "--block-size", "48", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "not a multiple of the block size 48" in err and len(err.strip().splitlines()) == 1

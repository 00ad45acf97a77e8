"""GGUF in without torch (mora_jax.gguf.weights, mora_jax.gguf.tokenizer, mora-jax convert-gguf): tiny GGUF
files written by gguf's own writer (tests/tiny_gguf.py) for each family, tensor type and tokenizer
kind, read back exactly, converted to a Hugging Face directory the project reads, and checked
against transformers' own GGUF loader (logits, tokenizer ids, chat-template rendering)."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import tiny_gguf as tg

from mora_jax import cli
from mora_jax.data import Tokenizer
from mora_jax.gguf.weights import (
    GGUFFile,
    convert_gguf,
    load_gguf,
    permute_rows,
    read_config,
    unpermute_rows,
)
from mora_jax.hf import load_llama, params_to_hf_tensors
from mora_jax.models.llama import LlamaForCausalLM
from mora_jax.models.rope import RopeScaling, rope_inv_freq

SPECS = {  # family / tensor type / tied / tokenizer kind; every one with grouped-query attention (4 q, 2 kv heads)
    "llama-f32-untied-bpe": tg.Spec(tied=False),
    "llama-q8_0-tied-spm": tg.Spec(qtype="Q8_0", tokenizer="llama"),
    "mistral-q4_0-untied-spm": tg.Spec(name="Mistral-7B-tiny", qtype="Q4_0", tied=False, tokenizer="llama"),
    "qwen2-q4_1-tied-bpe": tg.Spec(arch="qwen2", qtype="Q4_1", pre="qwen2"),
    "qwen2-f16-untied-bpe": tg.Spec(arch="qwen2", qtype="F16", tied=False, pre="qwen2"),
    "llama-bf16-tied-bpe": tg.Spec(qtype="BF16", layers=1, pre="gpt2"),
    "llama-q4_k-llama3-bpe": tg.Spec(qtype="Q4_K", hidden=256, intermediate=256, layers=1, pre="llama-bpe"),
    "llama-q6_k": tg.Spec(qtype="Q6_K", hidden=256, intermediate=512, layers=1, tied=False),
}
TEXTS = ["the cat sat on the mat", "what is two plus three?", "  spaces  and\nnewlines ", "unseen: zebra 1 2",
         "<|im_start|>user"]
CHAT = [{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": "five"},
        {"role": "user", "content": "and the cat?"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``{spec name: (gguf path, write() info, converted HF directory)}``, made once."""
    out = {}
    for name, spec in SPECS.items():
        d = tmp_path_factory.mktemp(name)
        info = tg.write(d / "model.gguf", spec)
        out[name] = (d / "model.gguf", info, convert_gguf(d / "model.gguf", d / "hf"))
    return out


def test_permutation_is_llama_cpps_interleaving():
    heads, head_dim = 3, 8
    w = np.random.default_rng(0).normal(size=(heads * head_dim, 5))
    stored = permute_rows(w, heads)
    for h in range(heads):  # row 2i of a stored head is HF row i, row 2i+1 is HF row H/2 + i
        for i in range(head_dim // 2):
            np.testing.assert_array_equal(stored[h * head_dim + 2 * i], w[h * head_dim + i])
            np.testing.assert_array_equal(stored[h * head_dim + 2 * i + 1], w[h * head_dim + head_dim // 2 + i])
    np.testing.assert_array_equal(unpermute_rows(stored, heads), w)
    np.testing.assert_array_equal(unpermute_rows(permute_rows(w[:, 0], heads), heads), w[:, 0])  # a bias


@pytest.mark.parametrize("name", list(SPECS))
def test_load_gguf_recovers_every_weight(files, name):
    path, info, _ = files[name]
    spec = SPECS[name]
    config, params = load_gguf(path)
    assert config.model_type == ("qwen2" if spec.arch == "qwen2" else "mistral" if "Mistral" in spec.name else "llama")
    assert (config.tie_word_embeddings, config.num_key_value_heads, config.vocab_size) == (
        spec.tied, spec.kv_heads, len(info["tokens"]))
    assert (config.rms_norm_eps, config.bos_token_id, config.eos_token_id, config.max_position_embeddings) == (
        1e-5, 1, 2, spec.context)
    ours = params_to_hf_tensors(config, params)
    assert sorted(ours) == sorted(info["weights"])  # qwen2's q/k/v biases included, a tied head absent
    for hf_name, expected in info["weights"].items():  # exactly the stored values, rows back in HF order
        np.testing.assert_array_equal(ours[hf_name], expected, err_msg=hf_name)


def test_converted_directory_is_read_by_the_project(files):
    for name in ("llama-f32-untied-bpe", "llama-q8_0-tied-spm"):
        path, info, hf_dir = files[name]
        config, params = load_gguf(path)
        model, loaded = load_llama(hf_dir)
        assert model.config.replace(param_dtype=config.param_dtype) == config
        theirs = params_to_hf_tensors(config, loaded)
        for key, value in params_to_hf_tensors(config, params).items():
            np.testing.assert_array_equal(value, theirs[key], err_msg=key)
        tok = Tokenizer(hf_dir)
        assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.adds_bos) == (config.vocab_size, 1, 2, SPECS[name].tokenizer == "llama")
        tok.check_fits(config.vocab_size, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
        if info["sp"] is not None:  # SentencePiece's own encoding of the vocabulary it trained (a text that
            # starts with a space differs: as in transformers, no second "▁" is prepended to it)
            for text in [t.lstrip() for t in TEXTS[:4]] + ["zebra café ünïcode"]:
                assert tok.encode(text) == info["sp"].encode(text), text
                assert tok.decode(tok.encode(text)) == info["sp"].decode(info["sp"].encode(text))
            assert tok.apply_chat_template(CHAT) == "<s>[INST] what is two plus three [/INST] five</s>[INST] and the cat? [/INST]"
        else:
            assert tok.apply_chat_template(CHAT[:1], add_generation_prompt=True) == (
                "<|im_start|>user\nwhat is two plus three<|im_end|>\n<|im_start|>assistant\n")
            assert tok.encode("<|im_end|>") == [2] and tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]
    generation = json.loads((files["llama-f32-untied-bpe"][2] / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_pre_tokenizers_split_as_llama_cpp(tmp_path):
    digits = {}
    for pre in ("smollm", "gpt2"):
        tg.write(tmp_path / f"{pre}.gguf", tg.Spec(pre=pre, layers=1))
        tok = Tokenizer(convert_gguf(tmp_path / f"{pre}.gguf", tmp_path / pre))
        digits[pre] = [p for i in tok.encode("user 12 345") if (p := tok.id_to_piece(i).lstrip("Ġ"))]
    assert digits["smollm"][-5:] == ["1", "2", "3", "4", "5"]  # one digit each, as llama.cpp's "smollm"
    assert any(len(p) > 1 and p.isdigit() for p in digits["gpt2"])  # GPT-2's regex keeps a number whole


def test_llama3_rope_freqs_are_recognised(tmp_path):
    head_dim, theta = 16, 10000.0
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)  # llama.cpp's factors for factor 8, low 1, high 4, 8192
    wavelen = 2 * np.pi / inv
    smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
    factors = np.where(wavelen < 8192 / 4, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
    tg.write(tmp_path / "l3.gguf", tg.Spec(layers=1, rope_freqs=factors))
    config = read_config(GGUFFile(tmp_path / "l3.gguf"))
    assert config.rope_scaling == RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_position_embeddings=8192)
    np.testing.assert_allclose(rope_inv_freq(head_dim, theta) / rope_inv_freq(head_dim, theta, config.rope_scaling),
                               factors, rtol=1e-5)
    tg.write(tmp_path / "odd.gguf", tg.Spec(layers=1, rope_freqs=factors[::-1].copy()))
    with pytest.raises(ValueError, match="rope_freqs tensor .* is not Llama 3.1's llama3 scaling"):
        read_config(GGUFFile(tmp_path / "odd.gguf"))


def _edit(path, out, change):
    """Copy a GGUF file through gguf's writer with ``change`` applied: ``arch``, ``qtype`` (of
    blk.0.ffn_up.weight, as zero bytes), or metadata ``key: string value`` (replaced or added)."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = change.get("arch", reader.fields["general.architecture"].contents())
    w = gguf.GGUFWriter(out, arch)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture" and key not in change:
            array = field.types[0] == gguf.GGUFValueType.ARRAY
            w.add_key_value(key.replace("llama.", f"{arch}.", 1), field.contents(), field.types[0],
                            sub_type=field.types[-1] if array else None)
    for key, value in change.items():
        if "." in key:
            w.add_array(key, value) if isinstance(value, list) else w.add_string(key, value)
    for t in reader.tensors:
        data, qtype = np.asarray(t.data), t.tensor_type
        if t.name == "blk.0.ffn_up.weight" and "qtype" in change:  # the same elements, bytes of another type
            qtype = change["qtype"]
            data = np.zeros(gguf.quants.quant_shape_to_byte_shape(tuple(int(d) for d in t.shape[::-1]), qtype), np.uint8)
        w.add_tensor(t.name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_unsupported_inputs_get_one_clear_line(files, tmp_path, capsys):
    import gguf

    path = files["llama-q8_0-tied-spm"][0]
    cases = [({"arch": "phi3"}, "GGUF architecture 'phi3' is not supported; supported: 'llama'"),
             ({"qtype": gguf.GGMLQuantizationType.IQ4_NL}, "tensor type.s. IQ4_NL are not supported; supported: F32"),
             ({"tokenizer.ggml.model": "bert"}, "GGUF tokenizer model 'bert' is not supported"),
             ({"llama.rope.scaling.type": "yarn"}, "RoPE scaling 'yarn' is not supported")]
    for i, (change, message) in enumerate(cases):
        bad = _edit(path, tmp_path / f"bad{i}.gguf", change)
        with pytest.raises(ValueError, match=message):
            convert_gguf(bad, tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()  # nothing written
        assert cli.main(["convert-gguf", str(bad), str(tmp_path / f"out{i}")]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("mora-jax: error: ") and "not supported" in err[-1]
    bpe = files["llama-f32-untied-bpe"][0]
    with pytest.raises(ValueError, match="pre-tokenizer 'mystery' .* is not supported; supported: .*smollm"):
        convert_gguf(_edit(bpe, tmp_path / "pre.gguf", {"tokenizer.ggml.pre": "mystery"}), tmp_path / "pre")
    with pytest.raises(ValueError, match="the GGUF vocabulary is inconsistent"):
        convert_gguf(_edit(bpe, tmp_path / "merges.gguf", {"tokenizer.ggml.merges": ["zz qq"]}), tmp_path / "merges")
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(64))
    assert cli.main(["convert-gguf", str(tmp_path / "not.gguf"), str(tmp_path / "x")]) == 1
    assert "not a readable GGUF file" in capsys.readouterr().err
    hf_dir = files["llama-q8_0-tied-spm"][2]
    assert cli.main(["convert-gguf", str(path), str(hf_dir)]) == 1  # refuses to overwrite
    assert "not an empty directory; choose a new one or pass --overwrite" in capsys.readouterr().err
    assert cli.main(["convert-gguf", str(path), str(tmp_path / "ok")]) == 0
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == sorted(p.name for p in hf_dir.iterdir())


@pytest.mark.torch
@pytest.mark.parametrize("name", list(SPECS))
def test_matches_transformers_gguf_loader(files, name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, _, hf_dir = files[name]
    config, params = load_gguf(path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        expected = theirs.eval()(torch.tensor(ids)).logits.numpy()
        from_dir = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(LlamaForCausalLM(config).apply({"params": params}, jnp.asarray(ids)))
    scale = np.abs(expected).max()
    assert np.abs(ours - expected).max() / scale < 1e-5
    assert np.abs(from_dir - expected).max() / scale < 1e-6  # transformers reads the converted directory too

    their_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = Tokenizer(hf_dir)
    assert (tok.bos_id, tok.eos_id, tok.adds_bos) == (their_tok.bos_token_id, their_tok.eos_token_id,
                                                      their_tok.add_bos_token)
    for text in TEXTS if SPECS[name].pre != "smollm" else TEXTS[:3]:  # transformers ignores smollm's digit split
        assert tok.encode(text) == their_tok(text, add_special_tokens=False)["input_ids"], text
    for prompt in (False, True):
        text = tok.apply_chat_template(CHAT, add_generation_prompt=prompt)
        assert text == their_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=prompt)
        expected_ids = their_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=prompt)
        assert tok.encode(text) == list(expected_ids["input_ids"] if hasattr(expected_ids, "keys") else expected_ids)

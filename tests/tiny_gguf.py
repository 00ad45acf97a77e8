"""Tiny GGUF files written in the tests with ``gguf``'s own ``GGUFWriter``, from random weights in
Hugging Face layout, as llama.cpp's converter writes them: Llama q/k rows reordered
(``mora_jax.gguf.weights.permute_rows`` is checked against an explicit index formula in test_gguf.py),
2-D weights quantized with ``gguf.quants.quantize`` (K-quants: random blocks with sane scales, since
``gguf`` cannot quantize to them), norms and biases float32, and a real tokenizer trained on a few
sentences: byte-level BPE (``tokenizers``) or SentencePiece BPE (``sentencepiece``).

Shared by test_gguf.py and test_get_model.py (imported as a plain module: tests/ is on sys.path).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

CORPUS = ["the cat sat on the mat", "a dog ran in the park", "what is two plus three", "the answer is five",
          "tokenizers split text into pieces", "models read token ids", "user assistant system 12 345"] * 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
          "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
INST = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
# Byte offsets of the float16 scale fields in one block of each K-quant (the rest may be random).
_K_SCALES = {"Q2_K": (80, 84), "Q3_K": (108, 110), "Q4_K": (0, 4), "Q5_K": (0, 4), "Q6_K": (208, 210)}


@dataclasses.dataclass
class Spec:
    """What to write: ``arch`` "llama" or "qwen2"; ``name`` (llama.cpp marks Mistral only by name);
    ``qtype`` of the 2-D weights; ``tokenizer`` "gpt2" (with ``pre``) or "llama" (SentencePiece)."""

    arch: str = "llama"
    name: str = "tiny"
    qtype: str = "F32"
    tied: bool = True
    tokenizer: str = "gpt2"
    pre: str = "smollm"
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    context: int = 128
    seed: int = 0
    rope_freqs: np.ndarray | None = None


def gpt2_vocab(pre_split: bool = True):
    """``(tokens, token types, merges, chat template)`` of a byte-level BPE trained on :data:`CORPUS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tokens = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, [3 if t in SPECIALS else 1 for t in tokens], merges


def spm_vocab(directory: pathlib.Path):
    """``(tokens, token types, scores)`` of a SentencePiece BPE model trained on :data:`CORPUS` (and the
    model file, for encoding with sentencepiece itself)."""
    import sentencepiece as spm

    prefix = str(directory / "spm")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=300, model_type="bpe",
                                   byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
                                   hard_vocab_limit=False, num_threads=1, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, split_digits=True)  # as Llama's
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    kind = lambda i: 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1
    n = sp.get_piece_size()
    return [sp.id_to_piece(i) for i in range(n)], [kind(i) for i in range(n)], [sp.get_score(i) for i in range(n)], sp


def hf_weights(spec: Spec, vocab: int) -> dict[str, np.ndarray]:
    """Random weights by Hugging Face name: projections and embeddings normal(0, 0.1), norms uniform(0.5, 1.5)."""
    rng = np.random.default_rng(spec.seed)
    head_dim = spec.hidden // spec.heads
    shapes = {"model.embed_tokens.weight": (vocab, spec.hidden), "model.norm.weight": (spec.hidden,)}
    if not spec.tied:
        shapes["lm_head.weight"] = (vocab, spec.hidden)
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (spec.hidden,), p + "post_attention_layernorm.weight": (spec.hidden,),
                   p + "self_attn.q_proj.weight": (spec.heads * head_dim, spec.hidden),
                   p + "self_attn.k_proj.weight": (spec.kv_heads * head_dim, spec.hidden),
                   p + "self_attn.v_proj.weight": (spec.kv_heads * head_dim, spec.hidden),
                   p + "self_attn.o_proj.weight": (spec.hidden, spec.heads * head_dim),
                   p + "mlp.gate_proj.weight": (spec.intermediate, spec.hidden),
                   p + "mlp.up_proj.weight": (spec.intermediate, spec.hidden),
                   p + "mlp.down_proj.weight": (spec.hidden, spec.intermediate)}
        if spec.arch == "qwen2":
            shapes |= {p + f"self_attn.{x}_proj.bias": (shapes[p + f"self_attn.{x}_proj.weight"][0],) for x in "qkv"}
    return {name: (rng.uniform(0.5, 1.5, shape) if "norm" in name else rng.normal(0, 0.1, shape)).astype(np.float32)
            for name, shape in shapes.items()}


def _gguf_name(hf: str) -> str:
    from mora_jax.gguf.weights import GLOBAL_TENSORS, LAYER_TENSORS

    module, leaf = hf.rsplit(".", 1)
    for gguf_name, hf_name in GLOBAL_TENSORS.items():
        if module == hf_name:
            return f"{gguf_name}.{leaf}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{next(g for g, h in LAYER_TENSORS.items() if h == rest)}.{leaf}"


def _encode(w: np.ndarray, qtype: str, rng):
    """``(stored array, its dtype for the writer, the float32 values a reader recovers)``."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize

    if qtype == "F32" or w.ndim == 1:
        return w, None, w
    if qtype == "F16":
        return w.astype(np.float16), None, w.astype(np.float16).astype(np.float32)
    t = Q[qtype]
    if qtype in _K_SCALES:  # random blocks, every scale 2**-8
        raw = rng.integers(0, 256, quant_shape_to_byte_shape(w.shape, t), dtype=np.uint8)
        blocks = raw.reshape(raw.shape[0], -1, GGML_QUANT_SIZES[t][1])
        a, b = _K_SCALES[qtype]
        blocks[..., a:b] = np.full((b - a) // 2, 2.0**-8, np.float16).view(np.uint8)
    else:
        raw = quantize(w, t)
    return raw, t, dequantize(raw, t)


def write(path: str | pathlib.Path, spec: Spec | None = None) -> dict:
    """Write the GGUF file ``path``; returns ``{"weights": HF name -> float32 values as stored (after
    quantization), "tokens": ..., "sp": the SentencePiece processor or None}``."""
    import gguf

    from mora_jax.gguf.weights import permute_rows

    path, spec = pathlib.Path(path), spec or Spec()
    rng = np.random.default_rng(spec.seed + 1)
    w = gguf.GGUFWriter(path, spec.arch)
    w.add_name(spec.name)
    w.add_block_count(spec.layers)
    w.add_context_length(spec.context)
    w.add_embedding_length(spec.hidden)
    w.add_feed_forward_length(spec.intermediate)
    w.add_head_count(spec.heads)
    w.add_head_count_kv(spec.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0 if spec.arch == "llama" else 1e6)
    w.add_rope_dimension_count(spec.hidden // spec.heads)
    w.add_file_type(0)
    sp = None
    if spec.tokenizer == "gpt2":
        tokens, types, merges = gpt2_vocab()
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(spec.pre)
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
    else:
        tokens, types, scores, sp = spm_vocab(path.parent)
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_chat_template(INST)
    w.add_token_list(tokens)
    w.add_token_types(types)
    recovered = {}
    for name, value in hf_weights(spec, len(tokens)).items():
        stored, qtype, recovered[name] = _encode(value, spec.qtype, rng)
        if spec.arch == "llama" and (".q_proj." in name or ".k_proj." in name):  # as llama.cpp's converter
            stored = permute_rows(stored, spec.heads if ".q_proj." in name else spec.kv_heads)
        w.add_tensor(_gguf_name(name), stored, raw_dtype=qtype)
    if spec.rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", spec.rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"weights": recovered, "tokens": tokens, "sp": sp}

"""Tiny random Hugging Face checkpoints of each supported family, built with ``transformers``' own
config classes and ``save_pretrained`` (no downloads). Every weight is random: projections, biases
and embeddings normal(0, 0.1), norms uniform(0.5, 1.5), so a misplaced bias or norm shows.

Shared by test_families.py and test_generate.py (imported as a plain module: tests/ is on sys.path).
"""

from __future__ import annotations

import functools
import pathlib
import tempfile

import numpy as np

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, bos_token_id=1, eos_token_id=2, attn_implementation="eager")

# name -> (transformers config class name, kwargs): every family and every rope scaling kind.
FAMILIES = {
    "llama3": ("LlamaConfig", dict(
        head_dim=16, rope_theta=500000.0, max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama-linear-bias": ("LlamaConfig", dict(
        max_position_embeddings=64, rope_scaling={"rope_type": "linear", "factor": 4.0}, attention_bias=True,
        mlp_bias=True)),
    "llama-dynamic": ("LlamaConfig", dict(max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=5, head_dim=16, max_position_embeddings=64)),
    "qwen2": ("Qwen2Config", dict(rope_theta=1e6, tie_word_embeddings=True, max_position_embeddings=64)),
}
# The three families of the issue (one checkpoint each) for the slower tests.
MAIN = ("llama3", "mistral", "qwen2")


def hf_config(name: str, **overrides):
    import transformers

    cls, kwargs = FAMILIES[name]
    return getattr(transformers, cls)(**{**_COMMON, **kwargs, **overrides})


def randomize(torch_model, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in torch_model.named_parameters():
            if "norm" in pname:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return torch_model


def torch_model(name: str, seed: int = 0, **overrides):
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(hf_config(name, **overrides))
    return randomize(model, seed).eval()


@functools.lru_cache(maxsize=None)
def checkpoint(name: str, seed: int = 0) -> pathlib.Path:
    """A saved random checkpoint of family ``name`` (cached for the session)."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix=f"tiny-{name}-"))
    torch_model(name, seed).save_pretrained(directory)
    return directory


def ids(shape=(2, 16), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, VOCAB, shape)


def relative_error(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours) - np.asarray(theirs))) / np.max(np.abs(np.asarray(theirs))))


# ---- A tiny tokenizer.json in the Llama 3 layout (fits the tiny models' 128-token vocabulary) ----------
SPECIAL_TOKENS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>"]
# The chat template of Meta-Llama-3-8B-Instruct.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CORPUS = [
    "the cat sat on the mat", "a dog ran in the park", "what is two plus three", "the answer is five",
    "tokenizers split text into pieces", "models read token ids", "user assistant system",
] * 3


def write_tokenizer(directory, vocab_size: int = 120, chat: bool = True, corpus=CORPUS) -> pathlib.Path:
    """``tokenizer.json`` (Metaspace BPE, BOS added by its post-processor, as Llama's) and
    ``tokenizer_config.json`` (special tokens, the Llama 3 chat template) in ``directory``."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|end_of_text|>", "model_max_length": 64}
    if chat:
        config["chat_template"] = LLAMA3_CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory

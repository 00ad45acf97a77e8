"""GGUF files (llama.cpp's format) in, without torch: ``weights`` reads a Llama / Mistral / Qwen2
file into this project's parameters and converts it to a Hugging Face directory; ``tokenizer``
turns its BPE or SentencePiece vocabulary into a ``tokenizer.json``."""

from mora_jax.gguf.weights import convert_gguf, load_gguf

__all__ = ["convert_gguf", "load_gguf"]

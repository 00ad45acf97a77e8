"""Hugging Face interoperability: checkpoints (``config.json`` + safetensors) and PEFT adapter files.

Modules, bottom up: ``files`` (the safetensors reader/writer, atomic writes, the HF-name <-> Flax-path
mapping), ``peft_files`` (the PEFT adapter format: names, safe reading, supported options),
``peft`` (PEFT files <-> this project's adapter trees), ``checkpoints`` (LLaMA-family checkpoints
and their configs), ``merge`` (an adapter folded into its base, written as a Hugging Face directory).
"""

from mora_jax.hf.checkpoints import load_llama, params_to_hf_tensors, read_config, save_llama
from mora_jax.hf.merge import merge_adapter_dir, save_merged
from mora_jax.hf.peft import load_adapter, save_adapter
from mora_jax.hf.peft_files import AdapterFormatError

__all__ = ["AdapterFormatError", "load_adapter", "load_llama", "merge_adapter_dir", "params_to_hf_tensors",
           "read_config", "save_adapter", "save_llama", "save_merged"]

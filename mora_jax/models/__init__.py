"""Model definitions (Flax linen): the LLaMA family (Llama 1–3.x, Mistral, Qwen2 / 2.5)."""

from mora_jax.models.config import ARCHITECTURES, LLAMA_CONFIGS, MODEL_TYPES, REMAT_POLICIES, LlamaConfig
from mora_jax.models.llama import KVCache, LlamaForCausalLM, LlamaModel, abstract_params, init_kv_cache, init_params
from mora_jax.models.params import count_params, stack_layers, unstack_layers
from mora_jax.models.rope import ROPE_TYPES, RopeScaling

__all__ = [
    "ARCHITECTURES",
    "LLAMA_CONFIGS",
    "MODEL_TYPES",
    "REMAT_POLICIES",
    "ROPE_TYPES",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "RopeScaling",
    "abstract_params",
    "count_params",
    "init_kv_cache",
    "init_params",
    "stack_layers",
    "unstack_layers",
]

"""Model definitions (Flax linen)."""

from mora_jax.models.llama import (
    LLAMA_CONFIGS,
    REMAT_POLICIES,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    abstract_params,
    count_params,
    init_params,
    stack_layers,
    unstack_layers,
)

__all__ = [
    "LLAMA_CONFIGS",
    "REMAT_POLICIES",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "abstract_params",
    "count_params",
    "init_params",
    "stack_layers",
    "unstack_layers",
]

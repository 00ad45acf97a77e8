"""mora-jax: MoRA (high-rank parameter-efficient fine-tuning) for JAX/Flax.

Core API (docs/api.md):
  rank_hat, apply_mora, delta_weight                 exact operators (pure jax.numpy)
  MoRAConfig, LoRAConfig, FullConfig                 method configs (frozen dataclasses, module methods)
  init_adapters, apply_model, merge, unmerge         adapters as parameter-pytree transforms
  split, combine, partition, unpartition, masked     trainable-only training
  generate                                           KV-cache text generation (module mora_jax.generate)

Modules: models (LLaMA family), hf (Hugging Face checkpoints and PEFT adapter files), mesh,
sharding, distributed, training (the pure step), steps (the compiled steps), assembly (a run's
pieces from its config), remora, schedules, run_config (the config layer), loop, metrics, logs,
checkpoint, data, recipes, cli, nnx (flax.nnx models), plan (the TPU planner). Not imported by any
of them: bench (benchmarks), experiments (UUID job, pretraining comparison).
"""

from mora_jax.adapters import (
    LoRAAdapter,
    MoRAAdapter,
    combine,
    count_params,
    dense_layout,
    init_adapters,
    is_adapter,
    merge,
    split,
    summary,
    trainable_patterns,
    unmerge,
)
from mora_jax.generate import generate
from mora_jax.intercept import apply_model
from mora_jax.methods import LLAMA_FULLY_TRAINED, LLAMA_TARGETS, FullConfig, LoRAConfig, MoRAConfig, make_config
from mora_jax.ops import MORA_TYPES
from mora_jax.models import LLAMA_CONFIGS, LlamaConfig, LlamaForCausalLM
from mora_jax.ops import apply_lora, apply_mora, delta_weight, lora_delta_weight, rank_hat
from mora_jax.optim import masked, param_labels, partition, unpartition

__version__ = "0.1.0"

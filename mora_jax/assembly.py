"""One assembly of a run from its :class:`~mora_jax.run_config.RunConfig`.

Every consumer of a run config takes its pieces from here, so a run, its TPU plan and its
benchmark are built the same way:

* :func:`model_config`: the ``LlamaConfig`` (a Hugging Face directory's ``config.json`` or a preset,
  with the config's dtypes, remat policy, scan, attention and overrides), checked against the run;
* :func:`load_params`: the base weights (the checkpoint's or GGUF file's, or a preset initialised from
  the seed), the kernels ``model.quantize`` names quantized;
* :func:`make_mesh`: the device mesh, checked against the batch size and the process count;
* :func:`scan_layout`: the adapters' layout for a model that scans over its layers;
* :func:`initial_state`: the state a run starts from (frozen base, fresh adapters, optimizer states);
* :func:`build_steps`: the compiled train / eval / merge steps (:mod:`mora_jax.steps`).

:func:`assemble` puts them together (everything but the weights). The recipes
(``train/pretrain.py``, ``train/finetune.py``), the loop, the TPU planner and the benchmark use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from mora_jax import adapters as adapters_lib
from mora_jax import mesh as mesh_lib
from mora_jax import pissa, sharding, training
from mora_jax import steps as steps_lib
from mora_jax.errors import ConfigError
from mora_jax.gguf import weights as gguf_weights
from mora_jax.hf.checkpoints import load_llama, read_config
from mora_jax.methods import PiSSAConfig
from mora_jax.models.config import LlamaConfig
from mora_jax.models.llama import LlamaForCausalLM, abstract_params, init_params
from mora_jax.models.params import stack_layers
from mora_jax.quant import residual
from mora_jax.quant.transform import quantize
from mora_jax.run_config import RunConfig


def _options(config: RunConfig) -> dict:
    m = config.model
    return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy, scan_layers=m.scan_layers,
                attention=m.attention, **dict(m.overrides))


def architecture(config: RunConfig) -> LlamaConfig:
    """The ``LlamaConfig`` of ``config.model``: a Hugging Face directory's ``config.json``, a GGUF file's
    metadata or the preset (no weights are read)."""
    m = config.model
    if _is_gguf(config):
        return gguf_weights.read_config(gguf_weights.GGUFFile(m.hf_path), **_options(config))
    return read_config(m.hf_path, **_options(config)) if m.hf_path else m.preset_config()


def model_config(config: RunConfig) -> LlamaConfig:
    """:func:`architecture`, checked against ``train.seq_len``."""
    llama_config = architecture(config)
    config.model.check_seq_len(config.train.seq_len, llama_config.max_position_embeddings)
    return llama_config


def check_vocab(config: RunConfig, llama_config: LlamaConfig, vocab_size: int) -> None:
    """A preset's vocabulary must cover the tokenizer's ``vocab_size`` tokens (a checkpoint's own
    tokenizer is checked against its ``config.json`` by the tokenizer)."""
    if not config.model.hf_path and llama_config.vocab_size < vocab_size:
        raise ConfigError(f"the tokenizer has {vocab_size} tokens but model preset {config.model.preset!r} only "
                          f"{llama_config.vocab_size}: use a matching tokenizer, or "
                          f"--config.model.overrides.vocab_size={vocab_size} (or more)")


def _is_gguf(config: RunConfig) -> bool:
    return config.model.hf_path.endswith(".gguf")


def load_params(config: RunConfig, llama_config: LlamaConfig, *, shardings=None):
    """The base weights: ``model.hf_path``'s (read tensor by tensor, placed by ``shardings``) or the
    preset initialised from ``config.seed``; the kernels ``model.quantize`` names quantized."""
    if _is_gguf(config):  # format gguf: the projections' Q8_0/Q4_0/Q4_1 blocks as stored (not placed by shardings)
        q = config.model.quantize
        options = {k: v for k, v in _options(config).items() if k not in ("param_dtype", "scan_layers")}
        _, params = gguf_weights.load_gguf(config.model.hf_path, param_dtype=config.model.param_dtype,
                                           keep_quantized=q.format == "gguf", quantized_targets=q.targets, **options)
        if config.model.scan_layers:
            params = stack_layers(params, llama_config.num_hidden_layers)
        return quantize(params, config.model.quantize)
    if config.model.hf_path:
        _, params = load_llama(config.model.hf_path, dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                               scan_layers=config.model.scan_layers, shardings=shardings,
                               config_overrides={k: v for k, v in _options(config).items()
                                                 if k not in ("dtype", "param_dtype", "scan_layers")})
        return quantize(params, config.model.quantize)
    return quantize(init_params(llama_config, jax.random.key(config.seed)), config.model.quantize)


def make_mesh(config: RunConfig, devices: Sequence | None = None) -> Mesh:
    """The device mesh of ``config.mesh`` over ``devices`` (default: all), checked against the
    batch size and the number of processes the devices belong to."""
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    shards = 1
    for axis in sharding.batch_axes(mesh):
        shards *= mesh.shape[axis]
    hosts = len({d.process_index for d in mesh.devices.flat})
    config.train.check_data_parallel(shards, hosts)
    return mesh


def scan_layout(model) -> Any:
    """The adapters' layout for a model that scans over its layers (None for an unrolled one)."""
    if not model.config.scan_layers:
        return None
    return adapters_lib.dense_layout(model, jnp.zeros((1, 8), jnp.int32))


def initial_state(params, config: RunConfig, layout=None) -> training.TrainState:
    """The state a run starts from: ``params`` (the kernels ``model.quantize`` names quantized) frozen
    or trained as ``config.adapter`` says, fresh
    adapters (ReMoRA: of the cycle's first type; PiSSA: from the kernels' SVD, the kernels replaced
    by their residuals), room beside quantized kernels for the merges they keep
    (``model.quantize.merge``) and optimizer states."""
    rng = jax.random.key(config.seed)
    params = quantize(params, config.model.quantize)  # (kept as they are when load_params quantized them)
    adapter_config = config.initial_adapter_config()
    if isinstance(adapter_config, PiSSAConfig):  # the base becomes the SVD residual
        params, adapters = pissa.init(params, adapter_config, jax.random.fold_in(rng, 1), layout=layout)
    else:
        adapters = adapters_lib.init_adapters(params, adapter_config, jax.random.fold_in(rng, 1), layout=layout)
    if config.remora.every and config.model.quantize.keeps_merges(adapter_config):  # room for the run's merges
        params = residual.add_slots(params, adapters, type_cycle=config.remora.type_cycle,
                                    merges=residual.merges_in_run(config.train.steps, config.remora.every))
    return training.create_train_state(params, adapters, adapter_config, config.optim.optimizer(),
                                       jax.random.fold_in(rng, 2))


def uses_dropout(config: RunConfig) -> bool:
    """Whether the steps need a dropout rng (adapter dropout)."""
    return float(getattr(config.adapter, "dropout", 0.0)) > 0.0


def build_steps(config: RunConfig, model, mesh: Mesh | None = None, rules=None, **options) -> steps_lib.Steps:
    """The compiled steps of ``config``'s run of ``model`` (``options``: :func:`mora_jax.steps.build_steps`'s)."""
    return steps_lib.build_steps(model, config.optim.optimizer(), config.schedule(), config.step_config(), mesh=mesh,
                                 rules=rules, use_dropout=uses_dropout(config),
                                 reset_optimizer=config.remora.reset_optimizer, **options)


@dataclasses.dataclass(frozen=True)
class Assembly:
    """A run's pieces, everything but the weights (see :func:`assemble`)."""

    config: RunConfig
    model_config: LlamaConfig
    model: LlamaForCausalLM
    mesh: Mesh
    layout: Any
    steps: steps_lib.Steps

    def initial_state(self, params) -> training.TrainState:
        return initial_state(params, self.config, self.layout)

    def abstract_state(self) -> training.TrainState:
        """The state a run starts from, as shapes (``jax.eval_shape``: no weights are read)."""
        return jax.eval_shape(self.initial_state, abstract_params(self.model_config))

    def load_params(self, shardings=None):
        return load_params(self.config, self.model_config, shardings=shardings)


def assemble(config: RunConfig, *, devices: Sequence | None = None, rules=None, **step_options) -> Assembly:
    """The model config, model, mesh, layout and compiled steps of ``config``'s run; settings that
    do not fit the model or the devices are a :class:`~mora_jax.errors.ConfigError` before anything
    is read or compiled."""
    llama_config = model_config(config)
    mesh = make_mesh(config, devices)
    model = LlamaForCausalLM(llama_config)
    return Assembly(config, llama_config, model, mesh, scan_layout(model),
                    build_steps(config, model, mesh, rules, **step_options))


__all__ = ["Assembly", "architecture", "assemble", "build_steps", "check_vocab", "initial_state", "load_params", "make_mesh", "model_config",
           "scan_layout", "uses_dropout"]

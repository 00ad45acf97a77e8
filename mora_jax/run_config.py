"""The one config layer: a run's settings as frozen dataclasses, one per section of ``configs/*.py``.

A config file is an ``ml_collections.ConfigDict`` (so every field can be overridden from the
command line, ``--config.optim.lr=1e-3``); :meth:`RunConfig.from_dict` turns it into a
:class:`RunConfig` section by section, each section onto the dataclass with the same field names:

=================  =========================================================================
config section     dataclass
=================  =========================================================================
``model``          :class:`ModelConfig`
``adapter``        :class:`~mora_jax.methods.MoRAConfig` / ``LoRAConfig`` / ``FullConfig``
                   (by ``method``; the section holds the union of their fields)
``remora``         :class:`~mora_jax.remora.RemoraConfig`
``optim``          :class:`OptimConfig`
``train``          :class:`TrainConfig`
``data``           :class:`DataConfig`
``mesh``           :class:`~mora_jax.mesh.MeshConfig` (the section's keys are the axis names)
``checkpoint``     :class:`CheckpointConfig`
``export``         :class:`ExportConfig`
=================  =========================================================================

Nothing is held twice: the schedule's length is ``train.steps``, its restart period is
``remora.every`` (:meth:`RunConfig.schedule`), and the train step's static settings come from
``train`` and ``optim`` (:meth:`RunConfig.step_config`). Every numeric setting is checked against
its meaning when the dataclass is built, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

from mora_jax import health, schedules, training
from mora_jax import optim as optim_lib
from mora_jax.errors import ConfigError
from mora_jax.mesh import MeshConfig
from mora_jax.methods import METHODS, AdapterConfig, MoRAConfig, config_class
from mora_jax.models.attention import check_implementation as check_attention
from mora_jax.models.config import LLAMA_CONFIGS, REMAT_POLICIES, SUPPORTED_DTYPES, LlamaConfig
from mora_jax.quant.config import QuantConfig
from mora_jax.remora import RemoraConfig

HEALTH_DEFAULTS = health.HealthConfig()


def _positive_int(section: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{section}.{name} must be a positive integer, got {value!r}")


def _non_negative_int(section: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{section}.{name} must be an integer >= 0, got {value!r}")


def _dtype_name(value) -> str | None:
    try:
        return jnp.dtype(value).name
    except TypeError:
        return None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Attributes:
      preset: a ``mora_jax.models.config.LLAMA_CONFIGS`` name, used when ``hf_path`` is empty.
      hf_path: a Hugging Face LLaMA directory to start from, or a GGUF file (``.gguf``; its
        tokenizer comes from ``data.tokenizer``, e.g. the directory ``mora-jax convert-gguf`` writes).
      dtype / param_dtype: compute dtype, and storage dtype of the frozen weights.
      remat_policy: activation checkpointing ("none", "full", "projections", "dots_saveable", ...).
      scan_layers: ``nn.scan`` over the layers.
      attention: the attention implementation, "auto" (by platform: the Pallas TPU kernel on TPU,
        cuDNN on GPU where it applies, the einsum on CPU), "xla", "flash" or "cudnn"
        (:mod:`mora_jax.models.attention`).
      overrides: other ``LlamaConfig`` fields for a preset (e.g. ``vocab_size``); ``None`` values
        (the placeholders ``configs/base.py`` declares so that the command line can set them) are dropped.
      quantize: the frozen kernels stored quantized (:class:`~mora_jax.quant.config.QuantConfig`:
        format, block_size, scale_dtype, targets; a mapping is converted).
    """

    preset: str = "tiny"
    hf_path: str = ""
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    scan_layers: bool = False
    attention: str = "auto"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    quantize: QuantConfig = QuantConfig()

    def __post_init__(self):
        object.__setattr__(self, "quantize", QuantConfig.from_value(self.quantize))
        check_attention(self.attention, "model.attention")
        object.__setattr__(self, "overrides", {k: v for k, v in dict(self.overrides or {}).items() if v is not None})
        for name in ("dtype", "param_dtype"):
            if _dtype_name(getattr(self, name)) not in SUPPORTED_DTYPES:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}: choose one of {SUPPORTED_DTYPES}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"model.remat_policy={self.remat_policy!r}: choose one of {REMAT_POLICIES}")
        fields = {f.name for f in dataclasses.fields(LlamaConfig)}
        unknown = sorted(set(self.overrides) - fields)
        if unknown:
            raise ConfigError(f"model.overrides has no field(s) {unknown}: they are LlamaConfig fields "
                              f"(mora_jax.models.config), e.g. {sorted(fields)[:12]}")
        if self.quantize.format == "gguf" and not self.hf_path.endswith(".gguf"):
            raise ConfigError("model.quantize.format='gguf' keeps a GGUF file's blocks: set model.hf_path to the .gguf "
                              "file, or choose int8, int4 or nf4 to quantize other weights")
        if not self.hf_path:
            if self.preset not in LLAMA_CONFIGS:
                raise ConfigError(f"model.preset={self.preset!r}: choose one of {sorted(LLAMA_CONFIGS)}, "
                                  "or give a Hugging Face directory as model.hf_path")
            try:
                self.preset_config()
            except (ValueError, TypeError) as e:
                raise ConfigError(f"model.overrides of preset {self.preset!r}: {e}") from None

    def preset_config(self) -> LlamaConfig:
        """The architecture of ``preset`` with this section's dtypes, options and overrides."""
        return LLAMA_CONFIGS[self.preset].replace(dtype=self.dtype, param_dtype=self.param_dtype,
                                                  remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                                                  attention=self.attention, **dict(self.overrides))

    def check_seq_len(self, seq_len: int, max_position_embeddings: int) -> None:
        """``train.seq_len`` must fit the model's context (``max_position_embeddings``)."""
        if seq_len > max_position_embeddings:
            model = f"model.hf_path {self.hf_path}" if self.hf_path else f"model preset {self.preset!r}"
            raise ConfigError(
                f"train.seq_len={seq_len} is longer than the context of {model} (max_position_embeddings="
                f"{max_position_embeddings}): use --config.train.seq_len={max_position_embeddings} or less, or "
                "raise --config.model.overrides.max_position_embeddings if the model can take longer sequences")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its learning-rate schedule.

    Attributes:
      name: an optax optimizer ("adamw", "lion", "sgd", ...); ``kwargs`` its arguments besides the
        learning rate for optimizers other than AdamW.
      lr: peak learning rate; warmup_steps: linear warm-up from 0; decay: "cosine", "linear" or
        "constant"; min_lr_ratio: decay floor as a fraction of lr.
      restart_warmup / restart_flavour: the ReMoRA learning-rate restart after each merge
        (:mod:`mora_jax.schedules`).
      weight_decay, b1, b2, eps: AdamW's.
      clip_norm: global gradient-norm clipping (0 = off).
      lr_in_state: the peak learning rate is an array in the optimizer state instead of a constant
        of the compiled step (the schedule runs at peak 1 and the updates are scaled by it): runs
        that differ only in ``lr`` share one compiled program, e.g. a learning-rate sweep
        (``mora_jax.optim.from_name``'s ``peak_lr``).
    """

    name: str = "adamw"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    lr: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.0
    restart_warmup: int = 50
    restart_flavour: str = "reference"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    lr_in_state: bool = False

    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"optim.lr must be a finite number > 0, got {self.lr!r} "
                              "(a negative learning rate trains uphill)")
        if not (isinstance(self.clip_norm, (int, float)) and self.clip_norm >= 0):
            raise ConfigError(f"optim.clip_norm must be >= 0 (0 = no clipping), got {self.clip_norm!r}")
        _non_negative_int("optim", warmup_steps=self.warmup_steps, restart_warmup=self.restart_warmup)
        if self.decay not in schedules.DECAYS:
            raise ConfigError(f"optim.decay={self.decay!r}: choose one of {schedules.DECAYS}")
        if self.restart_flavour not in schedules.FLAVOURS:
            raise ConfigError(f"optim.restart_flavour={self.restart_flavour!r}: choose one of {schedules.FLAVOURS}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise ConfigError(f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1!r}, {self.b2!r}")
        if not self.eps > 0 or self.weight_decay < 0:
            raise ConfigError(f"optim.eps must be > 0 and optim.weight_decay >= 0, got {self.eps!r}, {self.weight_decay!r}")
        if not optim_lib.is_optimizer_name(self.name):
            raise ConfigError(f"optim.name={self.name!r} is not an optax optimizer: use e.g. 'adamw', 'lion', 'sgd', "
                              "'adafactor' (any optax function that takes a learning_rate)")
        self.optimizer()  # optim.kwargs it does not take are an error now, not at the first step

    def optimizer(self):
        """The optax optimizer (learning rate injected; the loop sets it every step)."""
        if self.name == "adamw":
            kwargs = dict(b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)
        else:
            kwargs = dict(self.kwargs)
        if self.lr_in_state:
            return optim_lib.from_name(self.name, 1.0, peak_lr=self.lr, **kwargs)
        return optim_lib.from_name(self.name, self.lr, **kwargs)

    def schedule_shape(self) -> "OptimConfig":
        """The settings the schedule is made from: with ``lr_in_state`` its peak is 1 (the optimizer
        scales by ``lr``)."""
        return dataclasses.replace(self, lr=1.0) if self.lr_in_state else self


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Attributes:
      steps: optimizer steps (also the schedule's length).
      batch_size: global batch in sequences, split over processes, data-parallel shards and
        ``grad_accum`` micro-batches.
      seq_len: tokens per sequence.
      log_every / eval_every: steps between metric lines / evaluations (0 = only at the end).
      eval_batches: batches per evaluation (0 = the whole eval split).
      progress: show a progress bar.
      z_loss: z-loss coefficient on the log-partition (0 = off).
      loss_chunk: compute the loss this many positions at a time, never holding the batch's whole
        float32 logits (:mod:`mora_jax.chunked_loss`; a divisor of ``seq_len``; 0 = off).
      collapse_steps / on_collapse / spike_window / spike_zscore: what counts as an unhealthy run
        (zero gradients or a loss pinned at ln(vocab) for that many steps; a loss spike against the
        recent ones) and what a collapse does: :class:`mora_jax.health.HealthConfig`.
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    log_every: int = 10
    eval_every: int = 0
    eval_batches: int = 20
    progress: bool = True
    z_loss: float = 0.0
    loss_chunk: int = 0
    collapse_steps: int = HEALTH_DEFAULTS.collapse_steps
    on_collapse: str = HEALTH_DEFAULTS.on_collapse
    spike_window: int = HEALTH_DEFAULTS.spike_window
    spike_zscore: float = HEALTH_DEFAULTS.spike_zscore

    def __post_init__(self):
        self.health()  # checks its fields
        _positive_int("train", steps=self.steps, batch_size=self.batch_size, grad_accum=self.grad_accum,
                      seq_len=self.seq_len, log_every=self.log_every)
        _non_negative_int("train", eval_every=self.eval_every, eval_batches=self.eval_batches)
        if self.batch_size % self.grad_accum:
            valid = [b for b in range(self.grad_accum, 4 * self.grad_accum + 1, self.grad_accum)]
            raise ConfigError(f"train.batch_size={self.batch_size} is not divisible by train.grad_accum="
                              f"{self.grad_accum}: use a batch size that is a multiple of it (e.g. {valid})")
        if self.z_loss < 0:
            raise ConfigError(f"train.z_loss must be >= 0, got {self.z_loss!r}")
        _non_negative_int("train", loss_chunk=self.loss_chunk)
        if self.loss_chunk and self.seq_len % self.loss_chunk:
            divisors = [d for d in (256, 512, 1024, 2048) if self.seq_len % d == 0 and d < self.seq_len]
            raise ConfigError(f"train.loss_chunk={self.loss_chunk} does not divide train.seq_len={self.seq_len}: "
                              f"use a divisor of it (e.g. {divisors or [1]}), or 0 for the plain loss")

    def health(self) -> health.HealthConfig:
        """What the loop's :class:`mora_jax.health.HealthMonitor` watches for."""
        return health.HealthConfig(collapse_steps=self.collapse_steps, on_collapse=self.on_collapse,
                                   spike_window=self.spike_window, spike_zscore=self.spike_zscore)

    def check_data_parallel(self, shards: int, processes: int = 1) -> None:
        """Raise unless every micro-batch splits evenly over ``shards`` data-parallel shards held
        by ``processes`` processes."""
        unit = self.grad_accum * shards
        if self.batch_size % unit or self.batch_size % processes:
            raise ConfigError(
                f"train.batch_size={self.batch_size} does not split over {self.grad_accum} micro-batches × "
                f"{shards} data-parallel shards ({processes} processes): use a multiple of {unit} "
                f"(e.g. {unit}, {2 * unit}, {4 * unit}), or change train.grad_accum or the mesh")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Attributes:
      source / eval_source: "c4", or local .txt/.jsonl/.parquet files (a path or glob); empty
        eval_source = no evaluation.
      tokenizer: a SentencePiece .model, a Hugging Face tokenizer.json or a checkpoint directory;
        empty = the tokenizer of model.hf_path.
      chat_template: fine-tuning prompts as user turns of the tokenizer's chat template.
      accuracy_source: held-out fine-tuning records (the training format) scored by exact-match
        accuracy of generated answers ("#### N" / "The answer is: N") every train.eval_every steps
        and at the end; empty = off. accuracy_examples: how many of them (0 = all);
        accuracy_max_new_tokens: the generation budget per answer.
      text_field: the field holding the text in JSON/Parquet records (pretraining).
      overlong: "truncate" or "drop" too long documents/examples.
      format: fine-tuning records, "alpaca" (instruction/input/output) or "metamathqa" (query/response).
      prompt_template: fine-tuning: a str.format template of the prompt over the record's fields
        (e.g. "Question: {query}\nAnswer:"), the response following it directly; empty = the format's own.
      packing: pack several fine-tuning examples per row (attention stays within each).
      num_epochs: passes over the data (None = repeat forever).
      eval_split: the split of a Hub data set used for evaluation.
      on_bad_record: "error" (stop, naming the file and line) or "skip" (count it in the end-of-run
        report) for a record without its fields or a line that is not valid UTF-8 / JSON.
    """

    source: str = ""
    eval_source: str = ""
    tokenizer: str = ""
    chat_template: bool = False
    accuracy_source: str = ""
    accuracy_examples: int = 0
    accuracy_max_new_tokens: int = 256
    text_field: str = "text"
    overlong: str = "truncate"
    format: str = "alpaca"
    prompt_template: str = ""
    packing: bool = False
    num_epochs: int | None = None
    eval_split: str = "train"
    on_bad_record: str = "error"

    def __post_init__(self):
        _non_negative_int("data", accuracy_examples=self.accuracy_examples)
        _positive_int("data", accuracy_max_new_tokens=self.accuracy_max_new_tokens)
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_record={self.on_bad_record!r}: choose 'error' (stop at a bad record, "
                              "naming its file and line) or 'skip' (count and skip it)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Attributes:
      every: steps between orbax checkpoints (0 = none); keep: how many to keep.
      async_save: save in the background.
      mode: "resume" an existing run in the workdir, "new" (refuse if one exists) or "overwrite".
    """

    every: int = 500
    keep: int = 3
    async_save: bool = True
    mode: str = "resume"

    def __post_init__(self):
        _non_negative_int("checkpoint", every=self.every)
        _positive_int("checkpoint", keep=self.keep)
        if self.mode not in ("resume", "new", "overwrite"):
            raise ConfigError(f"checkpoint.mode={self.mode!r}: choose 'resume', 'new' or 'overwrite'")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Attributes: adapter: write ``export/adapter`` in PEFT format; merged: write ``export/merged``
    as a Hugging Face checkpoint."""

    adapter: bool = True
    merged: bool = False


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, section by section (see the module docstring).

    ``remora.every`` applies to adapters only: full fine-tuning has nothing to merge, so its merge
    period is 0 whatever the section says.
    """

    seed: int = 0
    workdir: str = "runs/default"
    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = MoRAConfig()
    remora: RemoraConfig = RemoraConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    export: ExportConfig = ExportConfig()

    @property
    def method(self) -> str:
        """The method's name (``"mora"``, ``"lora"``, ``"full"``): the adapter config's."""
        return self.adapter.method

    def __post_init__(self):
        if self.method == "full" and self.remora.every:
            object.__setattr__(self, "remora", dataclasses.replace(self.remora, every=0))
        if isinstance(self.adapter, MoRAConfig) and self.adapter.magnitude and self.export.adapter:
            raise ConfigError("adapter.magnitude=True (MoRA with a magnitude) has no PEFT adapter file format: set "
                              "export.adapter=False (export.merged=True writes the trained model)")
        if self.model.hf_path.endswith(".gguf") and not self.data.tokenizer:
            raise ConfigError(f"model.hf_path {self.model.hf_path} is a GGUF file: give data.tokenizer too (the "
                              "tokenizer.json of the directory `mora-jax convert-gguf FILE OUT_DIR` writes)")
        if self.remora.every:
            self.model.quantize.keeps_merges(self.adapter)  # merge='residual' with a method it cannot keep: one line
        if self.optim.warmup_steps > self.train.steps:
            raise ConfigError(f"optim.warmup_steps={self.optim.warmup_steps} is longer than the run "
                              f"(train.steps={self.train.steps})")

    @classmethod
    def from_dict(cls, config) -> "RunConfig":
        """A ``RunConfig`` from an ``ml_collections.ConfigDict`` (or a plain dict) whose sections
        have the dataclasses' field names; an unknown field is an error naming the valid ones."""
        try:
            return cls._from_dict(config)
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:  # raised by a section's own checks: still the config's fault
            raise ConfigError(str(e)) from None

    @classmethod
    def _from_dict(cls, config) -> "RunConfig":
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        sections = {"model": ModelConfig, "remora": RemoraConfig, "optim": OptimConfig, "train": TrainConfig,
                    "data": DataConfig, "checkpoint": CheckpointConfig, "export": ExportConfig}
        top = {f.name for f in dataclasses.fields(cls)} | {"method"}
        unknown = set(config) - top
        if unknown:
            raise ConfigError(f"config has no field(s) {sorted(unknown)}; valid: {sorted(top)}")
        kwargs: dict[str, Any] = {k: config[k] for k in ("seed", "workdir") if k in config}
        for name, section_cls in sections.items():
            if name in config:
                kwargs[name] = _section(section_cls, name, config[name])
        kwargs["adapter"] = adapter_config(config.get("method", cls.adapter.method), config.get("adapter", {}) or {})
        if "mesh" in config:
            mesh = dict(config["mesh"] or {})
            kwargs["mesh"] = MeshConfig(axis_names=tuple(mesh), axis_sizes=tuple(int(v) for v in mesh.values()))
        return cls(**kwargs)

    def schedule(self):
        """The learning-rate schedule: ``train.steps`` long, restarting every ``remora.every`` steps."""
        return schedules.make_schedule(self.optim.schedule_shape(), total_steps=self.train.steps,
                                       restart_every=self.remora.every)

    def step_config(self) -> training.StepConfig:
        """The train step's static settings."""
        return training.StepConfig(grad_accum=self.train.grad_accum, clip_norm=self.optim.clip_norm or None,
                                   z_loss=self.train.z_loss, loss_chunk=self.train.loss_chunk)

    def initial_adapter_config(self) -> AdapterConfig:
        """The adapter config the run starts with: with ReMoRA merges, MoRA starts at the first type
        of the cycle."""
        if isinstance(self.adapter, MoRAConfig) and self.remora.every:
            return dataclasses.replace(self.adapter, mora_type=self.remora.type_cycle[0])
        return self.adapter

    def to_dict(self) -> dict:
        """Plain JSON-able values (``run_config.json``)."""
        return _plain(self)


def _section(section_cls, name: str, values):
    values = dict(values or {})
    fields = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - fields
    if unknown:
        raise ConfigError(f"config.{name} has no field(s) {sorted(unknown)}; valid: {sorted(fields)}")
    if "type_cycle" in values:
        values["type_cycle"] = tuple(values["type_cycle"])
    return section_cls(**values)


def _patterns(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return tuple(value or ())


def adapter_config(method: str, section: Mapping[str, Any]) -> AdapterConfig:
    """The ``method``'s adapter config from an ``adapter`` section holding any of the three methods'
    fields (those the method does not have are ignored; unknown ones are an error). ``targets`` and
    ``unfreeze`` may be comma-separated strings."""
    cls = config_class(method)
    known = set().union(*({f.name for f in dataclasses.fields(c)} for c in METHODS.values()))
    unknown = set(section) - known
    if unknown:
        raise ConfigError(f"config.adapter has no field(s) {sorted(unknown)}; valid: {sorted(known)}")
    own = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in section.items() if k in own}
    for key in ("targets", "unfreeze"):
        if key in values:
            values[key] = _patterns(values[key])
    return cls(**values)


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        out = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if hasattr(obj, "method") and "method" not in out:
            out["method"] = obj.method
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(x) for x in obj]
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)


__all__ = ["CheckpointConfig", "DataConfig", "ExportConfig", "ModelConfig", "OptimConfig", "RunConfig",
           "TrainConfig", "adapter_config"]

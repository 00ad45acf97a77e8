"""From an ``ml_collections`` config to a run: C4 pretraining and instruction/math fine-tuning.

The entry points in ``train/`` are thin wrappers over :func:`pretrain` and :func:`finetune`; the
config files in ``configs/`` document every field. Both build the model (a preset, or a Hugging
Face checkpoint), the adapter method (``full`` / ``lora`` / ``mora``), the data pipeline, the
optional device mesh, and hand over to :func:`mora_jax.loop.run`; at the end they export the
adapter (PEFT format) and the merged model (Hugging Face format).
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax

from mora_jax import data as data_lib
from mora_jax import loop, remora, schedules, training
from mora_jax.config import make_config
from mora_jax.models.llama import LLAMA_CONFIGS, LlamaForCausalLM, init_params


def _patterns(value) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return tuple(value)


def build_model(config, vocab_size: int | None = None):
    """``(model, params)`` from ``config.model``: a Hugging Face directory (``hf_path``) or a preset
    initialised from ``config.seed``."""
    m = config.model
    overrides = {k: m[k] for k in ("dtype", "param_dtype", "remat_policy", "scan_layers") if k in m}
    if m.get("hf_path"):
        from mora_jax import hf

        return hf.load_llama(m.hf_path, dtype=overrides.pop("dtype", "float32"),
                             param_dtype=overrides.pop("param_dtype", None),
                             scan_layers=overrides.pop("scan_layers", False), config_overrides=overrides)
    if m.preset not in LLAMA_CONFIGS:
        raise ValueError(f"unknown model preset {m.preset!r}: choose one of {sorted(LLAMA_CONFIGS)} or set model.hf_path")
    model_config = LLAMA_CONFIGS[m.preset].replace(**overrides, **dict(m.get("overrides", {}) or {}))
    if vocab_size is not None and model_config.vocab_size < vocab_size:
        raise ValueError(f"the tokenizer has {vocab_size} tokens but model preset {m.preset!r} only "
                         f"{model_config.vocab_size}; use a matching tokenizer or --config.model.overrides.vocab_size")
    model = LlamaForCausalLM(model_config)
    return model, init_params(model_config, jax.random.key(config.seed))


def build_adapter_config(config):
    a = config.adapter
    common = dict(targets=_patterns(a.targets), unfreeze=_patterns(a.unfreeze))
    if config.method == "mora":
        return make_config("mora", r=a.r, mora_type=a.mora_type, dropout=a.dropout, **common)
    if config.method == "lora":
        return make_config("lora", r=a.r, alpha=a.alpha, rslora=a.rslora, dropout=a.dropout, **common)
    return make_config(config.method, **common)


def build_loop_config(config) -> loop.LoopConfig:
    o, t = config.optim, config.train
    remora_every = config.remora.every if config.method in ("mora", "lora") else 0
    return loop.LoopConfig(
        total_steps=t.steps, seed=config.seed, optimizer=o.get("name", "adamw"),
        optimizer_kwargs=_optimizer_kwargs(o),
        log_every=t.log_every, eval_every=t.eval_every, checkpoint_every=config.checkpoint.every,
        keep_checkpoints=config.checkpoint.keep, async_checkpoints=config.checkpoint.get("async_save", True),
        schedule=schedules.ScheduleConfig(
            peak_lr=o.lr, total_steps=t.steps, warmup_steps=o.warmup_steps, decay=o.decay,
            min_lr_ratio=o.min_lr_ratio, restart_every=remora_every, restart_warmup=o.restart_warmup,
            flavour=o.restart_flavour),
        remora=remora.RemoraConfig(every=remora_every, type_cycle=tuple(config.remora.type_cycle),
                                   reset_optimizer=config.remora.reset_optimizer),
        step=training.StepConfig(grad_accum=t.grad_accum, clip_norm=o.clip_norm or None),
        progress=t.get("progress", True),
    )


def _optimizer_kwargs(optim_config) -> dict:
    """AdamW's fields from config.optim, or ``optim.kwargs`` for any other optax optimizer."""
    name = optim_config.get("name", "adamw")
    if name == "adamw":
        return {k: optim_config[k] for k in ("b1", "b2", "eps", "weight_decay")}
    return dict(optim_config.get("kwargs", {}) or {})


def _tokenizer(config):
    path = config.data.tokenizer
    if not path:
        raise ValueError("config.data.tokenizer is empty: give a SentencePiece .model file "
                         "(train one with: python -m train.train_tokenizer --input corpus.txt --vocab-size 8000 --out tok)")
    return data_lib.Tokenizer(path)


def _mesh(config):
    """The device mesh from ``config.mesh`` when there is more than one device (None: the default device)."""
    if jax.device_count() == 1 or not config.get("mesh"):
        return None
    from mora_jax import sharding

    m = config.mesh
    return sharding.make_mesh(sharding.MeshConfig(axis_names=("data", "fsdp", "tensor"),
                                                  axis_sizes=(m.data, m.fsdp, m.tensor)))


def _export(config, model, result, adapter_config):
    from mora_jax import adapters as adapters_lib
    from mora_jax import hf

    if jax.process_index() != 0 or result.preempted:
        return
    workdir = pathlib.Path(config.workdir)
    params = result.state.params(jax.tree_util.tree_leaves(result.state.frozen)[0].dtype)
    adapters = result.state.adapters
    if config.export.adapter and adapters_lib.flatten(adapters):
        hf.save_adapter(workdir / "export" / "adapter", adapter_config_for_export(adapter_config, adapters), adapters,
                        base_model_name_or_path=config.model.get("hf_path", "") or "", overwrite=True)
    if config.export.merged:
        hf.save_llama(workdir / "export" / "merged", model, adapters_lib.merge(params, adapters), overwrite=True)


def adapter_config_for_export(adapter_config, adapters):
    """The config to write next to the adapters (after ReMoRA the current type may differ)."""
    from mora_jax.adapters import flatten

    first = next(iter(flatten(adapters).values()))
    if adapter_config.method == "mora" and first.mora_type != adapter_config.mora_type:
        return dataclasses.replace(adapter_config, mora_type=first.mora_type)
    return adapter_config


def _process_batch_size(config) -> int:
    global_batch = config.train.batch_size
    if global_batch % jax.process_count():
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {jax.process_count()} processes")
    return global_batch // jax.process_count()


def pretrain(config) -> loop.RunResult:
    """Causal-LM pretraining on C4 (or local text) with packing, per-process shards and resumable position."""
    tokenizer = _tokenizer(config)
    model, params = build_model(config, tokenizer.vocab_size)
    data_config = data_lib.PretrainDataConfig(
        seq_len=config.train.seq_len, batch_size=_process_batch_size(config), text_field=config.data.text_field,
        num_epochs=config.data.get("num_epochs", None), overlong=config.data.get("overlong", "truncate"))
    batches = data_lib.pretrain_batches(config.data.source, tokenizer, data_config,
                                        process_index=jax.process_index(), process_count=jax.process_count())
    eval_batches = None
    if config.data.get("eval_source"):
        eval_config = dataclasses.replace(data_config, num_epochs=1, split=config.data.get("eval_split", "train"))
        eval_batches = lambda: _take(data_lib.pretrain_batches(
            config.data.eval_source, tokenizer, eval_config, process_index=jax.process_index(),
            process_count=jax.process_count()), config.train.eval_batches)
    return _run(config, model, params, batches, eval_batches)


def finetune(config) -> loop.RunResult:
    """Prompt/response fine-tuning (Alpaca or MetaMathQA style) with loss on the response only."""
    tokenizer = _tokenizer(config)
    model, params = build_model(config, tokenizer.vocab_size)
    d = config.data
    factory = {"alpaca": data_lib.FinetuneDataConfig.alpaca, "metamathqa": data_lib.FinetuneDataConfig.metamathqa}
    if d.format not in factory:
        raise ValueError(f"unknown data.format {d.format!r}: choose one of {sorted(factory)}")
    data_config = factory[d.format](config.train.seq_len, _process_batch_size(config), packing=d.packing,
                                    num_epochs=d.num_epochs, seed=config.seed, overlong=d.overlong)
    batches = data_lib.finetune_batches(d.source, tokenizer, data_config,
                                        process_index=jax.process_index(), process_count=jax.process_count())
    eval_batches = None
    if d.get("eval_source"):
        eval_config = dataclasses.replace(data_config, num_epochs=1, shuffle=False)
        eval_batches = lambda: _take(data_lib.finetune_batches(
            d.eval_source, tokenizer, eval_config, process_index=jax.process_index(),
            process_count=jax.process_count()), config.train.eval_batches)
    return _run(config, model, params, batches, eval_batches)


def _take(iterator, n):
    for i, batch in enumerate(iterator):
        if n and i >= n:
            return
        yield batch


def _run(config, model, params, batches, eval_batches):
    adapter_config = build_adapter_config(config)
    loop_config = build_loop_config(config)
    layout = None
    if model.config.scan_layers:
        from mora_jax.adapters import dense_layout

        layout = dense_layout(model, jax.numpy.zeros((1, 8), jax.numpy.int32))
    result = loop.run(model, params, adapter_config, loop_config, train_batches=batches,
                      eval_batches=eval_batches, workdir=config.workdir, run_config=config.to_dict(),
                      layout=layout, mesh=_mesh(config),
                      checkpoint_mode=config.checkpoint.get("mode", "resume"),
                      frozen_source=config.model.get("hf_path", "") or f"preset:{config.model.get('preset')}")
    if hasattr(batches, "report") and jax.process_index() == 0:
        print(batches.report(), flush=True)
    _export(config, model, result, adapter_config)
    return result

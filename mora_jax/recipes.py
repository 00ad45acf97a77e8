"""From a config to a finished run: the one runner behind ``train/pretrain.py`` and ``train/finetune.py``.

:func:`run` reads the config (:class:`mora_jax.run_config.RunConfig`), assembles the run
(:mod:`mora_jax.assembly`: model, weights, mesh, steps), builds the data pipeline of the task
(``"pretrain"``: packed causal-LM text; ``"finetune"``: prompt/response records with the loss on
the response), hands over
to :func:`mora_jax.loop.run`, draws the loss curve, and exports the adapter (PEFT format) and the
merged model (Hugging Face format).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax

from mora_jax import accuracy, assembly, distributed, loop, metrics
from mora_jax import adapters as adapters_lib
from mora_jax import data as data_lib
from mora_jax.checkpoint import workdir_lock
from mora_jax.errors import ConfigError
from mora_jax.hf.merge import save_merged
from mora_jax.hf.peft import save_adapter
from mora_jax.quant.transform import dequantize_params
from mora_jax.run_config import RunConfig

TASKS = ("pretrain", "finetune")


def _tokenizer(config: RunConfig):
    """``data.tokenizer``, else the checkpoint's own (``model.hf_path``); checked against the checkpoint."""
    path = config.data.tokenizer or config.model.hf_path
    if not path:
        raise ConfigError("config.data.tokenizer is empty and there is no model.hf_path to take the tokenizer from: give "
                          "a SentencePiece .model, a tokenizer.json or a checkpoint directory (train a SentencePiece "
                          "model with: python -m train.train_tokenizer --input corpus.txt --vocab-size 8000 --out tok)")
    tokenizer = data_lib.Tokenizer(path)
    if config.model.hf_path:  # before any weight is read: a tokenizer from another model is an error
        c = assembly.architecture(config)  # (a Hugging Face directory's config.json, or a GGUF file's metadata)
        tokenizer.check_fits(c.vocab_size, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                             model=config.model.hf_path)
    return tokenizer


def _take(iterator, n):
    for i, batch in enumerate(iterator):
        if n and i >= n:
            return
        yield batch


def build_data(config: RunConfig, task: str, tokenizer):
    """``(train_batches, eval_batches)`` for ``task``: this process's rows of each global batch;
    ``eval_batches`` is a function returning a fresh iterator, or None without ``data.eval_source``."""
    d, t = config.data, config.train
    shard = dict(process_index=jax.process_index(), process_count=jax.process_count())
    batch_size = t.batch_size // jax.process_count()
    if task == "pretrain":
        data_config = data_lib.PretrainDataConfig(seq_len=t.seq_len, batch_size=batch_size, text_field=d.text_field,
                                                  num_epochs=d.num_epochs, overlong=d.overlong,
                                                  on_bad_record=d.on_bad_record)
        eval_config = dataclasses.replace(data_config, num_epochs=1, split=d.eval_split)
        make = functools.partial(data_lib.pretrain_batches, tokenizer=tokenizer, **shard)
    else:
        factory = {"alpaca": data_lib.FinetuneDataConfig.alpaca, "metamathqa": data_lib.FinetuneDataConfig.metamathqa}
        if d.format not in factory:
            raise ConfigError(f"unknown data.format {d.format!r}: choose one of {sorted(factory)}")
        template = {"prompt_template": d.prompt_template, "prompt_template_no_input": None} if d.prompt_template else {}
        try:
            data_config = factory[d.format](t.seq_len, batch_size, packing=d.packing, num_epochs=d.num_epochs,
                                            seed=config.seed, overlong=d.overlong, on_bad_record=d.on_bad_record,
                                            add_bos=tokenizer.adds_bos, chat_template=d.chat_template, **template)
        except ValueError as e:
            if not d.prompt_template:
                raise
            raise ConfigError(f"data.prompt_template: {e}") from None
        eval_config = dataclasses.replace(data_config, num_epochs=1, shuffle=False)
        make = functools.partial(data_lib.finetune_batches, tokenizer=tokenizer, **shard)
    train_batches = make(d.source, config=data_config)
    eval_batches = None
    if d.eval_source:
        eval_batches = lambda: _take(make(d.eval_source, config=eval_config), t.eval_batches)
    return train_batches, eval_batches


def export(config: RunConfig, model, result: loop.RunResult) -> None:
    """``export/adapter`` (PEFT format, with the MoRA type in use at the end) and ``export/merged``
    (Hugging Face format, with the base checkpoint's tokenizer and generation files) in the workdir, as ``config.export`` asks. Every process calls it (arrays
    sharded across processes are gathered); process 0 writes."""
    if result.preempted:
        return
    workdir = pathlib.Path(config.workdir)
    params, adapters = result.state.params(), result.state.adapters
    if config.export.adapter and adapters_lib.flatten(adapters):
        host_adapters = distributed.fetch_tree(adapters)  # small: gathered whole
        if jax.process_index() == 0:
            save_adapter(workdir / "export" / "adapter", adapter_config_for_export(config.adapter, adapters),
                            host_adapters, base_model_name_or_path=config.model.hf_path, overwrite=True)
    if config.export.merged:  # a quantized base is written dequantized, the adapters merged in float
        save_merged(workdir / "export" / "merged", model, dequantize_params(params), adapters, overwrite=True,
                    base_dir=config.model.hf_path or None)  # with the base's tokenizer: ready to load and chat
    distributed.barrier("export")


def adapter_config_for_export(adapter_config, adapters):
    """The config to write next to the adapters (after ReMoRA the current type may differ)."""
    mora_type = adapters_lib.current_mora_type(adapters)
    if mora_type is not None and mora_type != adapter_config.mora_type:
        return dataclasses.replace(adapter_config, mora_type=mora_type)
    return adapter_config


def run(config, task: str) -> loop.RunResult:
    """Run ``task`` (``"pretrain"`` or ``"finetune"``) as ``config`` (a ``RunConfig`` or its
    ``ml_collections`` form) says; returns the loop's result."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {TASKS}")
    config = config if isinstance(config, RunConfig) else RunConfig.from_dict(config)
    assembled = assembly.assemble(config)  # settings that do not fit the model or devices: before anything loads
    tokenizer = _tokenizer(config)
    assembly.check_vocab(config, assembled.model_config, tokenizer.vocab_size)
    params = assembled.load_params()
    merge_warning = config.model.quantize.merge_warning(config.remora.every, config.adapter)
    if merge_warning and jax.process_index() == 0:
        print(f"warning: {merge_warning}", flush=True)
    train_batches, eval_batches = build_data(config, task, tokenizer)
    # one lock from the first step to the last exported file: no other run writes this workdir between
    with workdir_lock.hold(config.workdir):
        result = loop.run(assembled.model, params, config, train_batches=train_batches, eval_batches=eval_batches,
                          layout=assembled.layout, mesh=assembled.mesh, steps=assembled.steps,
                          callbacks=accuracy_callbacks(config, assembled.model, tokenizer, train_batches,
                                                       assembled.mesh),
                          frozen_source=config.model.hf_path or f"preset:{config.model.preset}", workdir_locked=True)
        if jax.process_index() == 0:
            if hasattr(train_batches, "report"):
                print(train_batches.report(), flush=True)
            metrics.plot_loss_curve(result.history, pathlib.Path(config.workdir) / "loss_curve.png",
                                    title=f"{config.method} training loss")
        export(config, assembled.model, result)
    return result


def accuracy_callbacks(config: RunConfig, model, tokenizer, train_batches, mesh) -> list:
    """Exact-match answer accuracy on ``data.accuracy_source`` every ``train.eval_every`` steps and
    at the end (fine-tuning only; ``mora_jax.accuracy``); none when it is empty."""
    d = config.data
    if not d.accuracy_source:
        return []
    if not hasattr(train_batches, "config") or not hasattr(train_batches.config, "response_field"):
        raise ConfigError("data.accuracy_source scores fine-tuning answers: use it with train/finetune.py")
    records = accuracy.read_records(d.accuracy_source, split=d.eval_split, limit=d.accuracy_examples)
    evaluator = accuracy.AccuracyEvaluator(model, tokenizer, records, train_batches.config,
                                           max_new_tokens=d.accuracy_max_new_tokens, mesh=mesh)
    return [evaluator.callback(config.train.eval_every, config.train.steps)]


pretrain = functools.partial(run, task="pretrain")
finetune = functools.partial(run, task="finetune")

"""The training loop: jitted steps, ReMoRA merges, evaluation, checkpoints, progress and artifacts.

``run`` drives the pure pieces (``training.train_step``, ``remora.merge_and_reset``) and owns the
effects: data iteration, orbax checkpoints (resume is exact: the data iterator's position and the
RNG are part of the checkpoint), metrics, SIGTERM (saves and returns), and NaN/inf loss (stops with
a clear message, keeping the last good checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax import adapters as adapters_lib
from mora_jax import metrics as metrics_lib
from mora_jax import optim, remora, schedules, training, xla_tuning
from mora_jax.config import AdapterConfig, MoRAConfig


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Attributes:
      total_steps: optimizer steps.
      schedule: learning-rate schedule (ReMoRA restarts included when restart_every > 0).
      remora: merge period and type cycle (every=0: no merges).
      step: grad accumulation, clipping.
      optimizer: an optax optimizer name ("adamw", "lion", "sgd", ...), optimizer_kwargs its
        arguments besides the learning rate (for "adamw": b1, b2, eps, weight_decay).
      log_every: steps between metric lines (and NaN checks).
      eval_every: steps between evaluations (0 = only at the end when eval data is given).
      checkpoint_every: steps between checkpoints (0 = none); keep_checkpoints: how many to keep.
      async_checkpoints: save in the background.
      seed: RNG seed for adapters and dropout.
      progress: show a progress bar.
    """

    total_steps: int
    schedule: schedules.ScheduleConfig
    remora: remora.RemoraConfig = remora.RemoraConfig()
    step: training.StepConfig = training.StepConfig()
    optimizer: str = "adamw"
    optimizer_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    seed: int = 0
    progress: bool = True


@dataclasses.dataclass
class RunResult:
    state: training.TrainState
    history: list[dict]
    preempted: bool
    workdir: pathlib.Path
    final_eval: dict | None = None


class _SigtermFlag:
    """Turns SIGTERM (preemption) into a flag checked between steps; restores the old handler."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _initial_mora_config(config: AdapterConfig, remora_config: remora.RemoraConfig) -> AdapterConfig:
    if isinstance(config, MoRAConfig) and remora_config.every and config.mora_type != remora_config.type_cycle[0]:
        return dataclasses.replace(config, mora_type=remora_config.type_cycle[0])
    return config


def evaluate(eval_fn, state, batches) -> dict:
    """Mean loss and perplexity over ``batches``."""
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        out = eval_fn(state, batch)
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def run(model, params, adapter_config: AdapterConfig, loop_config: LoopConfig, *,
        train_batches: Iterator[Mapping[str, np.ndarray]], workdir: str | pathlib.Path,
        eval_batches: Callable[[], Iterator] | None = None, run_config: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callable] = (), resume: bool = True, layout=None,
        mesh=None, rules=None, checkpoint_mode: str = "resume", frozen_source: str = "") -> RunResult:
    """Train ``model`` from base ``params`` with ``adapter_config`` (MoRA, LoRA or full fine-tuning).

    Args:
      train_batches: an iterator of numpy batch dicts (``input_ids``, ``loss_mask``, optional
        ``segment_ids``/``positions``); if it has ``get_state``/``set_state`` its position is
        checkpointed and restored.
      eval_batches: a function returning a fresh iterator over the held-out split.
      callbacks: ``fn(step, state, log)`` called after each step (after merges); ``log(dict)``
        writes metrics for that step.
      mesh: a ``jax.sharding.Mesh`` (``mora_jax.sharding.make_mesh``): the state is laid out by the
        sharding rules (``rules``, default ``mora_jax.sharding.DEFAULT_RULES``), each batch is
        assembled from this process's rows, and the steps run jitted with in/out shardings and
        donation. None = the default device.
      checkpoint_mode: ``"resume"`` (continue a run in ``workdir``), ``"new"`` (refuse if checkpoints
        exist) or ``"overwrite"``.
    """
    workdir = pathlib.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    cfg = loop_config
    adapter_config = _initial_mora_config(adapter_config, cfg.remora)
    rng = jax.random.key(cfg.seed)
    adapters = adapters_lib.init_adapters(params, adapter_config, jax.random.fold_in(rng, 1), layout=layout)
    schedule = schedules.make_schedule(cfg.schedule)
    # Clipping is global over both parameter groups, in the step; the lr is set every step.
    tx = optim.from_name(cfg.optimizer, cfg.schedule.peak_lr, **dict(cfg.optimizer_kwargs))
    state = training.create_train_state(params, adapters, adapter_config, tx, jax.random.fold_in(rng, 2))
    initial_frozen = state.frozen
    use_dropout = float(getattr(adapter_config, "dropout", 0.0)) > 0.0

    step_fn = _frozen_passthrough_step(jax.jit(
        lambda frozen, rest, b: _without_frozen(training.train_step(
            rest.replace(frozen=frozen), b, model=model, tx=tx, schedule=schedule, step_config=cfg.step,
            use_dropout=use_dropout)),
        donate_argnums=1, compiler_options=xla_tuning.train_step_compiler_options()))
    eval_fn = jax.jit(lambda s, b: training.eval_step(s, b, model=model, step_config=cfg.step))
    merge_fns: dict = {}

    def merge_fn(state, next_type):
        # The first merge must not donate the frozen weights: they are still the caller's params.
        donate = state.frozen is not initial_frozen
        if (next_type, donate) not in merge_fns:
            merge_fns[next_type, donate] = jax.jit(
                lambda s: remora.merge_and_reset(s, tx=tx, next_type=next_type,
                                                 reset_optimizer=cfg.remora.reset_optimizer),
                donate_argnums=0 if donate else ())
        return merge_fns[next_type, donate](state)

    if mesh is not None:
        state, initial_frozen, step_fn, eval_fn, merge_fn = _sharded_functions(
            state, mesh, rules, model=model, tx=tx, schedule=schedule, cfg=cfg, use_dropout=use_dropout)

    checkpointer = None
    if cfg.checkpoint_every:
        from mora_jax.checkpoint import Checkpointer

        checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.keep_checkpoints,
                                    enable_async_checkpointing=cfg.async_checkpoints,
                                    mode=checkpoint_mode if resume else "new", run_config=run_config)
    start_step = 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, start_step = _restore(checkpointer, state, initial_frozen, train_batches)
    metrics_writer = metrics_lib.MetricsWriter(workdir, enabled=is_main,
                                               resume_step=start_step if start_step else None)
    if is_main:
        _write_run_config(workdir, run_config, adapter_config, cfg, training.trainable_summary(state))
        print(training.trainable_summary(state), flush=True)

    progress = None
    if cfg.progress and is_main:
        from tqdm import tqdm

        progress = tqdm(total=cfg.total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    pending: list[tuple[int, dict]] = []  # device metrics not yet fetched
    tokens_since, time_since = 0.0, time.perf_counter()

    def flush(step):
        """Fetch pending metrics, check they are finite, write the log line at ``step``."""
        nonlocal tokens_since, time_since
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            if not np.isfinite(m["loss"]):
                latest = checkpointer.latest_step() if checkpointer is not None else None
                where = (f"the last good checkpoint is step {latest} in {checkpointer.directory}"
                         if latest is not None else "no checkpoint was written")
                raise TrainingDiverged(
                    f"loss became {float(m['loss'])} at step {s}; stopping ({where}). Lower the learning rate, "
                    "enable gradient clipping or check the data, then resume from that checkpoint.")
        tokens_since += sum(float(m["tokens"]) for m in fetched)
        elapsed = time.perf_counter() - time_since
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm")}
        row = {**mean, "learning_rate": float(fetched[-1]["learning_rate"]),
               "tokens_per_s": tokens_since / max(elapsed, 1e-9)}
        metrics_writer.write(step, row)
        if progress is not None:
            progress.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['learning_rate']:.2e}",
                                 tok_s=f"{row['tokens_per_s']:.0f}")
        pending.clear()
        tokens_since, time_since = 0.0, time.perf_counter()

    def save(step, force=False):
        if checkpointer is None:
            return
        flush(step)
        data_state = train_batches.get_state() if hasattr(train_batches, "get_state") else {}
        meta = {"mora_type": _current_type(state), "frozen_source": frozen_source}
        checkpointer.save(step, state, data_state=data_state, meta=meta,
                          frozen_changed=bool(cfg.remora.every) and step >= cfg.remora.every, force=force)

    preempted = False
    step = start_step
    last_eval, last_eval_step = None, None
    try:
        with _SigtermFlag() as sigterm:
            while step < cfg.total_steps:
                try:
                    batch = next(train_batches)
                except StopIteration:
                    print(f"data exhausted after {step} steps", flush=True)
                    break
                state, step_metrics = step_fn(state, batch)
                step += 1
                pending.append((step, step_metrics))
                extra: dict = {}
                if cfg.remora.is_merge_step(step) and step < cfg.total_steps and adapters_lib.flatten(state.adapters):
                    flush(step)
                    next_type = cfg.remora.type_at(step) if isinstance(adapter_config, MoRAConfig) else None
                    state = merge_fn(state, next_type)
                    time_since = time.perf_counter()  # tokens/s measures training only
                    extra["remora_merge"] = 1
                    if next_type is not None:
                        extra["mora_type"] = next_type
                log = lambda values, _step=step: (flush(_step), metrics_writer.write(_step, values))
                for callback in callbacks:
                    callback(step, state, log)
                if extra:
                    metrics_writer.write(step, extra)
                if step % cfg.log_every == 0 or step == cfg.total_steps:
                    flush(step)
                if eval_batches is not None and cfg.eval_every and step % cfg.eval_every == 0:
                    flush(step)
                    last_eval = evaluate(eval_fn, state, eval_batches())
                    last_eval_step = step
                    metrics_writer.write(step, last_eval)
                    time_since = time.perf_counter()  # tokens/s measures training only
                if checkpointer is not None and (step % cfg.checkpoint_every == 0 or step == cfg.total_steps):
                    save(step)
                if progress is not None:
                    progress.update(1)
                if sigterm.raised:
                    print(f"SIGTERM: saving a checkpoint at step {step} and exiting", flush=True)
                    save(step, force=True)
                    preempted = True
                    break
        flush(step)
        final_eval = None
        if eval_batches is not None and not preempted:
            if last_eval_step == step:
                final_eval = last_eval
            else:
                final_eval = evaluate(eval_fn, state, eval_batches())
                metrics_writer.write(step, final_eval)
    finally:
        if progress is not None:
            progress.close()
        if checkpointer is not None:
            checkpointer.close()
        metrics_writer.close()
    history = metrics_writer.history() if is_main else []
    if is_main:
        metrics_lib.plot_loss_curve(history, workdir / "loss_curve.png", title=f"{adapter_config.method} training loss")
    return RunResult(state=state, history=history, preempted=preempted, workdir=workdir, final_eval=final_eval)


def _sharded_functions(state, mesh, rules, *, model, tx, schedule, cfg: LoopConfig, use_dropout: bool):
    """The state laid out on ``mesh`` (a copy: donating it never deletes the caller's arrays) and the
    jitted, sharded train / eval / merge functions, with batches assembled from process-local rows."""
    from mora_jax import sharding

    rules = rules or sharding.DEFAULT_RULES
    shardings = sharding.state_shardings(jax.eval_shape(lambda: state), mesh, rules)
    state = sharding.place(state, shardings)
    train = sharding.jit_train_step(model, tx, schedule, cfg.step, mesh, shardings, rules, use_dropout=use_dropout)
    evaluate_ = sharding.jit_eval_step(model, cfg.step, mesh, shardings, rules)
    merges = {donate: sharding.jit_merge_and_reset(tx, mesh, shardings, rules, donate=donate,
                                                   reset_optimizer=cfg.remora.reset_optimizer)
              for donate in (False, True)}
    initial_frozen = state.frozen

    def merge_fn(state, next_type):
        # The frozen weights of the first merge are also the checkpointer's initial_frozen: keep them.
        return merges[state.frozen is not initial_frozen](state, next_type=next_type)

    return (state, initial_frozen, lambda s, b: train(s, sharding.shard_batch(b, mesh, rules)),
            lambda s, b: evaluate_(s, sharding.shard_batch(b, mesh, rules)), merge_fn)


def _without_frozen(out):
    new_state, metrics = out
    return new_state.replace(frozen=None), metrics


def _frozen_passthrough_step(jitted):
    """``step(state, batch)`` that donates everything but the frozen weights, which pass through
    untouched (they may still be the caller's arrays, and donating them would delete those)."""

    def step(state, batch):
        rest, metrics = jitted(state.frozen, state.replace(frozen=None), batch)
        return rest.replace(frozen=state.frozen), metrics

    return step


def _current_type(state) -> int | None:
    for adapter in adapters_lib.flatten(state.adapters).values():
        return getattr(adapter, "mora_type", None)
    return None


def _restore(checkpointer, state, initial_frozen, train_batches):
    """The latest checkpoint, restored into ``state``'s structure and shardings (the checkpoint's
    MoRA type is applied by the checkpointer); the data iterator resumes where it was."""
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)
    restored, data_state, _ = checkpointer.restore(abstract_state=abstract, initial_frozen=initial_frozen)
    if data_state and hasattr(train_batches, "set_state"):
        train_batches.set_state(data_state)
    step = int(restored.step)
    print(f"resumed from step {step} ({checkpointer.directory})", flush=True)
    return restored, step


def _write_run_config(workdir, run_config, adapter_config, loop_config, summary_line):
    def plain(obj):
        if dataclasses.is_dataclass(obj):
            return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        if isinstance(obj, (list, tuple)):
            return [plain(x) for x in obj]
        if isinstance(obj, Mapping):
            return {str(k): plain(v) for k, v in obj.items()}
        return obj if isinstance(obj, (int, float, str, bool, type(None))) else str(obj)

    payload = {"run": plain(run_config or {}), "adapter": {"method": adapter_config.method, **plain(adapter_config)},
               "loop": plain(loop_config), "summary": summary_line, "jax_devices": [str(d) for d in jax.devices()]}
    (pathlib.Path(workdir) / "run_config.json").write_text(json.dumps(payload, indent=2) + "\n")

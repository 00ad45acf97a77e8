"""The training loop: the story of a run, from base weights to trained adapters.

:func:`run` creates the train state (frozen base weights, float32 trainables, one optimizer state
per group) and the compiled steps (:mod:`mora_jax.assembly`), lays the state out on the mesh, resumes from
the latest checkpoint, then repeats: a train step, a ReMoRA merge every ``remora.every`` steps,
evaluations, checkpoints. It owns the effects; the steps are pure.

* Resume is exact: the data iterator's position and the RNG are in the checkpoint.
* SIGTERM (preemption) saves a checkpoint and returns.
* A non-finite loss, gradient or updated state stops the run with :class:`TrainingDiverged`; such a
  state is never saved. The checkpoint the message names is one from before the problem: the step
  that showed it was computed on the checkpoint before (:mod:`mora_jax.health`), so that one is not
  named when a loss or gradient went non-finite.
* Finite is not healthy: :class:`mora_jax.health.HealthMonitor` sees every step's metrics. A
  collapse (zero gradients, a loss pinned at ln(vocab)) stops the run with
  :class:`TrainingCollapsed` (or is reported, ``train.on_collapse='warn'``); a loss spike is
  reported. While such a problem lasts, the last checkpoint from before it is kept out of
  ``checkpoint.keep``'s rotation.
* A ReMoRA/ReLoRA merge that makes the frozen weights non-finite stops the run before they are
  saved or trained on; a restored state is checked finite (:mod:`mora_jax.checkpoint.resume`).
* A save the file system refuses (a full disk) stops the run with one line saying where, how much
  space was free and which checkpoint is the last good one (kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import pathlib
import signal
import time
from typing import Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from mora_jax import adapters as adapters_lib
from mora_jax import assembly, distributed, health, remora_diagnostics, training
from mora_jax import metrics as metrics_lib
from mora_jax import steps as steps_lib
from mora_jax.checkpoint import integrity as checkpoint_integrity
from mora_jax.checkpoint import workdir_lock
from mora_jax.checkpoint.checkpointer import Checkpointer
from mora_jax.errors import UserError
from mora_jax.run_config import RunConfig


class TrainingDiverged(UserError, RuntimeError):
    """The loss, a gradient or the updated parameters became NaN or infinite (or a ReMoRA merge
    made the frozen weights so); the message names the checkpoint to resume from."""


class TrainingCollapsed(TrainingDiverged):
    """The run collapsed (zero gradients, a loss pinned at ln(vocab)): :mod:`mora_jax.health`."""


class DiskFull(UserError, OSError):
    """Writing a file of the run (metrics, its config) failed for lack of space."""


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclasses.dataclass
class RunResult:
    state: training.TrainState
    history: list[dict]
    preempted: bool
    workdir: pathlib.Path
    final_eval: dict | None = None


def run(model, params, config: RunConfig, *, train_batches: Iterator[Mapping[str, np.ndarray]],
        eval_batches: Callable[[], Iterator] | None = None, callbacks: Sequence[Callable] = (),
        layout=None, mesh=None, rules=None, steps: steps_lib.Steps | None = None, frozen_source: str = "",
        workdir_locked: bool = False) -> RunResult:
    """Train ``model`` from base ``params`` as ``config`` says (MoRA, LoRA or full fine-tuning).

    Args:
      train_batches: numpy batch dicts (``input_ids``, ``loss_mask``, optional ``segment_ids`` /
        ``positions``), this process's rows; an iterator with ``get_state``/``set_state`` has its
        position checkpointed and restored.
      eval_batches: a function returning a fresh iterator over the held-out split.
      callbacks: ``fn(step, state, log)`` after each step (after merges); ``log(dict)`` writes metrics.
      layout: the adapters' layout for a model that scans over layers (``mora_jax.dense_layout``).
      mesh, rules: the device mesh and sharding rules (None: the default device, the default rules).
      steps: the run's compiled steps when the caller built them already
        (:func:`mora_jax.assembly.assemble`); else built here from ``config``, ``mesh`` and ``rules``.
      frozen_source: where the base weights came from, recorded with each checkpoint.
      workdir_locked: the caller holds the workdir's lock already (``recipes.run`` holds it through
        the export that follows the run).

    Only one run at a time may write a workdir: it is locked from start to end
    (:mod:`mora_jax.checkpoint.workdir_lock`), and a second run is refused with the first one named.
    """
    lock = contextlib.nullcontext() if workdir_locked else workdir_lock.hold(config.workdir)
    with lock:  # released on every exit, exceptions included
        return _run(model, params, config, train_batches=train_batches, eval_batches=eval_batches,
                    callbacks=callbacks, layout=layout, mesh=mesh, rules=rules, steps=steps,
                    frozen_source=frozen_source)


def _run(model, params, config: RunConfig, *, train_batches, eval_batches, callbacks, layout, mesh, rules, steps,
         frozen_source) -> RunResult:
    workdir = pathlib.Path(config.workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
    state = assembly.initial_state(params, config, layout)
    summary = training.trainable_summary(state)
    steps = steps if steps is not None else assembly.build_steps(config, model, mesh, rules)
    state = steps.place(state)
    initial_frozen = state.frozen
    monitor = health.HealthMonitor(config.train.health(), vocab_size=_vocab_size(model))
    checkpointer = _checkpointer(config, workdir)
    writer = None
    try:
        step = 0
        if checkpointer is not None and checkpointer.latest_step() is not None:
            state, step = _restore(checkpointer, state, initial_frozen, train_batches, monitor)
        writer = metrics_lib.MetricsWriter(workdir, enabled=is_main, resume_step=step, on_step=monitor.observe,
                                           progress_total=config.train.steps if config.train.progress and is_main
                                           else None)
        if is_main:
            _write_run_config(workdir, config, summary)
            print(summary, flush=True)
        return _train(steps, state, step, config, train_batches=train_batches, eval_batches=eval_batches,
                      callbacks=callbacks, initial_frozen=initial_frozen, frozen_source=frozen_source,
                      checkpointer=checkpointer, writer=writer, monitor=monitor, workdir=workdir)
    except OSError as e:
        if e.errno in _DISK_FULL and not isinstance(e, UserError):  # metrics, run_config.json, ...
            raise DiskFull(_disk_full_message(e, checkpointer)) from e
        raise
    finally:
        if writer is not None:
            writer.close()
        if checkpointer is not None:
            checkpointer.close()


def _train(steps: steps_lib.Steps, state, step: int, config: RunConfig, *, train_batches, eval_batches, callbacks,
           initial_frozen, frozen_source, checkpointer, writer, monitor, workdir) -> RunResult:
    """The loop proper, from ``step`` (0, or the restored checkpoint's) to ``train.steps``."""
    is_main = jax.process_index() == 0

    def report(line: str) -> None:
        if is_main:
            print(line, flush=True)

    def flush():
        try:
            writer.flush(step)
        except metrics_lib.NonFiniteMetrics as e:
            bad_from = e.step if e.name == "trainables_norm" else e.step - 1  # see mora_jax.health
            raise TrainingDiverged(f"{e}; stopping: " + _stop_advice(checkpointer, monitor, bad_from)) from None
        _react_to_health(monitor, checkpointer, config, report)

    def save(force=False):
        if checkpointer is not None:
            flush()  # never save a state whose update was not finite
            data_state = distributed.gather_process_states(  # each process reads its own shard
                train_batches.get_state() if hasattr(train_batches, "get_state") else {})
            # the MoRA type is recorded by the checkpointer itself
            meta = {"frozen_source": frozen_source, "health": monitor.state_dict()}
            checkpointer.save(step, state, data_state=data_state, meta=meta, force=force,
                              frozen_changed=bool(config.remora.every) and step >= config.remora.every)

    preempted = False
    last_eval = _logged_eval(writer, step) if eval_batches is not None and step >= config.train.steps else None
    train_cfg = config.train
    compiles = True  # the first step (and the first after a merge) may compile: timed apart from tokens/s
    with _SigtermFlag() as sigterm:
        while step < train_cfg.steps:
            # Processes decide together (a step one process skips would hang the others): all
            # stop when any one's shard of the data ends first.
            local_batch = next(train_batches, None)
            if not distributed.all_processes_agree(local_batch is not None):
                print(f"data exhausted after {step} steps"
                      + ("" if local_batch is None else " (on another process)"), flush=True)
                break
            batch = steps.shard_batch(local_batch)
            if compiles:
                with writer.untimed():
                    t0 = time.perf_counter()
                    state, step_metrics = steps.train(state, batch)
                    jax.block_until_ready(step_metrics)
                if is_main and step == 0:
                    print(f"first train step: {time.perf_counter() - t0:.1f} s (compiling it included; "
                          "left out of tokens/s)", flush=True)
            else:
                state, step_metrics = steps.train(state, batch)
            step += 1
            writer.add(step, step_metrics, positions=batch["input_ids"].size, timed=not compiles)
            compiles = False
            if checkpointer is not None:
                checkpointer.raise_if_failed()  # a save that failed in the background stops the run now
            if config.remora.is_merge_step(step) and step < train_cfg.steps and adapters_lib.flatten(state.adapters):
                flush()
                state, merge_row, bad = _merge(steps, state, step, config, initial_frozen)
                if bad is not None:  # before the merged weights are saved or trained on
                    raise TrainingDiverged(
                        f"the ReMoRA merge after step {step} made the frozen weights non-finite ({bad}); stopping "
                        "before they are saved or trained on: " + _stop_advice(checkpointer, monitor, step))
                writer.write(step, merge_row)
                writer.reset_clock()
                compiles = True  # a new MoRA type changes the step's program
            with writer.untimed():  # e.g. accuracy's generation: not training
                for callback in callbacks:
                    callback(step, state, lambda values, s=step: (flush(), writer.write(s, values)))
            if step % train_cfg.log_every == 0 or step == train_cfg.steps:
                flush()
            if eval_batches is not None and train_cfg.eval_every and step % train_cfg.eval_every == 0:
                flush()
                last_eval = (step, evaluate(steps, state, eval_batches()))
                writer.write(step, last_eval[1])
                writer.reset_clock()
            saved_now = checkpointer is not None and (step % config.checkpoint.every == 0 or step == train_cfg.steps)
            if saved_now:
                save()
            # a SIGTERM reaches the processes at different moments: any one's stops them all here
            if not distributed.all_processes_agree(not sigterm.raised):
                print(f"SIGTERM: saving a checkpoint at step {step} and exiting"
                      + ("" if sigterm.raised else " (received by another process)"), flush=True)
                if not saved_now:  # this very step may just have been saved on schedule
                    save(force=True)
                preempted = True
                break
    flush()
    final_eval = None
    if eval_batches is not None and not preempted:
        if last_eval is None or last_eval[0] != step:  # no evaluation at the last step yet
            last_eval = (step, evaluate(steps, state, eval_batches()))
            writer.write(step, last_eval[1])
        final_eval = last_eval[1]
    if monitor.finding is not None and not preempted:
        report(f"warning: the run ends unhealthy: {monitor.finding.describe()}; "
               + _advice(checkpointer, monitor.bad_from()))
    if checkpointer is not None:
        if not preempted:  # a finished, healthy run: its last checkpoint needs no older one
            checkpointer.hold_before(monitor.bad_from())
        checkpointer.wait_until_finished()  # a last save that fails is reported here, once
    history = writer.history() if is_main else []
    return RunResult(state=state, history=history, preempted=preempted, workdir=workdir, final_eval=final_eval)


def _merge(steps: steps_lib.Steps, state, step: int, config: RunConfig, initial_frozen):
    """The ReMoRA/ReLoRA merge after ``step``, its metrics row (with diagnostics if enabled), and the
    first frozen weight the merge made non-finite (None: all finite)."""
    next_type = config.remora.type_at(step) if config.method == "mora" else None
    row: dict = {"remora_merge": 1, **({"mora_type": next_type} if next_type else {})}
    if config.remora.diagnostics:
        row.update(remora_diagnostics.delta_norms(state.adapters, state.frozen))
        probes = remora_diagnostics.probe_paths(state.adapters)
    state = steps.merge(state, next_type)
    bad = health.first_non_finite(state.frozen)
    if config.remora.diagnostics and bad is None:
        row.update(remora_diagnostics.accumulated_ranks(state.frozen, initial_frozen, state.adapters, probes))
    return state, row, bad


def evaluate(steps: steps_lib.Steps, state, batches) -> dict:
    """Mean loss and perplexity over ``batches`` (numpy, this process's rows). With several
    processes, each evaluates as many batches as the process with the fewest has (their shards of
    the held-out split may differ by a batch; a step every process does not join would hang)."""
    loss_sum, tokens = 0.0, 0.0
    batches = iter(batches)
    while True:
        batch = next(batches, None)
        if not distributed.all_processes_agree(batch is not None):
            break
        out = steps.eval(state, steps.shard_batch(batch))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": tokens}


def _checkpointer(config: RunConfig, workdir: pathlib.Path):
    if not config.checkpoint.every:
        return None

    # orbax needs an absolute path (a relative workdir such as runs/x fails deep inside tensorstore)
    return Checkpointer((workdir / "checkpoints").absolute(), max_to_keep=config.checkpoint.keep,
                        enable_async_checkpointing=config.checkpoint.async_save, mode=config.checkpoint.mode,
                        run_config=config.to_dict())


def _restore(checkpointer, state, initial_frozen, train_batches, monitor: health.HealthMonitor):
    """The newest intact checkpoint, restored into ``state``'s structure and shardings (the checkpoint's
    MoRA type is applied by the checkpointer; damaged ones are reported in one line each and moved
    aside); the data iterator resumes where it was. ``(state, 0)`` when no intact one is left."""
    restored = checkpointer.restore_latest_good(abstract_state=steps_lib.abstract(state), initial_frozen=initial_frozen,
                                                report=lambda line: print(line, flush=True))
    if restored is None:
        print(f"no intact checkpoint left in {checkpointer.directory} (the damaged ones are in its damaged/): "
              "starting from step 0", flush=True)
        return state, 0
    restored, data_state, meta = restored
    step = int(restored.step)
    monitor.load_state_dict((meta or {}).get("health"))  # a problem seen before the restart is still going on
    monitor.last_step = step  # the steps up to the restored one were seen (by the run that saved it)
    checkpointer.hold_before(monitor.hold_before())
    data_state = distributed.own_process_state(data_state)
    if data_state and hasattr(train_batches, "set_state"):
        train_batches.set_state(data_state)
    print(f"resumed from step {step} ({checkpointer.directory})", flush=True)
    return restored, step


def _vocab_size(model) -> int | None:
    """The model's vocabulary size (for the uniform loss ln(vocab)), where it says."""
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _logged_eval(writer: metrics_lib.MetricsWriter, step: int) -> tuple[int, dict] | None:
    """The evaluation of ``step`` already in ``metrics.jsonl`` (a finished run started again: it is
    not evaluated and logged twice). Every process learns whether process 0 found one."""
    rows = [r for r in writer.history() if r.get("step") == step and "eval_loss" in r] if writer.enabled else []
    if distributed.all_processes_agree(not rows):
        return None
    return step, ({k: v for k, v in rows[-1].items() if k.startswith("eval_")} if rows else {})


def _advice(checkpointer, bad_from: int | None, *, stopping: bool = False) -> str:
    """Which checkpoint to resume from when those from ``bad_from`` on are suspect (health.resume_advice)."""
    if checkpointer is None:
        return "no checkpoint was written (checkpoint.every=0)"
    return health.resume_advice(checkpointer.directory, checkpointer.all_steps(), bad_from,
                                pending=checkpointer.pending_step(), stopping=stopping)


def _stop_advice(checkpointer, monitor: health.HealthMonitor, bad_from: int) -> str:
    """What a run that stops (diverged, collapsed, a merge gone non-finite) tells the user to do:
    the checkpoint from before the problem (and before any collapse or spike still going on)."""
    ongoing = monitor.bad_from()
    earlier = ongoing is not None and ongoing < bad_from
    bad_from = min(bad_from, ongoing) if ongoing is not None else bad_from
    if checkpointer is not None:
        checkpointer.hold_before(bad_from)
        try:
            checkpointer.wait_until_finished()  # saves still being written count
        except Exception:  # noqa: BLE001 -- a failed save is not this message's subject
            pass
    return ((f"before that, {monitor.describe()}; " if earlier else "")
            + _advice(checkpointer, bad_from, stopping=True))


def _react_to_health(monitor: health.HealthMonitor, checkpointer, config: RunConfig, report) -> None:
    """Report what the monitor found since the last flush (a collapse with ``on_collapse='stop'``
    stops the run) and keep the last good checkpoint out of rotation while a problem lasts."""
    for event, finding in monitor.pop_events():
        if event == "recovered":
            report(f"the run recovered from the problem seen at step {finding.onset} ({finding.kind}): "
                   f"{monitor.config.history} healthy steps in a row; older checkpoints rotate again")
        elif finding.kind == "collapse" and config.train.on_collapse == "stop":
            raise TrainingCollapsed(f"{finding.describe()}; stopping (train.on_collapse=stop): "
                                    + _stop_advice(checkpointer, monitor, finding.bad_from))
        else:
            held = "; it is kept out of rotation until the run recovers" if checkpointer is not None else ""
            report(f"warning: {finding.describe()}; " + _advice(checkpointer, monitor.bad_from()) + held)
    if checkpointer is not None:  # a checkpoint is known good once the next step's metrics are seen healthy
        checkpointer.hold_before(monitor.hold_before())


def _disk_full_message(error: OSError, checkpointer) -> str:
    where = error.filename or "a file of the workdir"
    space = checkpoint_integrity.describe_space(pathlib.Path(where).parent) if error.filename else ""
    last = (f"the last good checkpoint is step {checkpointer.all_steps()[-1]} in {checkpointer.directory}"
            if checkpointer is not None and checkpointer.all_steps() else "no checkpoint was saved")
    return (f"writing {where} failed: {error.strerror}" + (f" ({space})" if space else "")
            + f"; stopping: {last}. Free some space, then run the same command to resume")


def _write_run_config(workdir: pathlib.Path, config: RunConfig, summary: str) -> None:
    payload = {"run": config.to_dict(), "summary": summary, "jax_devices": [str(d) for d in jax.devices()]}
    (workdir / "run_config.json").write_text(json.dumps(payload, indent=2) + "\n")


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

"""Checkpoints of a training run: atomic, asynchronous, keep-last-N, resumable across ReMoRA merges.

:class:`Checkpointer` wraps ``orbax.checkpoint.CheckpointManager``. Each checkpoint is a directory
``<directory>/<step>/`` with up to three items:

* ``state``: the adapters and unfrozen base parameters (``state.trainables``), the optimizer state of
  both groups, ``step`` and the PRNG key (saved as ``jax.random.key_data`` and re-wrapped on restore);
* ``frozen``: the frozen base weights, saved **only** when ReMoRA/ReLoRA merges have changed them
  (``frozen_changed=True``). Before the first merge they equal the weights the run loads from its
  source, so saving them would only copy a possibly huge model; restore then takes them from
  ``initial_frozen``. Every checkpoint is self-contained: no checkpoint depends on another one
  (deleting old ones with ``max_to_keep`` never breaks a newer one);
* ``meta``: JSON (see :class:`CheckpointMetadata`): the data-iterator state, the MoRA type in use,
  the run config, whether the frozen weights changed / were saved, and the caller's own ``meta``.

Safety:

* orbax writes each step to ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a crash
  mid-save leaves the previous checkpoints intact and ``latest_step()`` ignores the partial one
  (left-over temporary directories are removed when the next Checkpointer opens the directory);
* once a save has been committed (for asynchronous saves, by a background thread as soon as orbax
  has finished) the step is *sealed*: ``<step>/mora_manifest.json`` records the size and CRC-32 of
  every file it wrote (:mod:`mora_jax.checkpoint.integrity`);
* :meth:`~Checkpointer.restore_latest_good` verifies the newest step before restoring it; a damaged
  or incomplete one (a truncated or changed file, a missing item, unreadable metadata, an empty
  directory) is reported in one line, moved to ``<directory>/damaged/<step>-<time>`` (never deleted)
  and the previous step is tried;
* ``max_to_keep`` deletes a step only once that many newer steps are sealed, so the last good
  checkpoint is never pushed out by newer ones that were not completely written; :meth:`hold_before`
  keeps one more out of rotation (the last one known healthy, :mod:`mora_jax.health`);
* a save the file system refuses (a full disk, in the foreground or the background) is one
  :class:`CheckpointWriteError` naming the step, the free space and the last good checkpoint (orbax's
  own tracebacks of it are not logged); a checkpoint whose arrays do not fit the run is a
  :class:`CheckpointMismatch` before orbax is asked to read it;
* ``mode='new'`` (the default) refuses a directory that already holds checkpoints; ``'resume'``
  continues them and ``'overwrite'`` deletes them explicitly. A step is never overwritten;
* when the frozen weights are not saved, a small sample of their values is recorded, and restoring
  with ``initial_frozen`` that do not match (other source weights, or merged weights passed with
  ``frozen_changed=False``) is an error instead of a silently wrong model.

Integrity checks (manifests, verification, moving aside) need a local directory; for a URL
(``gs://...``) steps are restored unverified.

Typical loop::

    ckpt = Checkpointer(out_dir, mode="resume", max_to_keep=3, save_interval_steps=1000,
                        run_config=config_dict)
    abstract = jax.eval_shape(make_state, ...)           # with shardings, see restore()
    restored = ckpt.restore_latest_good(abstract_state=abstract, initial_frozen=load_base())
    if restored is not None:                             # None: nothing (good) to resume from
        state, data_state, _ = restored
        loader.set_state(data_state)
    for batch in loader:
        state, metrics = train_step(state, batch)
        ...                                             # ReMoRA merge at step s: frozen_changed = True
        ckpt.save(int(state.step), state, data_state=loader.get_state(), frozen_changed=merged_once)
    ckpt.close()
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
from typing import Any, Callable, Literal, Mapping

import jax
import orbax.checkpoint as ocp

from mora_jax.adapters import mora_types
from mora_jax.checkpoint import integrity
from mora_jax.checkpoint import resume as checkpoint_resume
from mora_jax.checkpoint.integrity import (
    FROZEN_ITEM,
    META_ITEM,
    STATE_ITEM,
    CheckpointDamaged,
    CheckpointMismatch,
    CheckpointsExist,
    CheckpointWriteError,
    StepCheck,
)
from mora_jax.checkpoint.metadata import (
    CheckpointMetadata,
    abstract_leaf,
    check_initial_frozen,
    fingerprint_mismatch,
    frozen_fingerprint,
    is_typed_key,
    json_copy,
    with_mora_type,
)
from mora_jax.quant import storage as quant_storage
from mora_jax.training import TrainState

logger = logging.getLogger(__name__)

MODES = ("new", "resume", "overwrite")
Mode = Literal["new", "resume", "overwrite"]


class _QuietWriteFailures(logging.Filter):
    """Drops orbax's log records of a save the file system refused (a full disk): orbax logs one with a
    traceback from each of its threads, and the Checkpointer reports it once (CheckpointWriteError)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        error = record.exc_info[1] if record.exc_info else None
        refused = integrity.write_failure(error) if error is not None else "os_error_code=" in record.getMessage()
        return not refused


_QUIET_WRITE_FAILURES = _QuietWriteFailures()


# ---------------------------------------------------------------------------------------------
# The checkpointer.
# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and restores :class:`~mora_jax.training.TrainState` checkpoints of one run in ``directory``.

    Args:
      directory: where the run's checkpoints live (created if missing; a local path or a URL orbax
        understands, e.g. ``gs://``).
      mode: ``'new'`` starts a run and refuses a directory that already has checkpoints;
        ``'resume'`` continues the checkpoints there (an empty directory is fine: nothing to
        restore, so the same command works for the first start and every restart);
        ``'overwrite'`` deletes the existing checkpoints first (only orbax step directories;
        other files are left alone).
      max_to_keep: keep the newest N sealed checkpoints (None keeps all); older steps are deleted
        only once N newer ones are sealed.
      save_interval_steps: :meth:`save` writes at steps that are multiples of this (and when a
        preemption signal was received, or ``force=True``); other calls return False.
      enable_async_checkpointing: write in a background thread; :meth:`save` returns once the arrays
        are copied to host memory, so the caller may donate or delete them right away.
      run_config: JSON-able description of the run, stored in every checkpoint's metadata; on
        resume, differences from the stored one are logged as warnings.
    """

    def __init__(self, directory: str | os.PathLike, *, mode: Mode = "new", max_to_keep: int | None = None,
                 save_interval_steps: int = 1, enable_async_checkpointing: bool = True,
                 run_config: Mapping[str, Any] | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = directory
        self.mode = mode
        self.max_to_keep = max_to_keep
        self.run_config = json_copy(dict(run_config), "run_config") if run_config is not None else None
        self._local = "://" not in os.fspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: only sealed steps count (_apply_retention)
            enable_async_checkpointing=enable_async_checkpointing,
            cleanup_tmp_directories=True,  # partial saves of a crashed run
            # Multiples of the interval, and on preemption. (orbax's default would also save the first
            # step offered to an empty directory, whatever it is.)
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]),
        )
        self._async = enable_async_checkpointing
        logging.getLogger("absl").addFilter(_QUIET_WRITE_FAILURES)  # orbax logs through absl
        # Handlers registered up front (not on first use), so that a checkpoint's stored structure can be
        # read before restoring it: one that does not fit is an error before orbax tries it array by array.
        self._manager = ocp.CheckpointManager(directory, options=options, item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(), FROZEN_ITEM: ocp.StandardCheckpointHandler(),
            META_ITEM: ocp.JsonCheckpointHandler()})
        self._base_fingerprint: dict | None = None  # of the unchanged frozen weights, once known
        self._pending: int | None = None  # a started save not sealed yet
        self._sealer: threading.Thread | None = None  # seals an asynchronous save as soon as it is committed
        self._sealer_error: BaseException | None = None
        self._hold_before: int | None = None  # keep the newest step before it (hold_before)
        self._failed = False  # a save failed and was reported (close() then stays quiet)
        self._sealed = {s for s in self.all_steps() if self._has_manifest(s)}
        self._check_mode()

    # ---- directory policy --------------------------------------------------------------------------
    def _check_mode(self) -> None:
        steps = self.all_steps()
        if not steps:
            return
        if self.mode == "new":
            self._manager.close()
            raise CheckpointsExist(
                f"checkpoint directory {self.directory} already holds checkpoints (steps {steps[:10]}"
                f"{' ...' if len(steps) > 10 else ''}) of an earlier run; refusing to start a new run there. "
                "Pass mode='resume' (--config.checkpoint.mode=resume) to continue that run, mode='overwrite' "
                "to delete its checkpoints, or choose another directory."
            )
        if self.mode == "overwrite":
            logger.warning("mode='overwrite': deleting checkpoints %s in %s", steps, self.directory)
            for step in steps:
                self._manager.delete(step)
            self._manager.reload()
            return
        # resume: the run config may legitimately change (e.g. more steps), but say so.
        try:
            stored = self.restore_metadata(steps[-1]).run_config
        except Exception:  # noqa: BLE001 -- a damaged step: restore_latest_good reports it
            return
        if self.run_config is not None and stored is not None and stored != self.run_config:
            changed = sorted(k for k in set(stored) | set(self.run_config) if stored.get(k) != self.run_config.get(k))
            logger.warning("resuming %s with a run_config that differs from the checkpoint's in %s",
                           self.directory, changed)

    # ---- queries -----------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (None if there is none)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (partial/in-progress saves are not listed)."""
        return sorted(self._manager.all_steps())

    def step_dir(self, step: int) -> pathlib.Path:
        """The directory of checkpoint ``step`` (local directories)."""
        return pathlib.Path(os.fspath(self.directory)) / str(int(step))

    def _has_manifest(self, step: int) -> bool:
        return self._local and (self.step_dir(step) / integrity.MANIFEST_FILE).is_file()

    def should_save(self, step: int) -> bool:
        """Whether :meth:`save` would write at ``step`` without ``force``."""
        return self._manager.should_save(step)

    def _resolve_step(self, step: int | None) -> int:
        self.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint to restore in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {self.all_steps()}")
        return step

    def restore_metadata(self, step: int | None = None) -> CheckpointMetadata:
        """The JSON metadata of checkpoint ``step`` (default: the latest), without reading arrays.

        Read it before :meth:`restore` to learn ``mora_type``, the run config and whether the
        initial frozen weights are needed (``not frozen_saved``).
        """
        step = self._resolve_step(step)
        restored = self._manager.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        return CheckpointMetadata.from_json(restored[META_ITEM])

    # ---- save --------------------------------------------------------------------------------------
    def save(self, step: int, state: TrainState, *, data_state: Mapping[str, Any] | None = None,
             meta: Mapping[str, Any] | None = None, frozen_changed: bool, force: bool = False) -> bool:
        """Save ``state`` as checkpoint ``step``; returns whether a checkpoint was started.

        Args:
          step: the checkpoint's step (normally ``int(state.step)``, the completed updates).
          state: the train state; arrays may be sharded.
          data_state: the data iterator's JSON-able position (``loader.get_state()``).
          meta: any other JSON-able values to keep with the checkpoint (e.g. tokens seen).
          frozen_changed: True once ReMoRA/ReLoRA merges have changed ``state.frozen`` (step >= the
            first merge step): the frozen weights are then saved too. While False they are not saved
            and must equal the weights the run started from (checked against earlier checkpoints).
          force: save even if ``step`` is not a multiple of ``save_interval_steps`` (e.g. at the end).

        With asynchronous checkpointing the write continues in the background; call
        :meth:`wait_until_finished` (or :meth:`close`) before exiting the process.
        """
        step = int(step)
        if force:
            if step in self.all_steps():
                raise FileExistsError(f"{self.directory} already has a checkpoint for step {step}; checkpoints "
                                      "are never overwritten (save under another step or delete it first)")
        elif not self.should_save(step):
            return False
        data_state = json_copy(data_state, "data_state") if data_state is not None else None
        user_meta = json_copy(dict(meta or {}), "meta")
        fingerprint = None
        if not frozen_changed:
            fingerprint = frozen_fingerprint(state.frozen)
            if self._base_fingerprint is not None:
                mismatch = fingerprint_mismatch(self._base_fingerprint, fingerprint)
                if mismatch:
                    raise ValueError(
                        f"save(step={step}, frozen_changed=False) but state.frozen is not the run's initial base "
                        f"weights ({mismatch}): a ReMoRA/ReLoRA merge has changed them, and without "
                        "frozen_changed=True they would not be saved and be lost. Pass frozen_changed=True."
                    )
            self._base_fingerprint = fingerprint
        types = sorted(mora_types(state.trainables))
        typed_key = is_typed_key(state.rng)
        record = CheckpointMetadata(
            step=step, data_state=data_state,
            mora_type=(types[0] if len(types) == 1 else types or None),
            frozen_changed=bool(frozen_changed), frozen_saved=bool(frozen_changed),
            rng_impl=str(jax.random.key_impl(state.rng)) if typed_key else None,
            run_config=self.run_config, meta=user_meta, frozen_fingerprint=fingerprint,
        )
        arrays = {
            "step": state.step,
            "trainables": state.trainables,
            "opt_state": state.opt_state,
            "rng": jax.random.key_data(state.rng) if typed_key else state.rng,
        }
        items = {STATE_ITEM: ocp.args.StandardSave(arrays), META_ITEM: ocp.args.JsonSave(record.to_json())}
        if frozen_changed:
            items[FROZEN_ITEM] = ocp.args.StandardSave(quant_storage.widen(state.frozen))  # no 4-bit on disk
        self.wait_until_finished()  # orbax waits for the previous save anyway; seal it
        try:
            saved = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
        except Exception as e:  # noqa: BLE001 -- a full disk is an OSError or a TensorStore ValueError
            error = self._write_error(step, e)
            if error is e:
                raise
            raise error from e
        if saved:
            self._pending = step
            if self._async:
                self._sealer = threading.Thread(target=self._seal_when_committed, args=(step,), daemon=True,
                                                name=f"mora_jax-seal-{step}")
                self._sealer.start()
            else:
                self.wait_until_finished()
        return saved

    # ---- sealing and retention ---------------------------------------------------------------------
    def _seal_when_committed(self, step: int) -> None:
        """Background thread: write the manifest the moment orbax has committed ``step``, so that a
        kill soon after leaves a verifiable step (retention waits for the main thread)."""
        try:
            self._manager.wait_until_finished()
            if self._local and jax.process_index() == 0 and self.step_dir(step).is_dir():
                integrity.write_manifest(self.step_dir(step))
        except BaseException as e:  # noqa: BLE001 -- raised by wait_until_finished in the main thread
            self._sealer_error = e

    def _seal_pending(self) -> None:
        """Record the manifest of the save that just finished, then apply ``max_to_keep``."""
        step, self._pending = self._pending, None
        if step is None or step not in self.all_steps():
            return
        if self._local and jax.process_index() == 0 and not self._has_manifest(step):
            integrity.write_manifest(self.step_dir(step))
        self._sealed.add(step)
        self._apply_retention()

    def _apply_retention(self) -> None:
        for old in integrity.steps_to_delete(self.all_steps(), self._sealed, self.max_to_keep,
                                             hold_before=self._hold_before):
            self._manager.delete(old)
            self._sealed.discard(old)

    def hold_before(self, step: int | None) -> None:
        """Keep the newest checkpoint older than ``step`` out of ``max_to_keep``'s rotation (the last
        good one of a run that has become unhealthy, :mod:`mora_jax.health`); None lets it rotate.
        A hold released or moved applies ``max_to_keep`` at once (unless a save is still being written)."""
        if step != self._hold_before:
            self._hold_before = step
            if self._pending is None and self.max_to_keep is not None:
                self._apply_retention()

    def _write_error(self, step: int | None, error: BaseException) -> BaseException:
        """``error`` as a :class:`CheckpointWriteError` saying what failed, how much space was free and
        which checkpoint is the last good one, when the file system refused a write; else ``error``."""
        reason = integrity.write_failure(error)
        if reason is None:
            return error
        self._failed = True
        try:
            kept = [s for s in self.all_steps() if s != step]
        except Exception:  # noqa: BLE001 -- listing the directory may fail as well
            kept = []
        space = integrity.describe_space(self.directory, self.step_dir(kept[-1]) if kept and self._local else None)
        last = (f"the last good checkpoint is step {kept[-1]} (kept)" if kept else "no checkpoint was saved before it")
        return CheckpointWriteError(
            f"saving checkpoint step {step} to {self.directory} failed: {reason}" + (f" ({space})" if space else "")
            + f"; stopping: {last}. Free some space (or lower checkpoint.keep), then run the same command to resume")

    def raise_if_failed(self) -> None:
        """Raise the error of an asynchronous save that has already failed (without waiting for one
        still being written), so that a run stops at once instead of at its next save."""
        if self._sealer is not None and not self._sealer.is_alive() and self._sealer_error is not None:
            self.wait_until_finished()

    def pending_step(self) -> int | None:
        """The step of a save started and not finished yet (None if there is none)."""
        return self._pending

    def sealed_steps(self) -> list[int]:
        """Steps whose save finished and whose manifest was written (ascending)."""
        return sorted(self._sealed & set(self.all_steps()))

    # ---- restore -----------------------------------------------------------------------------------
    def restore(self, step: int | None = None, *, abstract_state: TrainState, initial_frozen=None
                ) -> tuple[TrainState, dict | None, dict]:
        """Restore checkpoint ``step`` (default: the latest) into the structure of ``abstract_state``.

        Args:
          abstract_state: a TrainState whose leaves are ``jax.ShapeDtypeStruct`` (e.g. from
            ``jax.eval_shape`` of the code that builds the state) or arrays, for the run's config.
            Leaves that carry a ``sharding`` are restored with it; leaves without one get the sharding
            recorded at save time. The MoRA type is taken from the checkpoint (targets built with the
            run's initial type are fine: :func:`with_mora_type` is applied).
          initial_frozen: the frozen base weights as the run loads them from its source (the same
            tree as ``state.frozen`` at the start). Needed only when the checkpoint did not save
            them (``restore_metadata(step).frozen_saved`` is False); ignored otherwise.

        Returns:
          ``(state, data_state, meta)``: the restored TrainState, the data iterator's state and the
          ``meta`` dict given to :meth:`save`.
        """
        step = self._resolve_step(step)
        info = self.restore_metadata(step)
        if isinstance(info.mora_type, int):
            abstract_state = with_mora_type(abstract_state, info.mora_type)
        rng_target = abstract_state.rng
        if info.rng_impl is not None:
            key_data = jax.eval_shape(jax.random.key_data, rng_target)
            rng_sharding = getattr(rng_target, "sharding", None)  # valid for the key data too (one more axis)
            rng_target = jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=rng_sharding)
        target = jax.tree_util.tree_map(abstract_leaf, {
            "step": abstract_state.step,
            "trainables": abstract_state.trainables,
            "opt_state": abstract_state.opt_state,
            "rng": rng_target,
        })
        items = {STATE_ITEM: ocp.args.StandardRestore(target)}
        if info.frozen_saved:
            items[FROZEN_ITEM] = ocp.args.StandardRestore(
                quant_storage.widen(jax.tree_util.tree_map(abstract_leaf, abstract_state.frozen)))
        else:
            where = f"checkpoint {step} in {self.directory}"
            check_initial_frozen(where, info, abstract_state.frozen, initial_frozen)
            self._base_fingerprint = info.frozen_fingerprint or self._base_fingerprint
        targets = {name: arg.item for name, arg in items.items()}

        def check_structure():
            mismatch = checkpoint_resume.structure_mismatch(self._manager, step, targets)
            if mismatch is not None:
                raise CheckpointMismatch(checkpoint_resume.mismatch_message(
                    self.directory, step, mismatch, info.run_config, self.run_config))

        check_structure()  # before orbax tries (and logs a traceback per array), where it can tell already
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 -- orbax and tensorstore raise many kinds
            check_structure()
            # the run's structure, yet unreadable: the files are damaged
            raise CheckpointDamaged(step, f"restoring it failed: {checkpoint_resume.first_line(e)}") from e
        arrays = restored[STATE_ITEM]
        rng = arrays["rng"]
        if info.rng_impl is not None:
            rng = jax.random.wrap_key_data(rng, impl=info.rng_impl)
        frozen = (quant_storage.narrow_like(restored[FROZEN_ITEM], abstract_state.frozen) if info.frozen_saved
                  else initial_frozen)
        state = TrainState(step=arrays["step"], frozen=frozen, trainables=arrays["trainables"],
                           opt_state=arrays["opt_state"], rng=rng)
        return state, info.data_state, info.meta

    # ---- integrity and fallback (mora_jax.checkpoint.resume) ---------------------------------------
    def verify(self, step: int) -> StepCheck:
        """Check checkpoint ``step`` against its manifest and structure; on a multi-process run
        process 0 checks and every process gets its verdict."""
        self.wait_until_finished()
        return checkpoint_resume.verify(self, step)

    def set_aside(self, step: int, reason: str) -> pathlib.Path:
        """Move checkpoint ``step`` to ``<directory>/damaged/<step>-<time>`` (never deleted); returns
        where it went."""
        self.wait_until_finished()
        moved = checkpoint_resume.set_aside(self, step, reason)
        self._manager.reload()
        self._sealed.discard(step)
        return moved

    def restore_latest_good(self, *, abstract_state: TrainState, initial_frozen=None,
                            report: Callable[[str], None] = print) -> tuple[TrainState, dict | None, dict] | None:
        """:meth:`restore` the newest intact checkpoint, setting damaged ones aside
        (:func:`mora_jax.checkpoint.resume.restore_latest_good`); None when none is left."""
        return checkpoint_resume.restore_latest_good(self, abstract_state=abstract_state,
                                                     initial_frozen=initial_frozen, report=report)

    # ---- lifecycle ---------------------------------------------------------------------------------
    def wait_until_finished(self) -> None:
        """Block until pending asynchronous saves are written and committed, then seal them. A save
        the file system refused is a :class:`CheckpointWriteError`."""
        step = self._pending
        try:
            if self._sealer is not None:
                self._sealer.join()
                self._sealer = None
            self._manager.wait_until_finished()
            if self._sealer_error is not None:
                error, self._sealer_error = self._sealer_error, None
                raise error
            self._seal_pending()
        except Exception as e:  # noqa: BLE001 -- see _write_error
            error = self._write_error(step, e)
            if error is e:
                raise
            self._pending = None  # that save is not there to seal
            raise error from e

    def close(self) -> None:
        """Wait for pending saves, seal them and release orbax's resources. After a failed save was
        reported, what orbax still raises about it is not raised again."""
        reported = self._failed
        try:
            self.wait_until_finished()
        except Exception:  # noqa: BLE001
            if not reported:
                raise
        finally:
            try:
                self._manager.close()
            except Exception:  # noqa: BLE001
                if not self._failed:
                    raise

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


__all__ = ["MODES", "Checkpointer"]

"""Resuming from the newest intact checkpoint: verify, set damaged steps aside, fall back.

A preempted run restarts with :meth:`mora_jax.checkpoint.Checkpointer.restore_latest_good`, which
calls :func:`restore_latest_good` here. Newest step first, each is checked against its manifest
(:func:`mora_jax.checkpoint.integrity.check_step`); a damaged one is reported in one line, moved
to ``<directory>/damaged/`` (never deleted) and the previous one is tried. A step without a manifest
(killed between orbax's commit and the seal) is restored as it is; if reading it fails although its
stored arrays have the run's shapes and dtypes, it is damaged too. A restored state holding a NaN or
an infinity (which a run never saves) is damaged as well, so it is never trained on. Whatever is not
damage (a config that no longer fits the checkpoint, other base weights) is raised as before, so a
good checkpoint is never moved because of a mistake in the command line.

On a multi-process run process 0 reads the files and moves them; the others follow its verdict.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax.checkpoint import integrity
from mora_jax.checkpoint.integrity import CheckpointDamaged, StepCheck
from mora_jax.health import first_non_finite

_STATUSES = ("verified", "unverified", "damaged")


def first_line(error: BaseException) -> str:
    """``'<ErrorType>: <first line of its message>'`` (at most 300 characters of it)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def structure_mismatch(manager, step: int, targets: Mapping[str, Any]) -> str | None:
    """How the arrays stored in ``step`` of an orbax ``manager`` differ from ``targets`` (item name
    -> abstract tree), or None when they have the same shapes and dtypes, or when the stored
    description is itself unreadable (damage, not another config)."""
    try:
        stored = manager.item_metadata(step)
    except Exception:  # noqa: BLE001
        return None
    is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
    for name, target in targets.items():
        tree = stored[name] if name in stored.keys() else None
        tree = getattr(tree, "tree", tree)
        if tree is None:
            return None
        want = sorted((tuple(x.shape), str(jnp.dtype(x.dtype))) for x in jax.tree_util.tree_leaves(target))
        have = sorted((tuple(x.shape), str(jnp.dtype(x.dtype)))
                      for x in jax.tree_util.tree_leaves(tree, is_leaf=is_array) if is_array(x))
        if want != have:
            return (f"its {name!r} item holds {len(have)} arrays and this run's state {len(want)}; (shape, dtype) "
                    f"only stored: {sorted(set(have) - set(want))[:3]}, only expected: {sorted(set(want) - set(have))[:3]}")
    return None


def mismatch_message(directory, step: int, mismatch: str, stored_config: Mapping | None,
                     run_config: Mapping | None) -> str:
    """One line: checkpoint ``step`` does not fit this run's state (``mismatch``), with the settings
    that differ from the ones it was saved with, and the way out."""
    changed = config_changes(stored_config, run_config)  # those that shape the state first:
    changed.sort(key=lambda c: not c.startswith(("method", "model.", "adapter.", "optim.name", "remora.")))
    cause = (f"it was saved with other settings ({'; '.join(changed[:6])}{' ...' if len(changed) > 6 else ''})"
             if changed else "it was saved for another model or adapter layout")
    return (f"cannot restore step {step} of {directory} into this run's state: {cause}, and {mismatch}. Resume with "
            "the settings it was saved with, or start a new run (another workdir, or --config.checkpoint.mode="
            "overwrite to delete these checkpoints)")


def config_changes(old: Mapping | None, new: Mapping | None, prefix: str = "") -> list[str]:
    """``['adapter.r: 8 -> 64', ...]``: the leaves that differ between two nested run configs."""
    if not isinstance(old, Mapping) or not isinstance(new, Mapping):
        return [] if old == new or not prefix else [f"{prefix[:-1]}: {old!r} -> {new!r}"]
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if a != b:
            changes += config_changes(a, b, f"{prefix}{key}.") if isinstance(a, Mapping) and isinstance(b, Mapping) \
                else [f"{prefix}{key}: {a!r} -> {b!r}"]
    return changes


def non_finite_leaf(state, initial_frozen=None) -> str | None:
    """The first array of a restored TrainState (its frozen weights only if they came from the
    checkpoint, not ``initial_frozen``) holding a NaN or an infinity, or None."""
    tree = {"trainables": state.trainables, "opt_state": state.opt_state}
    if state.frozen is not initial_frozen:
        tree["frozen"] = state.frozen
    return first_non_finite(tree)


def verify(checkpointer, step: int) -> StepCheck:
    """Process 0's :func:`~mora_jax.checkpoint.integrity.check_step` of ``step``, on every process."""
    if not checkpointer._local:
        return StepCheck(step, "unverified")
    check = integrity.check_step(checkpointer.step_dir(step), step) if jax.process_index() == 0 else None
    if jax.process_count() == 1:
        return check
    from jax.experimental import multihost_utils

    code = _STATUSES.index(check.status) if check is not None else 0
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    return check if check is not None else StepCheck(step, _STATUSES[code], "see process 0's report")


def set_aside(checkpointer, step: int, reason: str):
    """Move ``step`` aside (process 0), then wait for every process; returns where it went."""
    if not checkpointer._local:
        raise CheckpointDamaged(step, f"{reason}; move it out of {checkpointer.directory} by hand and resume again")
    moved = integrity.set_aside(checkpointer.step_dir(step), reason) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"mora_jax.checkpoint.resume.set_aside.{step}")
    return moved or checkpointer.step_dir(step).parent / integrity.DAMAGED_DIR


def restore_latest_good(checkpointer, *, abstract_state, initial_frozen=None,
                        report: Callable[[str], None] = print):
    """The newest intact checkpoint of ``checkpointer``, restored (``(state, data_state, meta)``),
    or None when none is left; damaged steps are reported through ``report`` and set aside."""
    for step in reversed(checkpointer.all_steps()):
        check = checkpointer.verify(step)
        if not check.damaged:
            try:
                restored = checkpointer.restore(step, abstract_state=abstract_state, initial_frozen=initial_frozen)
            except CheckpointDamaged as e:
                if check.status == "verified":  # intact files orbax cannot read: not ours to move
                    raise
                check = StepCheck(step, "damaged", e.reason)
            else:
                bad = non_finite_leaf(restored[0], initial_frozen)
                if bad is None:
                    return restored
                # a run never saves such a state (mora_jax.loop); bytes changed without a manifest to tell
                check = StepCheck(step, "damaged", f"it holds NaN or infinite values ({bad}); training from it is "
                                                   "impossible")
        moved = checkpointer.set_aside(step, check.reason)
        if jax.process_index() == 0:
            report(f"checkpoint step {step} in {checkpointer.directory} is damaged ({check.reason}): moved it to "
                   f"{moved}; falling back to the previous checkpoint")
    return None


__all__ = ["config_changes", "first_line", "mismatch_message", "non_finite_leaf", "restore_latest_good", "set_aside", "structure_mismatch",
           "verify"]

"""The project's user errors: problems with what the user gave, as opposed to bugs.

A :class:`UserError` says what is wrong with a setting, a file, a workdir or a run, and what to do
about it, in its message. The entry points (``train/pretrain.py``, ``train/finetune.py``) print it as
one ``<task>: error: ...`` line and exit with status 1; any other exception is a bug and keeps its
traceback.

Each error class also keeps the standard base it had before (``ValueError``, ``RuntimeError``,
``FileExistsError``), so code that catches those still does. The classes near their concern
subclass :class:`UserError` (e.g. ``mora_jax.loop.TrainingDiverged``,
``mora_jax.checkpoint.workdir_lock.WorkdirLocked``, ``mora_jax.data.batching.BadRecordError``).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the run's inputs; its message names the problem and the fix (one line)."""


class ConfigError(UserError, ValueError):
    """A setting that cannot work (a value, a combination, or one that does not fit the model, the
    devices or the data); raised before anything compiles where it can be known then."""


__all__ = ["ConfigError", "UserError"]

"""Checkpoints of a training run: saving, manifests, resume past damage, metadata, the workdir lock.

Modules: ``checkpointer`` (:class:`Checkpointer`, orbax-backed, atomic and asynchronous),
``integrity`` (per-step manifests, damage checks, setting damaged steps aside), ``resume``
(restoring the newest good step), ``metadata`` (what each checkpoint records besides arrays),
``workdir_lock`` (one writer per workdir).
"""

from mora_jax.checkpoint.checkpointer import MODES, Checkpointer
from mora_jax.checkpoint.integrity import CheckpointDamaged
from mora_jax.checkpoint.metadata import CheckpointMetadata, with_mora_type
from mora_jax.checkpoint.workdir_lock import WorkdirLocked, hold

__all__ = ["MODES", "CheckpointDamaged", "CheckpointMetadata", "Checkpointer", "WorkdirLocked", "hold",
           "with_mora_type"]

"""Learning-rate schedules, including ReMoRA's restarts after each merge (``docs/mora.md``, "ReMoRA").

Every schedule is a pure function ``step -> lr`` usable inside ``jax.jit`` (an optax schedule).

Restart flavours (``restart_flavour``), with merges every ``restart_every`` steps (after the update of step ``s``):

* ``"reference"`` (the MoRA/ReMoRA code's default): after a merge at step ``s`` a new
  warm-up-plus-decay schedule starts, over the remaining steps, from the learning rate the previous
  schedule had reached at ``s``; its warm-up is ``restart_warmup`` steps from 0.
* ``"cosine_restarts"`` (ReLoRA): one global cosine (floor ``min_lr_ratio``), multiplied after each
  reset by a linear re-warm-up from 0 over ``restart_warmup`` steps.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

DECAYS = ("cosine", "linear", "constant")
FLAVOURS = ("reference", "cosine_restarts")


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """A schedule's parameters, resolved from an optimizer config and the run's length and merge period."""

    peak_lr: float
    total_steps: int
    warmup_steps: int
    decay: str
    min_lr_ratio: float
    restart_every: int
    restart_warmup: int
    flavour: str

    def __post_init__(self):
        if self.decay not in DECAYS:
            raise ValueError(f"unknown decay {self.decay!r}: choose one of {DECAYS}")
        if self.flavour not in FLAVOURS:
            raise ValueError(f"unknown restart flavour {self.flavour!r}: choose one of {FLAVOURS}")
        if self.total_steps <= 0:
            raise ValueError(f"the schedule needs a positive number of steps, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, {self.total_steps}] (the run's steps), got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.restart_every < 0 or self.restart_warmup < 0:
            raise ValueError("the merge period and restart_warmup must be >= 0")


def _warmup_decay(step, *, start, length, warmup, peak, floor, decay, xp=jnp):
    """Warm-up from 0 to ``peak`` over ``warmup`` steps, then decay to ``floor`` by ``start + length``.

    Elementwise in every argument (the cycle's ``start``, ``warmup``, ``peak``, ``floor`` may be
    arrays); ``xp=np`` computes it on the host."""
    t = xp.asarray(step, xp.float32 if xp is jnp else xp.float64) - start
    warm = peak * xp.clip(t / xp.maximum(warmup, 1), 0.0, 1.0)
    progress = xp.clip((t - warmup) / xp.maximum(length - warmup, 1), 0.0, 1.0)
    if decay == "cosine":
        shape = 0.5 * (1.0 + xp.cos(xp.pi * progress))
    elif decay == "linear":
        shape = 1.0 - progress
    else:
        shape = xp.ones_like(progress)
    decayed = floor + (peak - floor) * shape
    return xp.where(t < warmup, warm, decayed)


def _reference_cycles(cfg: _Schedule):
    """(start, warm-up, peak) of each restart cycle, computed ahead in float64 on the host."""
    floor = cfg.min_lr_ratio * cfg.peak_lr
    cycles = [(0, cfg.warmup_steps, cfg.peak_lr)]
    if cfg.restart_every:
        for start in range(cfg.restart_every, cfg.total_steps, cfg.restart_every):
            prev_start, prev_warmup, prev_peak = cycles[-1]
            lr_at = float(_warmup_decay(start, start=prev_start, length=cfg.total_steps - prev_start,
                                        warmup=prev_warmup, peak=prev_peak, floor=floor, decay=cfg.decay, xp=np))
            cycles.append((start, min(cfg.restart_warmup, cfg.total_steps - start), lr_at))
    return cycles


def make_schedule(optim, *, total_steps: int, restart_every: int = 0):
    """An optax-style schedule ``step -> learning rate``.

    ``optim`` holds the schedule's shape (an :class:`mora_jax.run_config.OptimConfig`, or anything
    with its fields ``lr``, ``warmup_steps``, ``decay``, ``min_lr_ratio``, ``restart_warmup`` and
    ``restart_flavour``); ``total_steps`` is the run's length and ``restart_every`` its ReMoRA/ReLoRA
    merge period (0 = no restarts), both owned by other config sections.
    """
    cfg = _Schedule(peak_lr=float(optim.lr), total_steps=int(total_steps), warmup_steps=int(optim.warmup_steps),
                    decay=optim.decay, min_lr_ratio=float(optim.min_lr_ratio), restart_every=int(restart_every),
                    restart_warmup=int(optim.restart_warmup), flavour=optim.restart_flavour)
    floor = cfg.min_lr_ratio * cfg.peak_lr
    base = lambda step: _warmup_decay(step, start=0, length=cfg.total_steps, warmup=cfg.warmup_steps,
                                      peak=cfg.peak_lr, floor=floor, decay=cfg.decay)
    if not cfg.restart_every:
        return base
    if cfg.flavour == "cosine_restarts":
        def schedule(step):
            step_f = jnp.asarray(step, jnp.float32)
            since = step_f - jnp.floor(step_f / cfg.restart_every) * cfg.restart_every
            rewarm = jnp.clip(since / max(cfg.restart_warmup, 1), 0.0, 1.0) if cfg.restart_warmup else 1.0
            return base(step) * jnp.where(step_f >= cfg.restart_every, rewarm, 1.0)
        return schedule

    cycles = _reference_cycles(cfg)
    starts, warmups, peaks = (np.array(column, np.float32) for column in zip(*cycles))

    def schedule(step):
        # the cycle a step is in, looked up (not one branch per cycle: a run with thousands of merges
        # compiles as fast as one with none)
        step_f = jnp.asarray(step, jnp.float32)
        cycle = jnp.clip(jnp.searchsorted(starts, step_f, side="right") - 1, 0, len(cycles) - 1)
        start, peak = jnp.asarray(starts)[cycle], jnp.asarray(peaks)[cycle]
        return _warmup_decay(step_f, start=start, length=cfg.total_steps - start, warmup=jnp.asarray(warmups)[cycle],
                             peak=peak, floor=jnp.minimum(floor, peak), decay=cfg.decay)

    return schedule

"""Is the run healthy? Finite is not enough: a run can collapse and go on producing finite numbers.

A learning rate far too high can kill a model in a few steps: every gradient becomes exactly zero
and the loss sits at ln(vocab), the loss of a uniform prediction, while every check for NaN passes.
Checkpoints saved after that are finite and useless, and with ``checkpoint.keep=3`` they soon
push out every checkpoint from before. :class:`HealthMonitor` watches each train step's metrics
for two signs, as large-scale trainers do:

* **collapse**: ``collapse_steps`` steps in a row whose gradient norm is exactly 0 (no update can
  change the weights any more) or whose loss is pinned at ln(vocab) (the model predicts nothing);
* **loss spike**: :data:`SPIKE_STEPS` losses in a row more than ``spike_zscore`` robust standard
  deviations above the median of the last ``spike_window`` healthy losses (robust z-score: the
  median and the median absolute deviation, so earlier spikes do not hide later ones; the deviation
  counts as at least :data:`MIN_SPREAD` nats, so that a nearly constant loss does not make every
  wobble a spike). One hard batch is one high loss and the next ones are normal again; a model an
  update has damaged stays high. Spikes are judged once a quarter of the window is filled.

The metrics of step ``s`` are computed on the state saved as checkpoint ``s - 1``, so a problem
first seen at step ``s`` makes checkpoints ``s - 1`` and later suspect: :attr:`Finding.bad_from`.
The loop (:mod:`mora_jax.loop`) keeps the newest checkpoint before it out of ``checkpoint.keep``'s
rotation while the problem lasts (from the first suspicious step, before it is confirmed), names it
in its messages (:func:`resume_advice`), and lets it rotate again once the run has recovered: as
many healthy steps in a row as it takes to fill a quarter of the spike window. A collapse stops the
run (``on_collapse="stop"``, the default) or is only reported (``"warn"``); a spike is reported.

Non-finite values are :class:`mora_jax.metrics.NonFiniteMetrics`; :func:`first_non_finite` checks
a whole tree of arrays (a restored state, the weights after a ReMoRA merge).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mora_jax.errors import ConfigError

ON_COLLAPSE = ("stop", "warn")
MIN_SPREAD = 0.1  # nats: the least robust standard deviation a spike is measured against
SPIKE_STEPS = 3  # high losses in a row that make a spike (a single one is a hard batch)
PINNED_TOLERANCE = 1e-4  # relative distance to ln(vocab) that counts as the uniform prediction
_MAD_TO_SIGMA = 1.4826  # median absolute deviation -> standard deviation of a normal distribution


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """What counts as an unhealthy run (``train.*`` fields of the run config; 0 turns a check off).

    Attributes:
      collapse_steps: steps in a row with a zero gradient norm or a loss pinned at ln(vocab) that
        mean the run has collapsed.
      on_collapse: ``"stop"`` the run (naming the checkpoint to resume from) or only ``"warn"``.
      spike_window: how many recent healthy losses a loss is compared with.
      spike_zscore: how many robust standard deviations above their median make a spike.
    """

    collapse_steps: int = 5
    on_collapse: str = "stop"
    spike_window: int = 100
    spike_zscore: float = 6.0

    def __post_init__(self):
        for name in ("collapse_steps", "spike_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"train.{name} must be an integer >= 0 (0 = off), got {value!r}")
        if self.on_collapse not in ON_COLLAPSE:
            raise ConfigError(f"train.on_collapse={self.on_collapse!r}: choose one of {ON_COLLAPSE}")
        if not (isinstance(self.spike_zscore, (int, float)) and math.isfinite(self.spike_zscore)
                and self.spike_zscore > 0):
            raise ConfigError(f"train.spike_zscore must be a finite number > 0, got {self.spike_zscore!r}")

    @property
    def history(self) -> int:
        """Healthy losses needed before spikes are judged, and healthy steps in a row that end a problem."""
        return max(self.spike_window // 4, 5)


@dataclasses.dataclass(frozen=True)
class Finding:
    """A problem seen in a run: ``kind`` ("collapse" or "spike"), the first step that showed it and
    what was seen."""

    kind: str
    onset: int
    detail: str

    @property
    def bad_from(self) -> int:
        """The first checkpoint step not known to be good (step ``onset`` was computed on it)."""
        return self.onset - 1

    def describe(self) -> str:
        what = "the run collapsed" if self.kind == "collapse" else "the loss spiked"
        return f"{what} at step {self.onset}: {self.detail}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class HealthMonitor:
    """Watches the metrics of every train step (see the module docstring).

    Feed it each step's metrics in order with :meth:`observe`; :meth:`pop_events` then gives the
    problems found (``("detected", finding)``) and ended (``("recovered", finding)``) since the
    last call, and :meth:`bad_from` the first checkpoint step that is not known to be good.
    """

    def __init__(self, config: HealthConfig = HealthConfig(), *, vocab_size: int | None = None):
        self.config = config
        self.uniform_loss = math.log(vocab_size) if vocab_size and vocab_size > 1 else None
        self.finding: Finding | None = None  # the problem going on, if any
        self._bad_from: int | None = None  # of the problems going on (a spike, then a collapse: the spike's)
        self._losses: collections.deque = collections.deque(maxlen=max(config.spike_window, 1))
        self._streak: list[tuple[int, float, float]] = []  # (step, loss, grad_norm) of a collapse streak
        self._high: list[tuple[int, float, float, float]] = []  # (step, loss, median, z) of losses above a spike's
        self._healthy_in_a_row = 0
        self._events: list[tuple[str, Finding]] = []
        self.last_step: int | None = None  # the newest step seen

    # ---- observing -------------------------------------------------------------------------------
    def observe(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One train step's metrics (``loss``, ``grad_norm``, ``tokens``; plain numbers)."""
        self.last_step = step
        loss, grad_norm = float(metrics.get("loss", math.nan)), float(metrics.get("grad_norm", math.nan))
        if float(metrics.get("tokens", 1.0)) <= 0 or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return  # nothing was learned from this batch / non-finite values are the writer's to report
        collapsed = self._collapse_signal(step, loss, grad_norm)
        spiked = not collapsed and self._spike(step, loss)
        if collapsed or spiked:
            self._healthy_in_a_row = 0
            return
        self._losses.append(loss)
        if self.finding is not None:
            self._healthy_in_a_row += 1
            if self._healthy_in_a_row >= self.config.history:
                self._events.append(("recovered", self.finding))
                self.finding, self._bad_from = None, None

    def _pinned(self, loss: float) -> bool:
        return self.uniform_loss is not None and abs(loss - self.uniform_loss) <= PINNED_TOLERANCE * self.uniform_loss

    def _collapse_signal(self, step: int, loss: float, grad_norm: float) -> bool:
        if not self.config.collapse_steps or not (grad_norm == 0.0 or self._pinned(loss)):
            self._streak = []
            return False
        self._streak.append((step, loss, grad_norm))
        if len(self._streak) >= self.config.collapse_steps and (self.finding is None or self.finding.kind == "spike"):
            self._report(Finding("collapse", self._streak[0][0], self._describe_streak()))
        return True

    def _describe_streak(self) -> str:
        n, first, last = len(self._streak), self._streak[0][0], self._streak[-1][0]
        zero = all(g == 0.0 for _, _, g in self._streak)
        pinned = all(self._pinned(loss) for _, loss, _ in self._streak)
        signs = ([f"the gradient norm has been 0 for {n} steps in a row (steps {first}-{last})"] if zero else []) + (
            [f"the loss is pinned at ln(vocab) = {self.uniform_loss:.4f}, the loss of a uniform prediction"
             + ("" if zero else f", for {n} steps in a row (steps {first}-{last})")] if pinned else [])
        return " and ".join(signs)

    def _spike(self, step: int, loss: float) -> bool:
        """Whether ``loss`` is above the spike threshold (then it is not one of the healthy losses)."""
        if not self.config.spike_window or len(self._losses) < self.config.history:
            self._high = []
            return False
        recent = np.asarray(self._losses)
        median = float(np.median(recent))
        spread = max(_MAD_TO_SIGMA * float(np.median(np.abs(recent - median))), MIN_SPREAD)
        z = (loss - median) / spread
        if z <= self.config.spike_zscore:
            self._high = []
            return False
        self._high.append((step, loss, median, z))
        if len(self._high) >= SPIKE_STEPS and self.finding is None:
            (first, _, median, _), (_, peak, _, z) = self._high[0], max(self._high, key=lambda h: h[1])
            self._report(Finding("spike", first, (
                f"{len(self._high)} losses in a row (steps {first}-{self._high[-1][0]}) above "
                f"train.spike_zscore={self.config.spike_zscore:g} robust standard deviations over the median "
                f"{median:.4f} of the last {len(recent)} healthy steps, up to {peak:.4f} (robust z-score {z:.1f})")))
        return True

    def _report(self, finding: Finding) -> None:
        self.finding = finding
        self._bad_from = min(finding.bad_from, self._bad_from if self._bad_from is not None else finding.bad_from)
        self._healthy_in_a_row = 0
        self._events.append(("detected", finding))

    # ---- what the loop asks ----------------------------------------------------------------------
    def pop_events(self) -> list[tuple[str, Finding]]:
        events, self._events = self._events, []
        return events

    def bad_from(self) -> int | None:
        """The first checkpoint step not known to be good: that of the problem going on, or of a
        collapse streak not yet long enough to be called one (None when all is well)."""
        suspects = (self._bad_from, self._streak[0][0] - 1 if self._streak else None,
                    self._high[0][0] - 1 if self._high else None)
        return min((b for b in suspects if b is not None), default=None)

    def hold_before(self) -> int | None:
        """Checkpoints from this step on are not known to be good: those from :meth:`bad_from` on
        while a problem (or a collapse streak) lasts, else those whose next step was not seen yet.
        The newest checkpoint before it stays out of rotation (``Checkpointer.hold_before``)."""
        bad_from = self.bad_from()
        return bad_from if bad_from is not None else self.last_step

    def describe(self) -> str | None:
        """The problem going on, or a collapse streak not yet long enough to be called one (None: neither)."""
        if self.finding is not None:
            return self.finding.describe()
        if self._streak:
            return f"the run was collapsing since step {self._streak[0][0]}: {self._describe_streak()}"
        if self._high:
            return f"the loss has been high since step {self._high[0][0]}"
        return None

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the monitor: the problem going on (losses are seen afresh)."""
        return {"finding": self.finding.to_json() if self.finding is not None else None, "bad_from": self._bad_from}

    def load_state_dict(self, state: Mapping | None) -> None:
        state = state if isinstance(state, Mapping) else {}
        finding = state.get("finding")
        self.finding = Finding(**finding) if isinstance(finding, Mapping) else None
        self._bad_from = state.get("bad_from") if self.finding is not None else None


# ---- messages ------------------------------------------------------------------------------------


_FIX = "a lower learning rate (optim.lr), gradient clipping (optim.clip_norm) or checked data"


def resume_advice(directory, steps: Sequence[int], bad_from: int | None, *, pending: int | None = None,
                  stopping: bool = False) -> str:
    """Which checkpoint in ``directory`` (holding ``steps``, and ``pending`` being written) to resume
    from when those from ``bad_from`` on are suspect, or that no good one is left; for a run that is
    ``stopping``, also what to change and how to resume from it."""
    steps = sorted(set(steps) | ({pending} if pending is not None else set()))
    good = [s for s in steps if bad_from is None or s < bad_from]
    later = [s for s in steps if s not in good]
    if not good:
        where = (f"the checkpoints kept, steps {_steps(later)}, are from step {bad_from} on, after the problem began"
                 if later else "no checkpoint was saved")
        return (f"no good checkpoint is left ({where})"
                + (f": start again with {_FIX}, in a new workdir or with --config.checkpoint.mode=overwrite"
                   if stopping else ""))
    advice = f"the last good checkpoint is step {good[-1]} in {directory}"
    move = (f"move the later ones aside (mkdir -p {directory}/unhealthy && mv "
            + " ".join(f"{directory}/{s}" for s in later) + f" {directory}/unhealthy/)") if later else ""
    if stopping:
        return advice + (f": to resume from it, {move} and run again with {_FIX}" if move
                         else f": resume from it by running again with {_FIX}")
    return advice + (f" (to resume from it, {move})" if move else "")


def _steps(steps: Sequence[int]) -> str:
    return ", ".join(str(s) for s in steps[:8]) + (" ..." if len(steps) > 8 else "")


# ---- finite trees --------------------------------------------------------------------------------


@jax.jit
def _all_finite(leaves):
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def first_non_finite(tree) -> str | None:
    """The key path of the first floating-point leaf of ``tree`` holding a NaN or an infinity, or
    None when every value is finite. One compiled program for the whole tree: with several
    processes, every one must call it (arrays sharded across them are checked where they live)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    floating = [(path, x) for path, x in flat if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not floating:
        return None
    finite = _all_finite([x for _, x in floating])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        finite = multihost_utils.process_allgather(finite, tiled=True)
    for (path, _), ok in zip(floating, np.asarray(jax.device_get(finite)).reshape(-1)):
        if not bool(ok):
            return jax.tree_util.keystr(path)
    return None


__all__ = ["MIN_SPREAD", "ON_COLLAPSE", "Finding", "HealthConfig", "HealthMonitor", "first_non_finite",
           "resume_advice"]

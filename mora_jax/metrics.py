"""What the user sees of a run: JSON-lines metrics, TensorBoard event files and a loss-curve PNG."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    if hasattr(value, "item") and np.ndim(value) == 0:  # jax scalars
        value = value.item()
    return value


class NonFiniteMetrics(FloatingPointError):
    """A step's loss, gradient norm or updated-parameter norm is NaN or infinite."""

    def __init__(self, step: int, name: str, value: float):
        super().__init__(f"{name} became {value} at step {step}")
        self.step, self.name, self.value = step, name, value


FINITE_KEYS = ("loss", "grad_norm", "trainables_norm")  # checked at every flush


class MetricsWriter:
    """What a run shows while it trains: ``metrics.jsonl``, TensorBoard scalars, a progress bar.

    Train steps hand their on-device metrics to :meth:`add` without waiting for them; :meth:`flush`
    fetches them in one transfer, checks that they are finite (:data:`FINITE_KEYS`; raises
    :class:`NonFiniteMetrics` naming the first bad step), and writes one line with their means and
    the throughput since the last flush: ``tokens_per_s``, the tokens in the loss per second (a
    fine-tuning batch has loss on the responses only), and ``positions_per_s``, every position the
    steps computed (padding and prompts included) per second. Time spent in :meth:`untimed` blocks
    (a step that compiles, callbacks) and the steps added with ``timed=False`` are left out of both.
    :meth:`write` writes other values (evaluations, merges) for a step. Only process 0 writes
    (``enabled=False`` elsewhere, which still checks).

    ``on_step(step, metrics)``, if given, sees each step's fetched metrics (plain numbers) in order,
    once they are known to be finite (``mora_jax.health.HealthMonitor.observe``).

    Opening a workdir that already has ``metrics.jsonl`` keeps its rows up to ``resume_step`` (the
    restored checkpoint's step; 0 for a fresh start) and drops the rest, including a partial last
    line left by a kill during a write, so the file stays one history with no step twice.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, resume_step: int = 0,
                 tensorboard: bool = True, progress_total: int | None = None,
                 on_step: Callable[[int, Mapping[str, float]], None] | None = None):
        self.workdir = pathlib.Path(workdir)
        self.enabled = enabled
        self.on_step = on_step
        self.path = self.workdir / "metrics.jsonl"
        self._tb = None
        self._progress = None
        self._pending: list[tuple[int, dict, int, bool]] = []
        self._untimed_from = None
        self.reset_clock()
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [json.dumps(row) for row in _read_rows(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
        if progress_total is not None:
            from tqdm import tqdm

            self._progress = tqdm(total=progress_total, initial=resume_step, desc="train", dynamic_ncols=True)

    def reset_clock(self) -> None:
        """Start measuring tokens/s afresh (after an evaluation or a merge: they are not training)."""
        self._tokens, self._positions, self._untimed, self._since = 0.0, 0, 0.0, time.perf_counter()

    @contextlib.contextmanager
    def untimed(self):
        """Leave the time spent inside out of the throughput (compiling, callbacks), also when a
        line is written from inside."""
        self._untimed_from = time.perf_counter()
        try:
            yield
        finally:
            self._untimed += time.perf_counter() - max(self._untimed_from, self._since)
            self._untimed_from = None

    def _elapsed(self) -> float:
        """Seconds since the clock was reset, less the untimed ones."""
        now = time.perf_counter()
        untimed = self._untimed + (now - max(self._untimed_from, self._since) if self._untimed_from is not None else 0.0)
        return now - self._since - untimed

    def add(self, step: int, device_metrics: Mapping[str, Any], *, positions: int = 0, timed: bool = True) -> None:
        """Queue one train step's metrics (device arrays, not fetched yet); ``positions``: the
        batch's size in tokens; ``timed=False``: a step left out of the throughput (its time was
        spent in :meth:`untimed`)."""
        self._pending.append((int(step), device_metrics, int(positions), bool(timed)))
        if self._progress is not None:
            self._progress.update(1)

    def flush(self, step: int) -> None:
        """Fetch the queued metrics, check them, and write their means as the line of ``step``."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        fetched = jax.device_get([m for _, m, _, _ in pending])
        for (s, *_), m in zip(pending, fetched):
            for key in FINITE_KEYS:
                if key in m and not np.isfinite(m[key]):
                    raise NonFiniteMetrics(s, key, float(m[key]))
            if self.on_step is not None:
                self.on_step(s, {k: float(v) for k, v in m.items()})
        timed = [(m, positions) for (_, _, positions, on), m in zip(pending, fetched) if on]
        self._tokens += sum(float(m["tokens"]) for m, _ in timed)
        self._positions += sum(positions for _, positions in timed)
        elapsed = self._elapsed()
        row = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm") if k in fetched[0]}
        row["learning_rate"] = float(fetched[-1]["learning_rate"])
        if timed:  # none when every step since the last line compiled
            row["tokens_per_s"] = self._tokens / max(elapsed, 1e-9)
            if self._positions:
                row["positions_per_s"] = self._positions / max(elapsed, 1e-9)
        self.write(step, row)
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", lr=f"{row['learning_rate']:.2e}",
                                       tok_s=f"{row.get('tokens_per_s', float('nan')):.0f}")
        self.reset_clock()

    def write(self, step: int, metrics: Mapping[str, float], *, prefix: str = "") -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{f"{prefix}{k}": _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, int(step))

    def history(self) -> list[dict]:
        return _read_rows(self.path) if self.path.exists() else []

    def close(self) -> None:
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _read_rows(path: pathlib.Path) -> list[dict]:
    """The JSON rows of a metrics file; a line that does not parse (a write cut short by a kill) is
    dropped."""
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_loss_curve(history: list[dict], path: str | os.PathLike, *, title: str = "") -> pathlib.Path | None:
    """Training (and evaluation, if present) loss against step, saved as a PNG. Returns the path, or
    None when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.2)
    accuracy = [(r["step"], r["accuracy"]) for r in history if "accuracy" in r]
    if accuracy:  # exact-match answer accuracy (mora_jax.accuracy) on a second axis
        acc_ax = ax.twinx()
        acc_ax.plot(*zip(*accuracy), "s--", color="tab:green", label="accuracy (%)", lw=1.2)
        acc_ax.set_ylabel("accuracy (%)")
        acc_ax.set_ylim(0, 100)
        acc_ax.legend(loc="lower left")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

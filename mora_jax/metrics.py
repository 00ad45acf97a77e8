"""What the user sees of a run: JSON-lines metrics, TensorBoard event files and a loss-curve PNG."""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Mapping

import numpy as np


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.item() if np.ndim(value) == 0 else value.tolist()
    if hasattr(value, "item") and np.ndim(value) == 0:  # jax scalars
        value = value.item()
    return value


class MetricsWriter:
    """Appends ``{"step": s, ...}`` lines to ``metrics.jsonl`` and scalars to TensorBoard under ``workdir``.

    Only process 0 writes (``enabled=False`` elsewhere). Re-opening the same workdir on resume
    appends; entries past the resumed step are dropped first so the file stays one history.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None,
                 tensorboard: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.enabled = enabled
        self.path = self.workdir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"))

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
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


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

"""What the comparisons share: a record per finished run (so a comparison resumes where it stopped),
mean ± std over seeds, the persistent compilation cache, progress lines and the learning-rate sweep's plot.

A run of a comparison lives in its own folder; when it finishes, :func:`cached_run` writes its
record to ``done.json`` there, and a later invocation reads the record instead of training again.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Callable

import numpy as np

DONE = "done.json"


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def _first_difference(old, new) -> str:
    a, b = _flat(old), _flat(new)
    key = next(k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return f"{key}: {a.get(key, '<absent>')!r} then, {b.get(key, '<absent>')!r} now"


def cached_run(workdir: pathlib.Path, train: Callable[[], dict], signature: dict | None = None) -> dict:
    """``train()``'s record, written to ``workdir/done.json``; read from there when it exists. The
    record is returned as read back from the file (a resumed comparison sees the same values).

    ``signature``: the settings the record depends on, stored with it; a record made with other
    settings is an error naming the first difference (results of two configurations never mix)."""
    done = pathlib.Path(workdir) / DONE
    signature = json.loads(json.dumps(signature)) if signature is not None else None
    if done.exists():
        record = json.loads(done.read_text())
        if signature is not None and record.get("signature") != signature:
            raise ValueError(f"{done} was made with other settings ({_first_difference(record.get('signature') or {}, signature)}): "
                             "use another --config.workdir, or delete that folder to train it again")
        return record
    record = train()
    if signature is not None:
        record = {**record, "signature": signature}
    done.parent.mkdir(parents=True, exist_ok=True)
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(done)  # whole or absent: a kill while writing leaves the run unfinished, not half-recorded
    return json.loads(done.read_text())


def mean_std(values, digits: int = 2) -> str:
    """``mean ± sample std`` of ``values`` (the mean alone for one value; non-finite values shown as such)."""
    values = np.asarray(values, float)
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def enable_compilation_cache(directory: pathlib.Path) -> None:
    """Keep compiled XLA programs in ``directory`` (``jax_compilation_cache_dir``), so that a resumed
    comparison, or a second one with the same shapes, does not compile them again."""
    import jax

    pathlib.Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(directory).absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


class Progress:
    """One line per run: ``[k/n] label``, the time since the start and, once runs have finished in
    this invocation, an estimate of the time left (by optimizer steps)."""

    def __init__(self, total_steps: int, total_runs: int, print_fn=print):
        self.total_steps, self.total_runs = total_steps, total_runs
        self.done_steps = self.done_runs = self.trained_steps = 0
        self.start = time.perf_counter()
        self.print = print_fn

    def run(self, label: str, steps: int, cached: bool) -> None:
        self.done_runs += 1
        elapsed = time.perf_counter() - self.start
        left = ""
        if self.trained_steps:
            remaining = self.total_steps - self.done_steps
            left = f", about {elapsed / self.trained_steps * remaining / 60:.0f} min left"
        state = "finished before, read from its done.json" if cached else f"{steps} steps"
        self.print(f"[{self.done_runs}/{self.total_runs}] {label}: {state} ({elapsed / 60:.1f} min so far{left})",
                   flush=True)

    def finished(self, steps: int, trained: bool) -> None:
        self.done_steps += steps
        if trained:
            self.trained_steps += steps


def plot_sweep(lines: dict, ylabel: str, path: pathlib.Path) -> None:
    """A learning-rate sweep: ``{label: [(lr, value), ...]}``, one line per method, log-scaled rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        if points:
            ax.plot(*zip(*points), "o-", ms=4, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["DONE", "Progress", "cached_run", "enable_compilation_cache", "mean_std", "plot_sweep"]

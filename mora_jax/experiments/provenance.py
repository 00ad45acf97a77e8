"""Where a result came from: the code, the software and the machine, recorded in every results file.

Numbers from different machines can differ (XLA compiles for the CPU it runs on: instruction set,
vector width and thread count change the order of floating-point sums), so a table is only
comparable with another when this record says they came from the same code on the same kind of
machine.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import platform
import subprocess
from importlib import metadata

PACKAGES = ("jax", "jaxlib", "libtpu", "flax", "optax", "orbax-checkpoint", "numpy", "sentencepiece")


def _git(*args: str) -> str | None:
    root = pathlib.Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(seeds=None) -> dict:
    """The commit (and whether the code had uncommitted changes: files under ``benchmarks/`` and
    ``results/`` do not count), package versions, machine and date."""
    import jax

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    # results being rewritten (by this very command, or one run beside it) do not change the code
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks", ":!results")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(status) if status is not None else None,
        "python": platform.python_version(),
        "packages": versions,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "jax_devices": [str(d) for d in jax.devices()],
                    "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "seeds": list(seeds) if seeds is not None else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def provenance_markdown(record: dict) -> str:
    """One paragraph for a results table: seeds, machine, software and commit."""
    pkgs = record["packages"]
    commit = (record["commit"] or "unknown")[:12] + (" (with uncommitted changes)" if record["uncommitted_changes"] else "")
    seeds = ", ".join(str(s) for s in record["seeds"]) if record.get("seeds") else "n/a"
    return (f"Seeds {seeds}; {record['machine']['cpu']} ({record['machine']['cores']} cores); "
            f"Python {record['python']}, jax {pkgs['jax']}, flax {pkgs['flax']}, optax {pkgs['optax']}; "
            f"commit {commit}; {record['date']}.")


__all__ = ["cpu_model", "provenance", "provenance_markdown"]

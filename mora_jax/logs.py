"""Quiet logs: other libraries' INFO lines (orbax's ``CheckpointManager created ...``, absl, jax) only
on request, so that a run's own lines and its progress bar stay readable.

The entry points under ``train/`` call :func:`apply_verbosity_flag` once their flags are parsed:
without ``--verbosity`` (``-v``) only warnings and errors of other libraries are shown;
``--verbosity=0`` shows their INFO lines, ``--verbosity=1`` their DEBUG lines. ``mora_jax``'s own
log lines are shown at INFO in either case.
"""

from __future__ import annotations

import logging

from absl import flags
from absl import logging as absl_logging

# Loggers of the libraries a run uses that log at INFO through Python's logging.
THIRD_PARTY_LOGGERS = ("absl", "orbax", "jax", "tensorstore", "etils", "datasets", "fsspec", "urllib3", "httpx")


def quiet_third_party(level: int = logging.WARNING) -> None:
    """Show other libraries' log lines from ``level`` up; keep ``mora_jax``'s at INFO."""
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    logging.getLogger("mora_jax").setLevel(min(level, logging.INFO))


def apply_verbosity_flag() -> None:
    """For an absl entry point, after flag parsing: quiet unless ``--verbosity`` was given."""
    verbosity = flags.FLAGS["verbosity"]
    if verbosity.present:
        level = absl_logging.converter.absl_to_standard(min(int(verbosity.value), 1))
        quiet_third_party(level)
        return
    absl_logging.set_verbosity(absl_logging.WARNING)
    quiet_third_party(logging.WARNING)


__all__ = ["THIRD_PARTY_LOGGERS", "apply_verbosity_flag", "quiet_third_party"]

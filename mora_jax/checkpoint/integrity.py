"""What a checkpoint step holds on disk, a manifest of it, and the checks that tell good from damaged.

A checkpoint step is the directory ``<root>/<step>/`` that orbax renames into place once every file
of it is written. It holds the items ``state`` and ``meta`` (and ``frozen`` when the frozen base
weights were saved). Renaming makes a save atomic but says nothing about what happens to the files
afterwards (a disk that fills, a copy cut short, bytes zeroed by a bad block), so each step is
*sealed* once its save has finished:

* :func:`write_manifest` records every file of the step with its size and CRC-32 in
  ``<step>/mora_manifest.json`` (written to a temporary name, synced and renamed);
* :func:`check_step` checks a step before it is restored: the items it must have, a readable
  ``meta`` JSON, and every file against the manifest. A step without a manifest (its process was
  killed after orbax committed it and before the seal) is ``unverified``, not damaged: its structure
  is checked and restoring it is the rest of the test;
* :func:`set_aside` moves a damaged step to ``<root>/damaged/<step>-<UTC time>`` (outside orbax's
  step names, so it is no longer a checkpoint) with a ``DAMAGED.txt`` saying why. Nothing is deleted;
* :func:`steps_to_delete` is the retention rule: a step is deleted only when ``keep`` newer steps
  are sealed, so the last good checkpoint is never pushed out by newer ones that are not.

The module knows files and JSON only (no JAX, no orbax), so it can be tested on plain directories.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import re
import shutil
import zlib
from typing import Iterable, Literal, Mapping

from mora_jax.errors import UserError

STATE_ITEM, FROZEN_ITEM, META_ITEM = "state", "frozen", "meta"
METADATA_FORMAT = "mora_jax.checkpoint/1"  # of the meta item (mora_jax.checkpoint.CheckpointMetadata)
META_FILE = "metadata"  # the meta item's JSON file, as orbax's JsonSave names it
ITEM_METADATA_FILE = "_METADATA"  # orbax's tree metadata file of an array item
MANIFEST_FILE = "mora_manifest.json"
MANIFEST_FORMAT = "mora_jax.checkpoint_manifest/1"
DAMAGED_DIR = "damaged"
DAMAGED_NOTE = "DAMAGED.txt"
_CHUNK = 8 << 20

Status = Literal["verified", "unverified", "damaged"]


class CheckpointDamaged(UserError, ValueError):
    """A checkpoint step whose files cannot be read back although they have the run's structure."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint step {step} is damaged: {reason}")
        self.step, self.reason = step, reason


class CheckpointsExist(UserError, FileExistsError):
    """``mode='new'`` on a directory that already holds checkpoints of an earlier run."""


class CheckpointMismatch(UserError, ValueError):
    """A checkpoint that does not fit this run: its arrays have other shapes (another config), or the
    base weights given are not those it was trained from."""


class CheckpointWriteError(UserError, OSError):
    """Saving a checkpoint failed for a reason of the file system (a full disk, a quota, no
    permission): the message says which step and directory, why, how much space was free, and which
    checkpoint is the last good one."""


def write_failure(error: BaseException) -> str | None:
    """Why writing failed (``'No space left on device'``) when ``error`` or one it was raised from is
    an ``OSError`` or a TensorStore error carrying an OS error code; None for anything else (a bug)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.strerror or os.strerror(error.errno)
        code = re.search(r"\[os_error_code='?(\d+)'?\]", str(error))
        if code and int(code.group(1)):
            return os.strerror(int(code.group(1)))
        error = error.__cause__ or error.__context__
    return None


def describe_space(directory: str | os.PathLike, step_dir: str | os.PathLike | None = None) -> str:
    """``'12.0 MiB free on the file system of DIR; a checkpoint takes about 3.1 MiB'`` (what can be known)."""
    parts = []
    try:
        parts.append(f"{_size(shutil.disk_usage(directory).free)} free on the file system of {directory}")
    except OSError:
        pass
    if step_dir is not None and pathlib.Path(step_dir).is_dir():
        total = sum(p.stat().st_size for p in _step_files(pathlib.Path(step_dir)))
        parts.append(f"a checkpoint takes about {_size(total)}")
    return "; ".join(parts)


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class ManifestError(ValueError):
    """A manifest that cannot be read (its file is damaged)."""


@dataclasses.dataclass(frozen=True)
class StepCheck:
    """The verdict on one checkpoint step.

    Attributes:
      step: the step.
      status: ``'verified'`` (every file matches the manifest), ``'unverified'`` (no manifest: the
        structure is fine, the bytes could not be checked) or ``'damaged'``.
      reason: for a damaged step, what is wrong (a short phrase, e.g. ``'state/d/1a2b is truncated
        (100 of 289 bytes)'``).
    """

    step: int
    status: Status
    reason: str = ""

    @property
    def damaged(self) -> bool:
        return self.status == "damaged"


def _crc32(path: pathlib.Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _step_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every regular file of a step except the manifest (and a manifest write cut short)."""
    return sorted(p for p in step_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(MANIFEST_FILE) and not p.is_symlink())


def build_manifest(step_dir: str | os.PathLike) -> dict:
    """``{"format", "created", "files": {relative path: {"size", "crc32"}}}`` of a step directory."""
    step_dir = pathlib.Path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): {"size": p.stat().st_size, "crc32": _crc32(p)}
             for p in _step_files(step_dir)}
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {"format": MANIFEST_FORMAT, "created": created, "files": files}


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(step_dir: str | os.PathLike) -> dict:
    """Seal a committed step: write its manifest atomically (temporary file, fsync, rename)."""
    step_dir = pathlib.Path(step_dir)
    manifest = build_manifest(step_dir)
    tmp = step_dir / f"{MANIFEST_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST_FILE)
    _fsync_dir(step_dir)
    return manifest


def read_manifest(step_dir: str | os.PathLike) -> dict | None:
    """The step's manifest, None if it has none; :class:`ManifestError` if it is unreadable."""
    path = pathlib.Path(step_dir) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"its manifest {MANIFEST_FILE} is not valid JSON ({e})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
            and isinstance(manifest.get("files"), dict)):
        raise ManifestError(f"its manifest {MANIFEST_FILE} is not a {MANIFEST_FORMAT} manifest")
    return manifest


def _read_meta(step_dir: pathlib.Path) -> tuple[dict | None, str]:
    """The meta item's JSON record, or None and what is wrong with it."""
    path = step_dir / META_ITEM / META_FILE
    if not path.is_file():
        return None, f"the {META_ITEM} item is missing ({META_ITEM}/{META_FILE})"
    try:
        record = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"{META_ITEM}/{META_FILE} is not valid JSON ({e})"
    if not isinstance(record, dict) or record.get("format") != METADATA_FORMAT:
        return None, f"{META_ITEM}/{META_FILE} is not {METADATA_FORMAT} metadata"
    return record, ""


def _manifest_problems(step_dir: pathlib.Path, manifest: Mapping) -> list[str]:
    problems = []
    for name, expected in sorted(manifest["files"].items()):
        path = step_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != expected.get("size"):
            what = "truncated" if size < expected.get("size", 0) else "longer than written"
            problems.append(f"{name} is {what} ({size} of {expected.get('size')} bytes)")
        elif _crc32(path) != expected.get("crc32"):
            problems.append(f"{name} does not match its checksum (bytes changed after the save)")
    return problems


def check_step(step_dir: str | os.PathLike, step: int) -> StepCheck:
    """Whether checkpoint ``step`` in ``step_dir`` is intact (see :class:`StepCheck`)."""
    step_dir = pathlib.Path(step_dir)
    damaged = lambda reason: StepCheck(step, "damaged", reason)  # noqa: E731
    if not step_dir.is_dir():
        return damaged("its directory is missing")
    if not any(step_dir.iterdir()):
        return damaged("its directory is empty")
    try:
        manifest = read_manifest(step_dir)
    except ManifestError as e:
        return damaged(str(e))
    record, problem = _read_meta(step_dir)
    if record is None:
        return damaged(problem)
    needed = [STATE_ITEM] + ([FROZEN_ITEM] if record.get("frozen_saved") else [])
    for item in needed:
        if not (step_dir / item / ITEM_METADATA_FILE).is_file():
            what = "is missing" if not (step_dir / item).is_dir() else f"has no {ITEM_METADATA_FILE}"
            return damaged(f"the {item} item {what}")
    if manifest is None:
        return StepCheck(step, "unverified")
    problems = _manifest_problems(step_dir, manifest)
    if problems:
        more = f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""
        return damaged(problems[0] + more)
    return StepCheck(step, "verified")


def set_aside(step_dir: str | os.PathLike, reason: str) -> pathlib.Path:
    """Move a damaged step to ``<root>/damaged/<step>-<UTC time>`` with a note; returns the new path."""
    step_dir = pathlib.Path(step_dir)
    damaged_root = step_dir.parent / DAMAGED_DIR
    damaged_root.mkdir(exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = damaged_root / f"{step_dir.name}-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = damaged_root / f"{step_dir.name}-{stamp}-{n}"
    os.rename(step_dir, target)
    try:
        (target / DAMAGED_NOTE).write_text(f"checkpoint step {step_dir.name} was set aside on resume: {reason}\n")
    except OSError:
        pass  # the move is what matters
    return target


def steps_to_delete(steps: Iterable[int], sealed: Iterable[int], keep: int | None, *,
                    hold_before: int | None = None) -> list[int]:
    """Old steps to delete so that ``keep`` sealed steps remain: those older than the ``keep``-th
    newest sealed step. Nothing is deleted until ``keep`` steps are sealed, and a step newer than
    that one (sealed or not) is never deleted. With ``hold_before``, the newest step older than it
    is kept too (the last good checkpoint of a run that has become unhealthy: ``mora_jax.health``)."""
    if keep is None:
        return []
    steps = set(steps)
    sealed = sorted(set(sealed) & steps)
    if len(sealed) <= keep:
        return []
    oldest_kept = sealed[-keep]
    held = max((s for s in steps if s < hold_before), default=None) if hold_before is not None else None
    return sorted(s for s in steps if s < oldest_kept and s != held)


__all__ = [
    "CheckpointDamaged",
    "CheckpointMismatch",
    "CheckpointWriteError",
    "CheckpointsExist",
    "DAMAGED_DIR",
    "FROZEN_ITEM",
    "MANIFEST_FILE",
    "META_ITEM",
    "METADATA_FORMAT",
    "STATE_ITEM",
    "ManifestError",
    "StepCheck",
    "build_manifest",
    "check_step",
    "describe_space",
    "read_manifest",
    "set_aside",
    "steps_to_delete",
    "write_failure",
    "write_manifest",
]

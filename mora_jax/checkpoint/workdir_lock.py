"""One writer per workdir: an exclusive lock held for the whole of a run.

Two runs writing one workdir corrupt each other's checkpoints and interleave ``metrics.jsonl``, so
:func:`mora_jax.loop.run` holds ``<workdir>/run.lock`` from start to end (on process 0 of a
multi-process run, which alone writes the workdir's files):

* the lock is an ``flock`` on the file, which the kernel releases when its process dies however
  it dies; the file also names the holder (pid, host, start time, command) for the error message;
* a second run gets :class:`WorkdirLocked` naming the holder;
* a lock file left by a process that is gone (this host, pid not running or reused) is taken over,
  with one line saying so. One left by another host cannot be checked from here: it is reported
  with the command that removes it once you know that run has ended;
* the lock is released when the run ends, also on an exception, and the file removed;
* the lock file is never followed as a symbolic link (a link there is refused, so no file elsewhere
  is written through it), and a lock file that holds no lock record (garbage) is reported as such,
  with the command that removes it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import sys
from typing import Callable, Iterator

from mora_jax.errors import UserError

LOCK_FILE = "run.lock"


class WorkdirLocked(UserError, RuntimeError):
    """Another run holds the workdir's lock."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    current = _process_start(pid)
    return start is None or current is None or current == start


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
            + (f" ({holder['command']})" if holder.get("command") else ""))


class WorkdirLock:
    """The exclusive lock of ``workdir``; :meth:`acquire` / :meth:`release`, or use it as a context."""

    def __init__(self, workdir: str | os.PathLike, *, report: Callable[[str], None] = print):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / LOCK_FILE
        self.report = report
        self._fd: int | None = None

    def _read_holder(self, fd: int) -> dict | None:
        """The lock record in the file; None for an empty file; ``{"garbage": text}`` for anything
        else than a record (``pid``, ``host``) a run wrote."""
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        if not raw.strip():
            return None
        try:
            holder = json.loads(raw)
        except (ValueError, RecursionError):
            holder = None
        if not (isinstance(holder, dict) and "pid" in holder and "host" in holder):
            return {"garbage": raw[:60].decode(errors="replace")}
        return holder

    def _open(self) -> int:
        """The lock file's descriptor, never through a symbolic link (:class:`WorkdirLocked` if it is one)."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno != errno.ELOOP and not self.path.is_symlink():
                raise
            raise WorkdirLocked(
                f"{self.path} is a symbolic link (to {os.readlink(self.path)}), not a lock file; refusing to write "
                f"through it. Remove the link (rm {self.path}; its target is left alone) and run again") from None

    def acquire(self) -> "WorkdirLock":
        """Take the lock or raise :class:`WorkdirLocked` naming the run that holds it."""
        if self._fd is not None:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_holder(fd)
                os.close(fd)
                who = _describe(holder) if holder and "garbage" not in holder else "another process"
                raise WorkdirLocked(
                    f"workdir {self.workdir} is in use by another run ({who}): two runs must not write one "
                    "workdir. Wait for it to finish or stop it, or choose another --config.workdir"
                ) from None
            try:
                same_file = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        try:
            self._check_stale(self._read_holder(fd))
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                      "process_start": _process_start(os.getpid()), "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _check_stale(self, holder: dict | None) -> None:
        """The lock is ours; a holder still named in the file left without releasing it."""
        if holder is None:
            return
        if "garbage" in holder:  # we hold the flock, yet cannot tell who wrote this (or whether it is a lock)
            raise WorkdirLocked(
                f"the lock file {self.path} is unreadable: it holds no lock record but {holder['garbage']!r}. No run "
                f"on this host holds it now; if no run on another host uses this workdir, remove it (rm {self.path}) "
                "and run again")
        if holder.get("host") != socket.gethostname():
            raise WorkdirLocked(
                f"workdir {self.workdir} is locked by a run on another host ({_describe(holder)}); this host "
                f"cannot tell whether it is still running. If it is not, remove the lock with: rm {self.path}"
            )
        pid = holder.get("pid")
        if isinstance(pid, int) and pid != os.getpid() and _alive(pid, holder.get("process_start")):
            # alive yet not holding the flock: a file system without flock; do not take it over
            raise WorkdirLocked(
                f"workdir {self.workdir} is in use by another run ({_describe(holder)}). If that run is not "
                f"writing here, remove the lock with: rm {self.path}"
            )
        self.report(f"taking over the stale lock of {self.workdir} left by a run that is gone ({_describe(holder)})")

    def release(self) -> None:
        """Remove the lock file and release the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if os.fstat(fd).st_ino == os.lstat(self.path).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, *, report: Callable[[str], None] = print) -> Iterator[WorkdirLock | None]:
    """Hold ``workdir``'s lock for the ``with`` block: taken by process 0 of a multi-process run
    (the one that writes the workdir), whose outcome every process follows."""
    import jax

    lock = WorkdirLock(workdir, report=report) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            lock.acquire()
        except WorkdirLocked as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
        if failed and error is None:
            raise WorkdirLocked(f"process 0 could not lock workdir {workdir} (see its error)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


__all__ = ["LOCK_FILE", "WorkdirLock", "WorkdirLocked", "hold"]

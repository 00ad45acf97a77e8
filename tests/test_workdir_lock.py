"""One writer per workdir: a second run is refused with the holder named, a stale lock left by a
dead process is taken over, a lock from another host is reported with how to remove it, and the
lock is released on every exit."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from mora_jax.checkpoint import workdir_lock
from mora_jax.checkpoint.workdir_lock import LOCK_FILE, WorkdirLock, WorkdirLocked

_HOLD = textwrap.dedent("""
    import sys, time
    from mora_jax.checkpoint.workdir_lock import WorkdirLock
    WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lock_is_refused_with_the_holder_named(tmp_path):
    first = WorkdirLock(tmp_path / "run").acquire()
    holder = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(WorkdirLocked) as err:
        WorkdirLock(tmp_path / "run").acquire()
    message = str(err.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started {holder['started']}" in message
    assert "in use by another run" in message and "--config.workdir" in message
    first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with WorkdirLock(tmp_path / "run") as again:
        assert again.held


def test_a_lock_held_by_another_process_and_taken_over_once_it_is_killed(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirLocked, match=f"pid {holder.pid} on host"):
            WorkdirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert (tmp_path / LOCK_FILE).exists()  # a killed run cannot clean up; the kernel dropped its flock
    lines = []
    with WorkdirLock(tmp_path, report=lines.append):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(lines) == 1 and "stale lock" in lines[0] and f"pid {holder.pid}" in lines[0]


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path):
    pid = _dead_pid()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "earlier"}))
    lines = []
    lock = WorkdirLock(tmp_path, report=lines.append).acquire()
    assert lock.held and len(lines) == 1 and f"pid {pid}" in lines[0]
    lock.release()


def test_a_lock_file_from_another_host_is_reported_with_how_to_remove_it(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 4242, "host": "node-17", "started": "2024-05-01T10:00:00"}))
    with pytest.raises(WorkdirLocked) as err:
        WorkdirLock(tmp_path).acquire()
    message = str(err.value)
    assert "pid 4242 on host node-17, started 2024-05-01T10:00:00" in message
    assert f"rm {tmp_path / LOCK_FILE}" in message
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "node-17"  # left as it was


def test_the_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with workdir_lock.hold(tmp_path):
            assert (tmp_path / LOCK_FILE).exists()
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK_FILE).exists()
    with workdir_lock.hold(tmp_path) as lock:
        assert lock.held
        with pytest.raises(WorkdirLocked):
            with workdir_lock.hold(tmp_path):
                pass
        assert (tmp_path / LOCK_FILE).exists()  # the refused second run did not remove the first one's lock
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_symlinked_lock_file_is_refused_and_its_target_left_alone(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("not a lock")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).symlink_to(target)
    with pytest.raises(WorkdirLocked) as err:
        WorkdirLock(tmp_path / "run").acquire()
    message = str(err.value)
    assert "is a symbolic link" in message and f"rm {tmp_path / 'run' / LOCK_FILE}" in message
    assert "\n" not in message
    assert target.read_text() == "not a lock"  # not truncated, not written through
    (tmp_path / "run" / LOCK_FILE).unlink()
    (tmp_path / "run" / LOCK_FILE).symlink_to(tmp_path / "missing")  # a dangling link: nothing created there
    with pytest.raises(WorkdirLocked, match="is a symbolic link"):
        WorkdirLock(tmp_path / "run").acquire()
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize("content", ["garbage \x00\x01", "[1, 2]", '{"note": "no pid or host"}'])
def test_a_garbage_lock_file_is_reported_as_unreadable_with_the_fix(tmp_path, content):
    (tmp_path / LOCK_FILE).write_text(content)
    with pytest.raises(WorkdirLocked) as err:
        WorkdirLock(tmp_path).acquire()
    message = str(err.value)
    assert "is unreadable: it holds no lock record" in message and f"rm {tmp_path / LOCK_FILE}" in message
    assert "locked by a run on another host" not in message and "pid ?" not in message
    assert (tmp_path / LOCK_FILE).read_text() == content  # left as it was

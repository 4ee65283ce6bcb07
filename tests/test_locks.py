"""autodeco.locks.OutputDirLock: exclusive, stale locks taken over, clear one-line refusals (no torch needed)."""

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from autodeco.locks import LOCK_NAME, OutputDirLock, OutputDirLocked, lock_is_stale, pid_alive, read_lock

LOCKS_PY = Path(__file__).resolve().parents[1] / "autodeco" / "locks.py"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(directory: Path, **fields) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "hostname": socket.gethostname(), "command": "eval", "started": "2026-01-01T00:00:00+00:00",
              "token": "x", **fields}
    (directory / LOCK_NAME).write_text(json.dumps(record))
    return directory / LOCK_NAME


def test_lock_file_records_the_holder_and_is_removed_on_exit(tmp_path):
    out = tmp_path / "new" / "out"
    with OutputDirLock(out, "train") as lock:
        holder = read_lock(out / LOCK_NAME)
        assert lock.held and holder["pid"] == os.getpid() and holder["hostname"] == socket.gethostname()
        assert holder["command"] == "train" and holder["started"].startswith("20")
    assert not (out / LOCK_NAME).exists() and not lock.held


def test_released_on_an_exception_too(tmp_path):
    with pytest.raises(KeyError):
        with OutputDirLock(tmp_path, "eval"):
            raise KeyError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_second_lock_is_refused_in_one_line_naming_dir_and_pid(tmp_path):
    with OutputDirLock(tmp_path, "eval"):
        with pytest.raises(OutputDirLocked) as info:
            OutputDirLock(tmp_path, "eval").acquire()
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and f"pid {os.getpid()}" in message
    assert "autodeco eval" in message and LOCK_NAME in message
    assert isinstance(info.value, FileExistsError)  # a CLI user error: exit 2


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path):
    write_lock(tmp_path, pid=dead_pid())
    with OutputDirLock(tmp_path, "eval"):
        assert read_lock(tmp_path / LOCK_NAME)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()


def test_reused_pid_is_stale(tmp_path):
    lock = write_lock(tmp_path, pid=os.getpid(), pid_start="1")  # our pid, but a different process start time
    assert lock_is_stale(read_lock(lock), lock)
    with OutputDirLock(tmp_path, "eval"):
        pass


def test_lock_from_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), hostname="some-other-host")
    with pytest.raises(OutputDirLocked, match="some-other-host"):
        OutputDirLock(tmp_path, "eval").acquire()


def test_empty_lock_file_is_being_written_then_stale_when_old(tmp_path):
    lock = tmp_path / LOCK_NAME
    lock.write_text("")
    with pytest.raises(OutputDirLocked, match="still being written"):
        OutputDirLock(tmp_path, "eval").acquire()
    old = time.time() - 60
    os.utime(lock, (old, old))
    with OutputDirLock(tmp_path, "eval"):
        assert read_lock(lock)["pid"] == os.getpid()


def test_release_keeps_a_lock_that_is_no_longer_ours(tmp_path):
    lock = OutputDirLock(tmp_path, "eval").acquire()
    write_lock(tmp_path, token="someone-else")
    lock.release()
    assert read_lock(tmp_path / LOCK_NAME)["token"] == "someone-else"


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        OutputDirLock(tmp_path / "f", "eval").acquire()


def test_pid_alive():
    assert pid_alive(os.getpid()) and not pid_alive(dead_pid()) and not pid_alive(0) and not pid_alive(None)


def test_racing_threads_take_a_stale_lock_exactly_once(tmp_path):
    write_lock(tmp_path, pid=dead_pid())
    winners, refused, barrier = [], [], threading.Barrier(8)

    def contend():
        barrier.wait()
        try:
            winners.append(OutputDirLock(tmp_path, "eval").acquire())
        except OutputDirLocked:
            refused.append(1)

    threads = [threading.Thread(target=contend) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(refused) == 7


def test_a_killed_holder_process_leaves_a_lock_that_is_taken_over(tmp_path):
    """A real second process holds the lock (refused meanwhile); after kill -9 the lock is taken over."""
    code = (f"import importlib.util, sys, time; spec = importlib.util.spec_from_file_location('locks', {str(LOCKS_PY)!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            f"m.OutputDirLock({str(tmp_path)!r}, 'train').acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirLocked, match=re.escape(f"pid {proc.pid}")):
            OutputDirLock(tmp_path, "eval").acquire()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    with OutputDirLock(tmp_path, "eval"):
        assert read_lock(tmp_path / LOCK_NAME)["command"] == "eval"

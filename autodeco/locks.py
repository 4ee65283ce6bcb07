"""Output-directory locks: one `autodeco` run writes into a directory at a time.

    with OutputDirLock(output_dir, "eval"):      # creates output_dir/.autodeco.lock (O_CREAT | O_EXCL)
        ...                                      # a second run on output_dir raises OutputDirLocked (exit 2)

The lock file is JSON: pid, hostname, the process's start time (Linux /proc, guards against pid reuse), the
command, when it started and a random token. A lock left by a killed run is stale when its host is this host and
its pid is dead (or now belongs to another process): it is taken over. A lock from another host is never taken
over automatically; the error says how to remove it. Under a multi-process launch (accelerate, torchrun: RANK is
set) only rank 0 takes the lock, for the whole run; the other ranks' locks are no-ops. Standard library only.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["LOCK_NAME", "OutputDirLock", "OutputDirLocked", "read_lock", "pid_alive", "lock_is_stale"]

LOCK_NAME = ".autodeco.lock"
# A lock file that is empty or half-written is being created by its owner right now, unless it is this old.
_UNWRITTEN_GRACE_S = 5.0
# The takeover guard (see _take_over) of a process that died while holding it is ignored after this long.
_TAKEOVER_GRACE_S = 30.0


class OutputDirLocked(FileExistsError):
    """Another live run holds the directory's lock (a FileExistsError: the CLI reports it in one line, exit 2)."""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None off Linux."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal still counts)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(lock_file: str | Path) -> dict | None:
    """The lock file's JSON object, or None when it is missing, empty or not (yet) a complete JSON object."""
    try:
        data = json.loads(Path(lock_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def lock_is_stale(holder: dict | None, lock_file: str | Path) -> bool:
    """Whether the run that wrote `holder` (read from `lock_file`) is certainly gone."""
    if holder is None:  # unreadable: its owner may be writing it now; stale only once old
        try:
            return time.time() - Path(lock_file).stat().st_mtime > _UNWRITTEN_GRACE_S
        except FileNotFoundError:
            return True
    if holder.get("hostname") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not pid_alive(pid):
        return True
    recorded = holder.get("pid_start")
    return recorded is not None and _process_start(pid) not in (None, recorded)  # the pid was reused


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "a run whose lock file is still being written"
    return (f"`autodeco {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('hostname', '?')}, "
            f"started {holder.get('started', '?')})")


def launch_rank() -> int:
    """This process's global rank under accelerate / torchrun (they set RANK before any process group exists)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class OutputDirLock:
    """Exclusive lock on an output directory for the duration of a `with` block (created if missing).

    Raises OutputDirLocked when a live run holds it, ValueError when `path` is a file. Not re-entrant: a second
    lock on the same directory in the same process is refused too (its pid is alive). Ranks other than 0 of a
    multi-process launch hold nothing (their rank 0 holds the directory for the run).
    """

    def __init__(self, path: str | Path, command: str):
        self.path = Path(path)
        self.command = command
        self.lock_file = self.path / LOCK_NAME
        self._token: str | None = None

    @property
    def held(self) -> bool:
        return self._token is not None

    def acquire(self) -> "OutputDirLock":
        if self.held:
            raise RuntimeError(f"OutputDirLock on '{self.path}' is already held by this object.")
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"Output directory '{self.path}' is a file; pass a directory.")
        self.path.mkdir(parents=True, exist_ok=True)
        if launch_rank() != 0:
            return self
        for _ in range(20):
            if self._create():
                return self
            holder = read_lock(self.lock_file)
            if not lock_is_stale(holder, self.lock_file):
                if holder is None:  # being written right now: give its owner a moment, then look again
                    time.sleep(0.05)
                    holder = read_lock(self.lock_file)
                    if holder is None or not lock_is_stale(holder, self.lock_file):
                        self._refuse(holder)
                    continue
                self._refuse(holder)
            self._take_over(holder)
        raise OutputDirLocked(f"Output directory '{self.path}': could not take the lock {self.lock_file} (it keeps "
                              "changing hands); retry, or use another output directory.")

    def _refuse(self, holder: dict | None):
        raise OutputDirLocked(
            f"Output directory '{self.path}' is in use by {_describe(holder)}: wait for it to finish or pass another "
            f"output directory (if that run is gone, delete {self.lock_file})."
        )

    def _create(self) -> bool:
        token = uuid.uuid4().hex
        record = {
            "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()),
            "hostname": socket.gethostname(),
            "command": self.command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "token": token,
        }
        try:
            fd = os.open(self.lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        self._token = token
        return True

    def _take_over(self, stale: dict | None) -> None:
        """Remove a stale lock file, guarded so two runs taking it over at once cannot delete each other's new lock:
        only the holder of the O_EXCL guard file removes the lock, and only if it still holds the stale content."""
        guard = self.lock_file.with_name(LOCK_NAME + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > _TAKEOVER_GRACE_S:
                    guard.unlink()  # its owner died while holding it
            except FileNotFoundError:
                pass
            time.sleep(0.02)
            return
        try:
            os.close(fd)
            # Only guard holders remove a stale lock, so it cannot change between this check and the unlink.
            current = read_lock(self.lock_file)
            if self.lock_file.exists() and current == stale and lock_is_stale(current, self.lock_file):
                self.lock_file.unlink()
        finally:
            guard.unlink()

    def release(self) -> None:
        """Remove the lock file if it is still ours (a no-op when not held)."""
        if not self.held:
            return
        holder = read_lock(self.lock_file)
        if holder is not None and holder.get("token") == self._token:
            try:
                self.lock_file.unlink()
            except FileNotFoundError:
                pass
        self._token = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

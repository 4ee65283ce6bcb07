"""Atomic file writes: a reader (or a crash) never sees a half-written checkpoint, report or data file.

    >>> from autodeco.atomic import atomic_write, write_json_atomic
    >>> write_json_atomic("results.json", {"pass@1": 0.42})
    >>> atomic_write("model.bin", lambda f: f.write(payload))   # f is a binary file object

Each write goes to a temporary file in the target's directory, is flushed and fsynced, then renamed over the
target with os.replace (atomic on POSIX and Windows); on any error the temporary file is removed and the old
target, if any, is left untouched. `atomic_directory` does the same for a whole new directory (merge, convert).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a binary temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; these are ordinary files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a staging directory beside `path`; when the block succeeds it is renamed to `path` (which must be
    absent or empty), otherwise it is removed. `what` names the command in the refusal of a non-empty `path`."""
    target = Path(path)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{what}: '{target}' exists and is not empty; choose a new directory so nothing is "
                              "overwritten.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{what}."))
    try:
        yield staging
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

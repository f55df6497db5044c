"""One writer per output directory.

``score --out``, ``train --run-dir`` and ``tune --out`` hold ``DIR/.clinfuse.lock``
while they write. It is filelock's ``SoftFileLock``: the lock is a marker file
created exclusively, holding the writer's pid, host name and process start time,
deleted on release. We use the marker rather than an OS lock (``flock``) because it
works on network file systems and records who holds it, which the second writer's
error names. A writer killed with ``kill -9`` leaves its marker behind; the next
writer on the same host sees that the recorded process is gone (pid and start time,
so a reused pid is not mistaken for it) and takes the lock over. A marker from
another host cannot be probed and is reported, never broken.
"""

from __future__ import annotations

import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import SoftFileLock, Timeout

from clinfuse.errors import LockHeldError

LOCK_FILE = ".clinfuse.lock"


@contextmanager
def output_lock(directory: str | Path) -> Iterator[Path]:
    """Holds the exclusive writer lock of ``directory`` (created if missing) for the block.

    Never waits: a directory another live process holds raises at once. A directory
    this call created and left empty (the command failed before writing) is removed,
    so a refused command leaves nothing behind.

    Yields:
        The lock file's path.

    Raises:
        LockHeldError: naming the holder's pid and host.
    """
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    before = lock_holder(path)  # a marker present now and free below was left by a dead writer
    lock = SoftFileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        _cleanup(directory, created)
        raise _held(directory, path) from None
    if before is not None:
        warnings.warn(
            f"{directory}: took over the lock of pid {before[0]} on {before[1]}, which is no "
            "longer running (killed or crashed); its output is resumed or rewritten",
            stacklevel=3,
        )
    try:
        yield path
    finally:
        lock.release()
        _cleanup(directory, created)


def lock_holder(path: str | Path) -> tuple[int, str] | None:
    """(pid, host) recorded in a lock marker, or None when there is none or it is partial.

    filelock (>= 3.22) writes ``pid``, ``host`` and a process start token, one per line.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if len(lines) < 2 or not lines[0].isdigit():
        return None
    return int(lines[0]), lines[1]


def _held(directory: Path, path: Path) -> LockHeldError:
    holder = lock_holder(path)
    if holder is None:
        who = "another process (its lock file records no pid yet)"
    else:
        pid, host = holder
        mine = " (this machine)" if host == socket.gethostname() else ""
        who = f"pid {pid} on host {host}{mine}"
    return LockHeldError(
        f"another clinfuse process is writing this directory ({who})",
        directory,
        "wait for it to finish or stop it, or use another output directory",
    )


def _cleanup(directory: Path, created: bool) -> None:
    if created and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()

"""One writer per output directory: an advisory ``fcntl`` lock on a file in it.

::

    with DirectoryLock(out_dir):        # UserError naming the holder's pid if taken
        ...                             # this process alone writes out_dir

The lock is a POSIX record lock (``fcntl.lockf``) on ``<dir>/.ats-wsi.lock``, which
also holds the holder's pid for the message. The kernel drops the lock when its
process dies however it dies, so the lock of a dead process is simply taken over
(its stale pid is overwritten); POSIX locks also work across NFS clients.
The lock file is never deleted: deleting it would let a second process lock a new
file while a third still holds the old one.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from pipeline.app.errors import UserError
from pipeline.app.files import ensure_directory

LOCK_FILE = ".ats-wsi.lock"

_held: set[str] = set()
_held_lock = threading.Lock()
"""Directories locked by this process: POSIX locks do not exclude the process that
holds them, so two calls in one process are excluded here."""


class DirectoryLock:
    """Exclusive use of ``directory`` (created if missing) by this process.

    Attributes:
        previous_pid: pid recorded by an earlier holder that died without releasing
            the lock (``None`` if there was none): its lock was taken over.
    """

    def __init__(self, directory: str | os.PathLike, what: str = "ats-wsi predict") -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.what = what
        self.previous_pid: int | None = None
        self._fd: int | None = None

    def acquire(self) -> None:
        key = os.path.realpath(self.directory)
        with _held_lock:
            if key in _held:
                raise UserError(f"{self.directory}: already in use by this process")
            fd = self._open()
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(fd)
                os.close(fd)
                raise UserError(
                    f"{self.directory}: in use by another {self.what} "
                    f"(pid {holder if holder is not None else 'unknown'}); wait for it to "
                    "finish or choose another output directory"
                ) from None
            _held.add(key)
        previous = _read_pid(fd)
        self.previous_pid = previous if previous != os.getpid() else None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def _open(self) -> int:
        """The lock file's descriptor; an output directory that cannot be created or
        written is a ``UserError`` with the OS's reason."""
        ensure_directory(self.directory)
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"{self.path}: cannot write there ({e.strerror or e})") from None

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the lock
        self._fd = None
        with _held_lock:
            _held.discard(os.path.realpath(self.directory))

    def __enter__(self) -> DirectoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except ValueError:
        return None

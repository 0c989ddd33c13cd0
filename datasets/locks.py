"""One writer per folder: an exclusive lock that a stage or a training run holds on its output folder.

A second align, lst, pack, merge, bins, megaface, ijb or training run started on a folder that
another run is writing fails at once with :class:`FolderBusy`, one line naming the folder and the
holder's process id, instead of both writing into it (a misleading error in one of them, each
deleting the other's temporary files, two trainings interleaving checkpoints). The first run is
not disturbed.

Mechanism: ``fcntl.flock(LOCK_EX | LOCK_NB)`` on the file ``<folder>/.lock``, which holds the
holder's pid and what it does (text, one line, for the message only). The kernel releases the
lock when the holder's file descriptor is closed, including when the process is killed (``kill
-9``, a crash, the machine losing power), so a lock can never be left stale; the file itself
stays and is reused. The lock is per open file: a second :func:`folder_lock` on the same folder
in the same process is refused as well. Child processes started while the lock is held do not
inherit it (the descriptor is close-on-exec), except through :meth:`FolderLock.child_env`: a
launcher that holds a run folder's lock and starts the process that writes it passes the lock on
(the open descriptor, and the folder in ``FACEPIPE_HELD_LOCK`` so that the child does not try to
lock the folder against its own parent). On a file system without ``flock`` support (some network
mounts) the lock is not taken and a warning is logged.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

#: Name of the lock file inside a locked folder.
LOCK_FILE = ".lock"
#: Environment variable naming the folder (resolved path) whose lock the parent process holds.
HELD_ENV = "FACEPIPE_HELD_LOCK"

_log = logging.getLogger(__name__)


class FolderBusy(RuntimeError):
    """Another process (or another run in this one) holds the folder's lock."""

    def __init__(self, folder: Path, holder: str):
        self.folder = folder
        self.holder = holder
        super().__init__(f"{folder}: in use by {holder}; wait until it ends or stop it (one run per folder)")


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "another run (it has not written its pid yet)"


class FolderLock:
    """A held lock: ``folder``, and ``fd`` (the locked file's descriptor; -1 when the lock is
    held by the parent process or could not be taken)."""

    def __init__(self, folder: Path, fd: int):
        self.folder, self.fd = folder, fd

    def child_env(self) -> tuple[dict[str, str], tuple[int, ...]]:
        """``(environment entries, pass_fds)`` for ``subprocess.Popen`` of a child that writes the
        folder while this process waits: the child keeps the lock alive (the open descriptor)
        and does not lock the folder again."""
        return {HELD_ENV: str(self.folder.resolve())}, ((self.fd,) if self.fd >= 0 else ())


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[FolderLock]:
    """Hold the exclusive lock of ``folder`` (created if missing) for the ``with`` block.

    ``what`` says who holds it (a stage's name, ``"align"``, ``"pack"``, ..., or ``"training"``), for
    the message a second run gets. Raises :class:`FolderBusy` at once if the lock is held. Yields the
    :class:`FolderLock`. Inside a child started with :meth:`FolderLock.child_env` for this
    folder, the parent's lock stands for this one and nothing is locked again.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if os.environ.get(HELD_ENV) == str(folder.resolve()):
        yield FolderLock(folder, -1)
        return
    path = folder / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderBusy(folder, _holder(fd)) from None
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            _log.warning("%s: this file system does not support locks; running without one (%s)", folder, exc)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{what} run, pid {os.getpid()}\n".encode(), 0)
        yield FolderLock(folder, fd)
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race with a new holder)


__all__ = ["LOCK_FILE", "HELD_ENV", "FolderBusy", "FolderLock", "folder_lock"]

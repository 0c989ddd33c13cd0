"""Atomic file writes: write to a temporary file in the target folder, fsync, then rename.

A process killed at any moment leaves either the old file or the new one, never a torn file.
Temporary names start with ``.`` and end with ``.partial`` so that they are easy to recognise and
:func:`remove_partials` can sweep the ones a killed run left behind.
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import IO, Iterator

PARTIAL_SUFFIX = ".partial"


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[tuple[Path, ...]]:
    """Yield temporary paths for ``paths``; on success rename each over its target.

    The caller writes the temporary files however it likes (several writers, a library that wants
    a file name). On an exception every temporary file is removed and the targets are untouched.
    The renames happen in the order given, so put the file that marks completion last.
    """
    targets = [Path(p) for p in paths]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
    temps = tuple(_temp_name(t) for t in targets)
    try:
        yield temps
        for tmp in temps:
            if tmp.exists():
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
        for tmp, target in zip(temps, targets):
            if not tmp.exists():
                raise FileNotFoundError(f"atomic write of {target}: nothing was written to {tmp}")
            os.replace(tmp, target)
        for folder in {t.parent for t in targets}:
            _fsync_dir(folder)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """``open(path, mode)`` for writing, made atomic (see :func:`atomic_paths`)."""
    if not any(c in mode for c in "wx"):
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    with atomic_paths(path) as (tmp,):
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding, newline="") as fh:
        fh.write(text)


def remove_partials(folder: str | os.PathLike) -> list[Path]:
    """Delete temporary files that a killed writer left in ``folder``; return what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.glob(f".*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed

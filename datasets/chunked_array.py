"""A float32 ``(N, D)`` ``.npy`` file written chunk by chunk that a killed run resumes.

While it is written, the rows live in ``<target>.inprogress`` (a memory-mapped ``.npy``) and
``<target>.progress.json`` records ``{"key": ..., "done": rows}`` after every chunk; ``key`` names
what the rows are (model digest, image list, settings), so a run with another key starts over. On
:meth:`ChunkedArray.finish` the file is synced and renamed to ``target``: the target is either
absent or complete, never torn.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .atomic import atomic_write_text

__all__ = ["ChunkedArray"]


class ChunkedArray:
    """``rows`` rows for ``target``; :attr:`done` rows are already written (resumed)."""

    def __init__(self, target: str | os.PathLike, rows: int, key: str):
        self.target = Path(target)
        self.rows, self.key = int(rows), key
        self.work = self.target.with_name(self.target.name + ".inprogress")
        self.state_file = self.target.with_name(self.target.name + ".progress.json")
        self._array: np.memmap | None = None
        self.done = 0
        try:
            state = json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            state = {}
        if state.get("key") == key and self.work.is_file():
            array = np.load(self.work, mmap_mode="r+")
            if array.shape[0] == self.rows:
                self._array, self.done = array, min(int(state.get("done", 0)), self.rows)

    def write(self, start: int, values: np.ndarray) -> None:
        """Rows ``start .. start + len(values)`` (float32 ``(k, D)``), flushed and recorded as done."""
        if self._array is None:
            self._array = np.lib.format.open_memmap(self.work, mode="w+", dtype=np.float32,
                                                    shape=(self.rows, values.shape[1]))
        self._array[start:start + len(values)] = values
        self._array.flush()
        self.done = start + len(values)
        atomic_write_text(self.state_file, json.dumps({"key": self.key, "done": self.done}))

    def finish(self) -> Path:
        """Sync the rows and move them to ``target``; returns it. Every row must have been written."""
        if self._array is None or self.done != self.rows:
            raise RuntimeError(f"{self.target}: {self.done} of {self.rows} rows written")
        self._array.flush()
        self._array = None
        with open(self.work, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(self.work, self.target)
        self.state_file.unlink(missing_ok=True)
        return self.target

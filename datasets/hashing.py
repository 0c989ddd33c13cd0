"""Content digests and parameter hashes used by the stage manifests."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):  # pydantic model
        return obj.model_dump(mode="json")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"cannot hash parameter value {obj!r} of type {type(obj).__name__}")


def params_hash(params: Any, length: int = 16) -> str:
    """Stable short hash of parameters (dicts, lists, scalars, paths, pydantic models).

    Key order does not matter; the hash is the first ``length`` hex digits of the sha256 of the
    canonical JSON form.
    """
    text = json.dumps(params, default=_jsonable, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_stats(root: str | os.PathLike, names: Sequence[str]) -> tuple[list[tuple[int, int]], list[str]]:
    """``([(size, mtime_ns) of each existing file], [names that do not exist])`` for ``root/<name>``:
    what a stage's input stamp is made of (a changed, added or removed file changes it)."""
    base = Path(root)
    stats, missing = [], []
    for name in names:
        try:
            st = (base / name).stat()
            stats.append((st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            missing.append(name)
    return stats, missing

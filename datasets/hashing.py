"""Content digests and parameter hashes used by the stage manifests."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

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

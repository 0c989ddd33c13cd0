"""Stage records: what a stage consumed and produced, so that an unchanged stage is skipped.

Each stage folder holds ``stage.json``: the stage name, its parameters, digests of its inputs, the
code version of the modules that compute it, and the size of every output file. It is written
last and atomically, after all outputs, so it is the commit point of the stage: a run killed
before it is written leaves no record, and the next run redoes (or resumes) the stage.

``fingerprint`` of a record is the digest the next stage uses as its input digest, so a change
anywhere upstream propagates down the chain.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from datasets.atomic import atomic_write_text
from datasets.hashing import params_hash

RECORD_FILE = "stage.json"


@dataclass
class StageRecord:
    """Contents of ``stage.json``. ``outputs`` maps paths relative to the stage folder to sizes."""

    stage: str
    params: dict[str, Any]
    inputs: dict[str, str]
    code: str
    outputs: dict[str, int] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        return params_hash(
            {"stage": self.stage, "params": self.params, "inputs": self.inputs, "code": self.code, "outputs": self.outputs}
        )


def code_version(*modules: str) -> str:
    """Digest of the source of the named modules (e.g. ``"tasks.pack", "datasets.recordio"``)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        mod = importlib.import_module(name)
        h.update(name.encode())
        h.update(inspect.getsource(mod).encode())
    return h.hexdigest()[:16]


def load_record(stage_dir: str | os.PathLike) -> StageRecord | None:
    """The committed record of a stage folder, or None if there is none (or it is unreadable)."""
    path = Path(stage_dir) / RECORD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return StageRecord(**data)
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def current_record(
    stage_dir: str | os.PathLike,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    code: str,
) -> StageRecord | None:
    """The committed record if it matches these parameters, inputs and code, and every output file
    still exists with its recorded size; otherwise None (the stage must run)."""
    rec = load_record(stage_dir)
    if rec is None:
        return None
    expected = json.loads(json.dumps(params, default=str))
    if rec.stage != stage or rec.params != expected or rec.inputs != inputs or rec.code != code:
        return None
    root = Path(stage_dir)
    for rel, size in rec.outputs.items():
        p = root / rel
        if not p.is_file() or p.stat().st_size != size:
            return None
    return rec


def commit_record(
    stage_dir: str | os.PathLike,
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, str],
    code: str,
    outputs: Iterable[str | os.PathLike],
    summary: dict[str, Any] | None = None,
) -> StageRecord:
    """Write ``stage.json`` for outputs that are already in place. Returns the record."""
    root = Path(stage_dir)
    sizes = {}
    for out in outputs:
        p = Path(out)
        rel = p.relative_to(root) if p.is_absolute() else p
        sizes[rel.as_posix()] = (root / rel).stat().st_size
    rec = StageRecord(
        stage=stage,
        params=json.loads(json.dumps(params, default=str)),
        inputs=dict(inputs),
        code=code,
        outputs=dict(sorted(sizes.items())),
        summary=json.loads(json.dumps(summary or {}, default=str)),
    )
    atomic_write_text(root / RECORD_FILE, json.dumps(asdict(rec), indent=2, sort_keys=True))
    return rec


def invalidate(stage_dir: str | os.PathLike) -> None:
    """Remove the record so that the next run redoes the stage (used by ``force``)."""
    try:
        (Path(stage_dir) / RECORD_FILE).unlink()
    except FileNotFoundError:
        pass

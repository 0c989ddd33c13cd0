"""Parquet manifests: one row per item a stage handled, with its status and outputs.

Every manifest has the base columns below plus the stage's own columns (bbox, landmarks, label,
record offset, ...). The file carries ``facepipe.manifest_version`` and ``facepipe.stage`` in its
Parquet schema metadata; a reader refuses a file of another version or stage instead of guessing.
Writes are atomic (:mod:`datasets.atomic`).

Incremental work: a stage asks :func:`split_reusable` which of its input items already have a row
with the same source digest and parameter hash, redoes only the rest, and writes the union back
with :func:`upsert`. Long stages write finished shards as part files (:func:`write_part`) so that a
killed run loses at most the shards in flight.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_paths
from .errors import FormatError

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.parquet"

#: Columns every manifest has. ``item_id`` is the row key within a stage; ``output_path`` and
#: ``source_path`` are strings ("" when there is none); ``reason`` is "" for ``ok`` rows.
BASE_COLUMNS: dict[str, pa.DataType] = {
    "item_id": pa.string(),
    "source_path": pa.string(),
    "source_sha256": pa.string(),
    "params_hash": pa.string(),
    "status": pa.string(),
    "reason": pa.string(),
    "output_path": pa.string(),
}


def manifest_schema(extra: Mapping[str, pa.DataType] | None = None, stage: str = "") -> pa.Schema:
    """Arrow schema of a stage manifest: base columns, then ``extra`` in order."""
    fields = [pa.field(name, typ) for name, typ in BASE_COLUMNS.items()]
    for name, typ in (extra or {}).items():
        if name in BASE_COLUMNS:
            raise ValueError(f"manifest column {name!r} is a base column")
        fields.append(pa.field(name, typ))
    meta = {b"facepipe.manifest_version": str(MANIFEST_VERSION).encode(), b"facepipe.stage": stage.encode()}
    return pa.schema(fields, metadata=meta)


def empty_manifest(extra: Mapping[str, pa.DataType] | None = None) -> pd.DataFrame:
    """A manifest frame with no rows and the right columns."""
    return manifest_schema(extra).empty_table().to_pandas()


def _to_table(df: pd.DataFrame, schema: pa.Schema, where: str) -> pa.Table:
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise ValueError(f"{where}: manifest rows lack columns {missing}")
    if len(df) and df["status"].isna().any():
        bad = df.loc[df["status"].isna(), "item_id"].head(3).tolist()
        raise ValueError(f"{where}: rows without a status, e.g. {bad}")
    if df["item_id"].duplicated().any():
        dup = df.loc[df["item_id"].duplicated(), "item_id"].head(3).tolist()
        raise ValueError(f"{where}: duplicate item_id values, e.g. {dup}")
    frame = df[[f.name for f in schema]].copy()
    for name in BASE_COLUMNS:
        frame[name] = frame[name].fillna("").astype(str) if name != "status" else frame[name].astype(str)
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False)


def write_manifest(
    path: str | os.PathLike,
    df: pd.DataFrame,
    *,
    stage: str,
    extra: Mapping[str, pa.DataType] | None = None,
) -> Path:
    """Write ``df`` as the manifest of ``stage`` at ``path``, atomically. Returns the path."""
    path = Path(path)
    schema = manifest_schema(extra, stage)
    table = _to_table(df.reset_index(drop=True), schema, str(path))
    with atomic_paths(path) as (tmp,):
        pq.write_table(table, tmp)
    return path


def read_manifest(
    path: str | os.PathLike,
    *,
    stage: str | None = None,
    extra: Mapping[str, pa.DataType] | None = None,
) -> pd.DataFrame:
    """Read a manifest; a missing file gives an empty frame with the expected columns.

    Raises :class:`FormatError` naming the file if it is not a readable Parquet manifest, has
    another manifest version, or belongs to another stage.
    """
    path = Path(path)
    if not path.exists():
        return empty_manifest(extra)
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise FormatError(path, f"not a readable Parquet manifest: {exc}") from exc
    meta = table.schema.metadata or {}
    version = meta.get(b"facepipe.manifest_version", b"?").decode()
    if version != str(MANIFEST_VERSION):
        raise FormatError(path, f"manifest version {version}", expected=f"version {MANIFEST_VERSION}")
    found_stage = meta.get(b"facepipe.stage", b"").decode()
    if stage is not None and found_stage != stage:
        raise FormatError(path, f"manifest of stage {found_stage!r}", expected=f"stage {stage!r}")
    return table.to_pandas()


def upsert(old: pd.DataFrame, new: pd.DataFrame, key: str = "item_id") -> pd.DataFrame:
    """Rows of ``old`` whose key is not in ``new``, followed by all of ``new``."""
    if old is None or old.empty:
        return new.reset_index(drop=True)
    if new is None or new.empty:
        return old.reset_index(drop=True)
    keep = old[~old[key].isin(set(new[key]))]
    return pd.concat([keep, new], ignore_index=True)


def split_reusable(
    manifest: pd.DataFrame,
    items: pd.DataFrame,
    params_hash: str,
    *,
    key: str = "item_id",
    output_root: str | os.PathLike | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split ``items`` (columns ``key`` and ``source_sha256``) into reusable and to-do.

    Returns ``(reused_rows, todo_items)``: ``reused_rows`` are the manifest rows whose key, source
    digest and parameter hash all match (and, if ``output_root`` is given, whose non-empty
    ``output_path`` still exists under it); ``todo_items`` are the remaining input items.
    """
    if manifest.empty or items.empty:
        return manifest.iloc[0:0], items
    m = manifest[manifest["params_hash"] == params_hash]
    merged = items[[key, "source_sha256"]].merge(
        m, on=[key, "source_sha256"], how="inner", suffixes=("_item", "")
    )
    if output_root is not None and not merged.empty:
        root = Path(output_root)
        has_out = merged["output_path"].astype(str) != ""
        exists = merged["output_path"].map(lambda p: (root / p).exists() if p else True)
        merged = merged[~has_out | exists]
    reused = manifest[manifest[key].isin(set(merged[key]))]
    reused = reused.merge(items[[key, "source_sha256"]], on=[key, "source_sha256"], how="inner")
    reused = reused[reused["params_hash"] == params_hash]
    todo = items[~items[key].isin(set(reused[key]))]
    return reused.reset_index(drop=True), todo.reset_index(drop=True)


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    """``{status: rows}``, sorted by status name."""
    if df.empty:
        return {}
    return {str(k): int(v) for k, v in sorted(df["status"].value_counts().items())}


# --- part files: crash-safe progress of a long stage -------------------------------------------

PARTS_DIR = "parts"


def write_part(
    stage_dir: str | os.PathLike,
    name: str,
    df: pd.DataFrame,
    *,
    stage: str,
    extra: Mapping[str, pa.DataType] | None = None,
) -> Path:
    """Atomically write the finished rows of one shard to ``<stage_dir>/parts/<name>.parquet``."""
    return write_manifest(Path(stage_dir) / PARTS_DIR / f"{name}.parquet", df, stage=stage, extra=extra)


def read_parts(
    stage_dir: str | os.PathLike,
    *,
    stage: str,
    extra: Mapping[str, pa.DataType] | None = None,
) -> pd.DataFrame:
    """Concatenate all part files of a stage (empty frame if there are none)."""
    folder = Path(stage_dir) / PARTS_DIR
    frames: Iterable[pd.DataFrame] = [
        read_manifest(p, stage=stage, extra=extra) for p in sorted(folder.glob("*.parquet"))
    ]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return empty_manifest(extra)
    return pd.concat(frames, ignore_index=True)


def clear_parts(stage_dir: str | os.PathLike) -> None:
    """Remove the part files once they are folded into the stage manifest."""
    folder = Path(stage_dir) / PARTS_DIR
    if folder.is_dir():
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()

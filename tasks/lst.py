"""``.lst`` stage: the aligned faces of one or more align-stage folders as an InsightFace image list.

Input: finished align-stage folders (:mod:`tasks.align`, engine :mod:`tasks.alignment`: ``manifest.parquet``, ``images/``,
``stage.json``), each under a source name (``raw``, ``aligned-...``). A face's identity is the
manifest's ``identity`` (the first folder below the source's input folder); the same name in
several sources is one identity. All sources must have the same output image size.

Output (``out_dir``):

* ``train.lst``: InsightFace form (spec 2.4), TAB-separated, one line per listed face:
  ``1 \\t <absolute path of the aligned face> \\t <label> [\\t x1 y1 x2 y2 [\\t 5 x \\t 5 y]]``.
  The box (ints) and the five landmarks are in pixels of the listed (aligned) image: the detected
  box and points carried through the alignment warp, so every line is self-consistent (a reader
  that re-aligns from them gets the same crop). Detected faces have 17 columns, centre-crop
  fallbacks 7 (their crop region, i.e. the whole image), already aligned imports 3 (the
  ``1 PATH LABEL`` form of dir2lst). Lines are grouped by label in ascending order, within a label
  sorted by source and path, so each identity is one contiguous run.
* ``labels.csv``: ``label,identity`` (UTF-8, CSV quoting, header, sorted by label) for every label
  this folder ever gave out. Labels are stable across runs: known identities keep theirs, new
  identities get the next free labels in sorted name order, identities that disappear keep
  theirs unused, so a label never changes meaning. ``num_classes`` is the largest label + 1.
  ``force`` keeps the table; delete the file to renumber from 0.
* ``manifest.parquet``: one row per aligned face of the sources, ``ok`` (listed; ``line`` is its
  0-based line in ``train.lst``) or ``dropped`` with the reason (no identity folder, fewer than
  ``min_images`` faces, a fallback crop with ``include_fallback`` off, a path a ``.lst`` cannot
  hold). ``item_id`` is ``<source>:<align item_id>``.
* ``stage.json`` (:mod:`tasks.stage`), written last.

Everything is recomputed from the manifests (no image is read), so a run takes seconds even for
millions of faces; an unchanged stage (same source records, parameters, code) is skipped.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    from tasks.cli import run_command_line

    run_command_line("lst")

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from datasets.atomic import atomic_write_text
from datasets.errors import FormatError
from datasets.face_align import crop_size
from datasets.hashing import params_hash
from datasets.locks import folder_lock
from datasets.lst import InsightFaceLine, write_insightface_lst
from datasets.manifest import MANIFEST_FILE, read_manifest, status_counts, write_manifest
from datasets.rec_layout import LABELS_FILE, read_labels, write_labels
from tasks import alignment
from tasks import cli
from tasks.configs import LstConfig
from tasks.runtime import finished, logger
from tasks.stage import code_version, commit_record, current_record, invalidate, load_record

__all__ = ["LIST_FILE", "STAGE", "EXTRA_COLUMNS", "LstConfig", "LstResult", "run_lst", "lst_task", "main"]

STAGE = "lst"
LIST_FILE = "train.lst"
_CODE_MODULES = ("tasks.lst", "datasets.lst", "tasks.alignment.aligner")
_UNSTORABLE = ("\t", "\n", "\r")

EXTRA_COLUMNS: dict[str, pa.DataType] = {
    "source": pa.string(),
    "identity": pa.string(),
    "label": pa.int64(),
    "line": pa.int64(),
    "image_path": pa.string(),
    "fallback": pa.bool_(),
}


@dataclass
class LstResult:
    """Outcome of :func:`run_lst`. ``image_size`` is (height, width); ``num_classes`` = largest label + 1."""

    out_dir: Path
    lst_path: Path
    labels_path: Path
    manifest_path: Path
    image_size: tuple[int, int]
    images: int
    identities: int
    num_classes: int
    counts: dict[str, int]
    skipped: bool


# --- labels table ---------------------------------------------------------------------------------


def _assign_labels(table: dict[str, int], names: Sequence[str]) -> dict[str, int]:
    """``table`` plus the next free labels for the names it lacks, in sorted name order."""
    out = dict(table)
    next_label = max(out.values(), default=-1) + 1
    for name in sorted(set(names) - set(out)):
        out[name] = next_label
        next_label += 1
    return out


# --- sources --------------------------------------------------------------------------------------


@dataclass
class _Source:
    name: str
    dir: Path
    fingerprint: str
    image_size: tuple[int, int]


def _sources(sources: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike]) -> list[_Source]:
    if isinstance(sources, Mapping):
        named = [(str(k), Path(v)) for k, v in sources.items()]
    else:
        named = [(Path(v).name, Path(v)) for v in sources]
    if not named:
        raise ValueError("lst: no source folders given (expected one or more align-stage folders)")
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"lst: source names {names} are not unique")
    out = []
    for name, folder in named:
        folder = folder.resolve()
        record = load_record(folder)
        if record is None or record.stage != alignment.STAGE:
            raise FormatError(folder, "no committed align stage record (stage.json)", "a finished align-stage folder")
        out.append(_Source(name, folder, record.fingerprint, crop_size(record.params["image_size"])))
    sizes = {s.image_size for s in out}
    if len(sizes) > 1:
        detail = ", ".join(f"{s.name}: {s.image_size[0]}x{s.image_size[1]}" for s in out)
        raise ValueError(f"lst: sources have different image sizes ({detail}); align them to one size")
    return out


# --- the stage ------------------------------------------------------------------------------------


def _faces(src: _Source) -> pd.DataFrame:
    df = read_manifest(src.dir / MANIFEST_FILE, stage=alignment.STAGE, extra=alignment.EXTRA_COLUMNS)
    df = df[(df["output_path"] != "") & df["status"].isin(["ok", "fallback"])].copy()
    df["source"] = src.name
    df["image_path"] = [str(src.dir / p) for p in df["output_path"]]
    return df


def _drop_reasons(faces: pd.DataFrame, cfg: LstConfig) -> pd.Series:
    """Why each face is not listed ("" for listed faces)."""
    reason = pd.Series("", index=faces.index, dtype=object)
    reason[faces["identity"] == ""] = "no identity: the file lies directly in the source folder (identities are sub-folders)"
    if not cfg.include_fallback:
        reason[(reason == "") & (faces["status"] == "fallback")] = "centre-crop fallback (no face found); include_fallback is off"
    bad_path = faces["image_path"].map(lambda p: any(c in p for c in _UNSTORABLE))
    reason[(reason == "") & bad_path] = "path holds a TAB or newline, which a .lst line cannot store"
    counts = faces[reason == ""].groupby("identity").size()
    few = faces["identity"].map(counts).fillna(0).astype(int)
    short = (reason == "") & (few < cfg.min_images)
    reason[short] = [f"identity {name!r} has {n} usable face(s); min_images is {cfg.min_images}"
                     for name, n in zip(faces.loc[short, "identity"], few[short])]
    return reason


def _manifest_frame(faces: pd.DataFrame, ph: str) -> pd.DataFrame:
    out = pd.DataFrame({
        "item_id": faces["source"] + ":" + faces["item_id"],
        "source_path": faces["source_path"],
        "source_sha256": faces["source_sha256"],
        "params_hash": ph,
        "status": np.where(faces["reason_lst"] == "", "ok", "dropped"),
        "reason": faces["reason_lst"],
        "output_path": np.where(faces["reason_lst"] == "", LIST_FILE, ""),
        "source": faces["source"],
        "identity": faces["identity"],
        "label": faces["label"].astype("int64"),
        "line": faces["line"].astype("int64"),
        "image_path": faces["image_path"],
        "fallback": faces["status"] == "fallback",
    })
    return out.reset_index(drop=True)


def _summary_result(out: Path, summary: dict[str, Any], skipped: bool) -> LstResult:
    return LstResult(
        out_dir=out, lst_path=out / LIST_FILE, labels_path=out / LABELS_FILE, manifest_path=out / MANIFEST_FILE,
        image_size=tuple(summary["image_size"]), images=int(summary["images"]), identities=int(summary["identities"]),
        num_classes=int(summary["num_classes"]), counts=dict(summary["counts"]), skipped=skipped,
    )


def run_lst(
    sources: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: LstConfig | None = None,
    *,
    force: bool = False,
) -> LstResult:
    """Write ``train.lst``, ``labels.csv``, ``manifest.parquet`` and ``stage.json`` for the faces
    of ``sources`` (``{name: align folder}``, or folders named by their base name). Skipped (the
    committed result, ``skipped=True``) when the stage record matches; ``force`` redoes it. Holds
    ``out_dir``'s lock (:func:`datasets.locks.folder_lock`) while it runs."""
    cfg = cfg or LstConfig()
    out = Path(out_dir).resolve()
    with folder_lock(out, STAGE):  # a second lst into out_dir fails at once (FolderBusy)
        return _run_lst_locked(sources, out, cfg, force=force)


def _run_lst_locked(sources: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike], out: Path, cfg: LstConfig,
                    *, force: bool) -> LstResult:
    srcs = _sources(sources)
    size = srcs[0].image_size
    params = {"config": cfg.model_dump(mode="json"), "sources": [s.name for s in srcs], "image_size": list(size)}
    inputs = {s.name: s.fingerprint for s in srcs}
    code = code_version(*_CODE_MODULES)
    if force:
        invalidate(out)
    else:
        record = current_record(out, STAGE, params, inputs, code)
        if record is not None:
            logger().info("lst: %s is up to date (%s)", out, record.summary.get("counts"))
            return _summary_result(out, record.summary, skipped=True)
    out.mkdir(parents=True, exist_ok=True)

    frames = [_faces(s) for s in srcs]
    faces = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if faces.empty:
        raise ValueError(f"lst: the sources {[str(s.dir) for s in srcs]} hold no aligned faces")
    faces["reason_lst"] = _drop_reasons(faces, cfg)
    listed = faces["reason_lst"] == ""
    table = _assign_labels(read_labels(out / LABELS_FILE), faces.loc[listed, "identity"].unique().tolist())
    faces["label"] = np.where(listed, faces["identity"].map(table).fillna(-1), -1).astype(np.int64)
    source_rank = {s.name: i for i, s in enumerate(srcs)}
    faces["source_rank"] = faces["source"].map(source_rank)
    faces = faces.sort_values(["label", "source_rank", "image_path"], kind="stable").reset_index(drop=True)
    faces["line"] = -1
    faces.loc[faces["label"] >= 0, "line"] = np.arange(int((faces["label"] >= 0).sum()))

    listed_faces = faces[faces["label"] >= 0]
    boxes, points = alignment.aligned_geometry(listed_faces, size)
    lines = [InsightFaceLine(True, path, int(label), box, pts)
             for path, label, box, pts in zip(listed_faces["image_path"], listed_faces["label"], boxes, points)]
    if not lines:
        raise ValueError(f"lst: no identity of {[s.name for s in srcs]} has {cfg.min_images} or more usable faces")

    ph = params_hash(params)
    manifest = _manifest_frame(faces, ph)
    write_insightface_lst(out / LIST_FILE, lines)
    write_labels(out / LABELS_FILE, table)
    write_manifest(out / MANIFEST_FILE, manifest, stage=STAGE, extra=EXTRA_COLUMNS)
    counts = status_counts(manifest)
    summary = {
        "counts": counts, "images": len(lines), "identities": int(faces.loc[faces["label"] >= 0, "label"].nunique()),
        "num_classes": max(table.values()) + 1, "image_size": list(size),
    }
    commit_record(out, STAGE, params, inputs, code, [LIST_FILE, LABELS_FILE, MANIFEST_FILE], summary=summary)
    logger().info("lst: %d faces of %d identities listed in %s (%s)", summary["images"], summary["identities"],
                  out / LIST_FILE, counts)
    return _summary_result(out, summary, skipped=False)


@task(name="lst", cache_policy=NO_CACHE)
def lst_task(sources: Mapping[str, str] | Sequence[str], out_dir: str | os.PathLike, cfg: LstConfig | None = None,
             force: bool = False) -> LstResult:
    """:func:`run_lst`; Skipped in the UI when up to date."""
    return finished(run_lst(sources, out_dir, cfg, force=force))


def run_command(args: argparse.Namespace) -> int:
    """``facepipe lst`` / ``python -m tasks.lst`` with parsed arguments."""
    result = run_lst(args.sources, args.out_dir, cli.config_from_args(args, LstConfig), force=args.force)
    print(json.dumps({"lst": str(result.lst_path), "images": result.images, "identities": result.identities,
                      "num_classes": result.num_classes, "counts": result.counts, "skipped": result.skipped}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("lst", run_command, argv)

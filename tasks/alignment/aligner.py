"""Detect + align stage: a folder of photos in, aligned faces and a Parquet manifest out.

Input: ``raw_dir/<identity>/.../<photo>``. The identity of a photo is the name of the first folder
below ``raw_dir``; photos directly in ``raw_dir`` have identity ``""`` (none) and are aligned like
the others, which suits flat folders such as distractor sets. Hidden files and folders (name
starting with ".") are not read; each gets an ``ignored`` row. Symlinked folders are followed.

Output (``out_dir``):

* ``images/<identity>/<stem>.jpg`` (``<stem>_<k>.jpg`` for face ``k`` with ``face_policy="all"``):
  ``(112, 112)`` or ``(112, 96)`` RGB faces, JPEG (cv2, quality ``jpeg_quality``). Sub-folders
  below the identity folder are kept. When several files in one folder share a stem
  (``a.jpg``, ``a.png``; compared case-insensitively) each gets ``<stem>~<8 hex digits of the
  sha256 of its file name>`` instead. Names stay UTF-8 as they are.
* ``manifest.parquet``: one row per input file (with ``face_policy="all"``: one per face, and
  one for a file without any), base columns of :mod:`datasets.manifest` plus ``EXTRA_COLUMNS``.
  ``item_id`` is the file's path relative to ``raw_dir`` (POSIX), ``<path>#<face_index>`` with
  policy "all"; ``source_path`` is the same relative path.
* ``stage.json`` (:mod:`tasks.stage`), written last.

Statuses: ``ok`` (face aligned), ``fallback`` (no face; spec 5.3 centre crop written, when
``no_face="center_crop"``), ``no_face`` (no face; nothing written), ``unreadable`` (cannot be
read or decoded, or a file or folder name that is not valid UTF-8, which Parquet and the output
names cannot hold: its ``source_path`` shows the bad bytes as ``\\xNN`` and such a folder is not
searched; ``reason`` says why), ``duplicate`` (same bytes as an earlier file in sorted
order, named in ``reason``; not processed), ``ignored`` (hidden file or folder), ``error`` (an
unexpected failure while processing the file; the message is in ``reason``, and the file is
retried on the next run). Nothing ever raises out of a shard because of one file.

Coordinates (``bbox``, ``landmarks``) are in pixels of the full-resolution source image after
EXIF orientation (``width`` x ``height``), pixel centres at integers. ``landmarks`` is
``x1, y1, ..., x5, y5`` for left eye, right eye, nose tip, left and right mouth corner (image
left/right). For ``fallback`` rows ``bbox`` is the region that was cropped. Integer columns use
-1 for "not known" (``face_index`` -1: no face).

Already aligned input (``AlignConfig.already_aligned``): folders of face crops that are aligned
already (one sub-folder per identity, e.g. :mod:`datasets.synthetic` identities or a user's
pre-aligned set) go through the same plan / shard / manifest machinery without detection. A JPEG
of the output size is written byte for byte; anything else is decoded, scaled to the output height
(aspect kept), centre-cropped or black-padded to the output width (112x96 -> 112x112 pads 8 pixels
each side, exactly the relation of the two templates) and encoded. Rows are ``ok`` with
``face_index`` 0 and no ``bbox`` / ``landmarks``, or ``unreadable``.

Speed: every photo is decoded at reduced scale when it is a large JPEG, detected at most
``max_side`` pixels long, batched by size (:class:`models.face_detector.FaceDetector`), and
warped from a decode whose resolution is at least the output's across the face (re-decoded
finer when needed), never from the detection image.

Landmark refinement (``AlignConfig.refine_passes``, default 2): the first landmarks come from a
photo downscaled to ``max_side``, where a face may be a few dozen pixels wide. Each pass aligns
every chosen face onto the template at 2x scale with 28 template pixels of margin (a 336x336 crop)
from the warp decode, runs MTCNN on all crops of a batch of photos at once, and takes the
landmarks of the detection nearest the template, mapped back to source pixels. It helps most where
the first landmarks are poorest, e.g. faces cut by the photo border, where MTCNN on the whole photo
guesses the hidden half differently from MTCNN on the centred face (measured by ``bench/align.py``;
figures in the README).

Work is split so that shards can run anywhere (Prefect tasks, processes, Dask workers):
:func:`plan_align` -> :func:`align_shard` for every shard -> :func:`finalize_align`;
:func:`run_align` does all three in-process. Re-runs only process new or changed files; a run
killed at any point resumes from the shards that finished.
"""
from __future__ import annotations

import functools
import json
import math
import os
import pickle
import stat as stat_module
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa

from datasets.atomic import atomic_write_bytes, remove_partials
from datasets.errors import FormatError
from datasets.face_codec import encode_jpeg
from datasets.face_align import (
    TEMPLATE_112x112,
    center_crop,
    choose_faces,
    crop_box,
    crop_transform,
    estimate_similarities,
    estimate_similarity,
    crop_size,
    template_for,
    transform_scale,
    warp_affine,
)
from datasets.hashing import params_hash, sha256_bytes, sha256_file
from datasets.locks import folder_lock
from datasets.images import DecodedImage, UnreadableImage, decode_image
from datasets.manifest import MANIFEST_FILE, clear_parts, read_manifest, split_reusable, status_counts, write_manifest, write_part
from models.face_detector import Detections, FaceDetector
from tasks.alignment.config import AlignConfig
from tasks.runtime import Progress, logger
from tasks.stage import code_version, commit_record, current_record, invalidate

__all__ = [
    "AlignConfig", "AlignPlan", "AlignResult", "AlignShard", "DEFAULT_SHARD_SIZE", "EXTRA_COLUMNS", "STAGE",
    "STATUSES", "align_shard", "aligned_geometry", "check_up_to_date", "finalize_align", "load_plan", "plan_align",
    "run_align",
]

STAGE = "align"
IMAGES_DIR = "images"
PLAN_FILE = "parts/plan.pickle"
DEFAULT_SHARD_SIZE = 64
#: Margin of the no-face centre crop, in source pixels (``preprocess`` default).
FALLBACK_MARGIN = 44
#: Most bytes of decoded photos one shard holds in memory at once.
_DECODED_BUDGET = 1 << 30

STATUSES = ("ok", "fallback", "no_face", "unreadable", "duplicate", "ignored", "error")
#: Rows with these statuses are decided again on every run instead of being reused.
_NOT_REUSED = {"duplicate", "ignored", "error"}
_CODE_MODULES = ("tasks.alignment.aligner", "tasks.alignment.config", "datasets.images", "datasets.face_align",
                 "datasets.face_codec", "models.face_detector")

EXTRA_COLUMNS: dict[str, pa.DataType] = {
    "identity": pa.string(),
    "face_index": pa.int32(),
    "num_faces": pa.int32(),
    "det_score": pa.float32(),
    "bbox": pa.list_(pa.float32()),
    "landmarks": pa.list_(pa.float32()),
    "width": pa.int32(),
    "height": pa.int32(),
    # stat of the source when it was hashed: unchanged size and mtime -> the sha256 is not recomputed
    "source_size": pa.int64(),
    "source_mtime_ns": pa.int64(),
}
_INT_COLUMNS = {"face_index": "int32", "num_faces": "int32", "width": "int32", "height": "int32",
                "source_size": "int64", "source_mtime_ns": "int64"}


@dataclass
class AlignShard:
    """Files one :func:`align_shard` call aligns. ``items`` columns: ``source_path``,
    ``source_sha256``, ``identity``, ``output_base``, ``source_size``, ``source_mtime_ns``."""

    index: int
    name: str
    items: pd.DataFrame


@dataclass
class AlignPlan:
    """What a run will do: rows decided while planning (duplicates, ignored, unreadable),
    rows reused from the previous manifest, and shards of files still to align."""

    raw_dir: Path
    out_dir: Path
    cfg: AlignConfig
    params_hash: str
    inputs_digest: str
    num_files: int
    fixed_rows: pd.DataFrame
    reused_rows: pd.DataFrame
    shards: list[AlignShard] = field(default_factory=list)
    shard_size: int = DEFAULT_SHARD_SIZE

    @property
    def todo_files(self) -> int:
        return sum(len(s.items) for s in self.shards)

    @property
    def reused_files(self) -> int:
        return int(self.reused_rows["source_path"].nunique()) if len(self.reused_rows) else 0

    @property
    def record_params(self) -> dict[str, Any]:
        return self.cfg.plan_params(self.shard_size)

    def check_cfg(self, cfg: AlignConfig, what: str) -> None:
        """Raise ``ValueError`` when ``cfg`` would write other faces than this plan's."""
        if params_hash(cfg.plan_params(self.shard_size)) != self.params_hash:
            raise ValueError(f"{what}: cfg {cfg.plan_params(self.shard_size)} differs from the plan's "
                             f"({self.params_hash})")

    def save(self) -> Path:
        """Write this plan to ``<out_dir>/parts/plan.pickle`` (atomically; :func:`finalize_align`
        removes it with the other parts) and return the path. Shard tasks in other processes load it
        with :func:`load_plan`, so only the path travels through the orchestrator."""
        path = self.out_dir / PLAN_FILE
        atomic_write_bytes(path, pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL))
        return path


def load_plan(path: str | os.PathLike) -> AlignPlan:
    """The plan :meth:`AlignPlan.save` wrote at ``path``, read once per process and file version."""
    st = os.stat(path)
    return _load_plan(os.fspath(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _load_plan(path: str, mtime_ns: int, size: int) -> AlignPlan:
    with open(path, "rb") as fh:
        plan = pickle.load(fh)  # our own file, written by AlignPlan.save in the stage's folder
    if not isinstance(plan, AlignPlan):
        raise FormatError(path, f"holds a {type(plan).__name__}", "an align plan written by plan_align")
    return plan


@dataclass
class AlignResult:
    """Outcome of a run. ``processed``: files aligned (detected) by this run; ``reused``: files
    whose rows came from the previous manifest; ``skipped``: the stage record matched."""

    out_dir: Path
    manifest_path: Path
    counts: dict[str, int]
    files: int
    rows: int
    processed: int
    reused: int
    skipped: bool


# --- rows -----------------------------------------------------------------------------------------


def _item_id(source_path: str, face_index: int, policy: str) -> str:
    return f"{source_path}#{face_index}" if policy == "all" else source_path


def _identity(rel: str) -> str:
    parts = PurePosixPath(rel).parts
    return parts[0] if len(parts) > 1 else ""


def _row(source_path: str, status: str, cfg_hash: str, policy: str, *, sha: str = "", reason: str = "",
         output_path: str = "", face_index: int = -1, num_faces: int = -1, det_score: float | None = None,
         bbox=None, landmarks=None, width: int = -1, height: int = -1, source_size: int = -1,
         source_mtime_ns: int = -1) -> dict[str, Any]:
    return {
        "item_id": _item_id(source_path, face_index, policy),
        "source_path": source_path,
        "source_sha256": sha,
        "params_hash": cfg_hash,
        "status": status,
        "reason": reason,
        "output_path": output_path,
        "identity": _identity(source_path),
        "face_index": face_index,
        "num_faces": num_faces,
        "det_score": np.nan if det_score is None else float(det_score),
        "bbox": None if bbox is None else [float(v) for v in np.asarray(bbox).reshape(-1)],
        "landmarks": None if landmarks is None else [float(v) for v in np.asarray(landmarks).reshape(-1)],
        "width": width,
        "height": height,
        "source_size": source_size,
        "source_mtime_ns": source_mtime_ns,
    }


def _frame(rows: list[dict[str, Any]] | pd.DataFrame) -> pd.DataFrame:
    """Rows as a manifest frame with fixed column order and dtypes, sorted by file and face."""
    columns = ["item_id", "source_path", "source_sha256", "params_hash", "status", "reason", "output_path",
               *EXTRA_COLUMNS]
    df = pd.DataFrame(rows, columns=columns) if not isinstance(rows, pd.DataFrame) else rows[columns].copy()
    for name, dtype in _INT_COLUMNS.items():
        df[name] = df[name].fillna(-1).astype(dtype)
    df["det_score"] = df["det_score"].astype("float32")
    for name in ("item_id", "source_path", "source_sha256", "params_hash", "status", "reason", "output_path",
                 "identity"):
        df[name] = df[name].fillna("").astype(str)
    return df.sort_values(["source_path", "face_index"], kind="stable").reset_index(drop=True)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    return _frame(pd.concat(frames, ignore_index=True)) if frames else _frame([])


# --- plan -----------------------------------------------------------------------------------------


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


_NOT_UTF8 = "name is not valid UTF-8 (shown with \\x escapes); rename it to align it"


def _is_utf8(rel: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (``os.fsdecode`` turns them into lone
    surrogates, which Parquet, JSON and the output file names cannot hold)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(rel: str) -> str:
    """``rel`` as valid UTF-8 text: bytes that are not UTF-8 written as ``\\xNN``
    (``b"caf\\xe9.jpg"`` -> ``"caf\\\\xe9.jpg"``), the form a manifest row can hold."""
    return os.fsencode(rel).decode("utf-8", "backslashreplace")


def _walk(raw: Path, exclude: Path | None) -> tuple[list[str], dict[str, str]]:
    """Relative POSIX paths of the files below ``raw`` (sorted), and ``{path: reason}`` for
    entries that are not searched (hidden or unlistable folders, hidden files)."""
    files: list[str] = []
    skipped: dict[str, str] = {}
    seen_dirs: set[str] = set()

    def on_error(exc: OSError) -> None:
        rel = Path(exc.filename).relative_to(raw).as_posix() if exc.filename else "."
        skipped[_printable(rel) + "/"] = f"unreadable:cannot list folder ({exc.strerror or exc})"

    for dirpath, dirnames, filenames in os.walk(raw, onerror=on_error, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen_dirs:  # a symlink cycle
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        keep = []
        for name in sorted(dirnames):
            rel = (here / name).relative_to(raw).as_posix()
            if exclude is not None and (here / name).resolve() == exclude:
                continue
            if not _is_utf8(rel):
                skipped[_printable(rel) + "/"] = f"unreadable:{_NOT_UTF8}; not searched"
            elif _is_hidden(name):
                skipped[rel + "/"] = "ignored:hidden folder (name starts with '.'); not searched"
            else:
                keep.append(name)
        dirnames[:] = keep
        for name in filenames:
            rel = (here / name).relative_to(raw).as_posix()
            if not _is_utf8(rel):
                skipped[_printable(rel)] = f"unreadable:{_NOT_UTF8}"
            elif _is_hidden(name):
                skipped[rel] = "ignored:hidden file (name starts with '.')"
            else:
                files.append(rel)
    return sorted(files), skipped


def _output_bases(rels: list[str]) -> dict[str, str]:
    """Output path without extension for each file (see the module docstring)."""
    key = lambda rel: (str(PurePosixPath(rel).parent), PurePosixPath(rel).stem.casefold())  # noqa: E731
    shared = Counter(key(rel) for rel in rels)
    bases = {}
    for rel in rels:
        p = PurePosixPath(rel)
        stem = p.stem
        if shared[key(rel)] > 1:
            stem = f"{stem}~{sha256_bytes(p.name.encode('utf-8'))[:8]}"
        bases[rel] = str(PurePosixPath(IMAGES_DIR, p.parent, stem)) if str(p.parent) != "." else f"{IMAGES_DIR}/{stem}"
    return bases


def plan_align(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: AlignConfig | None = None,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    force: bool = False,
) -> AlignPlan:
    """List, hash and de-duplicate the photos under ``raw_dir``; reuse manifest rows whose file,
    sha256 and parameters match (and whose outputs exist); split the rest into shards of
    ``shard_size`` files named ``<index>-<digest of their paths, hashes and parameters>``.

    Side effect, for crash safety: when files that the current manifest lists with an output are
    about to be redone or are gone, their rows are dropped from ``manifest.parquet`` (and
    ``stage.json`` is removed) before any shard overwrites their images.
    """
    cfg = cfg or AlignConfig()
    raw = Path(raw_dir).resolve()
    out = Path(out_dir).resolve()
    if not raw.is_dir():
        raise NotADirectoryError(f"{raw}: raw_dir is not a folder (expected one sub-folder per identity)")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if out == raw or out / IMAGES_DIR in (raw, *raw.parents):
        raise ValueError(f"out_dir {out} must not be raw_dir {raw} or hold it in its {IMAGES_DIR}/ folder")
    ph = params_hash(cfg.plan_params(shard_size))
    policy = cfg.face_policy
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out / MANIFEST_FILE, stage=STAGE, extra=EXTRA_COLUMNS)

    files, skipped = _walk(raw, out if raw in out.parents else None)
    cache = {}
    if not force and len(manifest):
        known = manifest[manifest["source_sha256"] != ""]
        cache = {sp: (size, mtime, sha) for sp, size, mtime, sha in zip(
            known["source_path"], known["source_size"], known["source_mtime_ns"], known["source_sha256"])}

    fixed: list[dict[str, Any]] = []
    for rel, what in sorted(skipped.items()):
        status, reason = what.split(":", 1)
        fixed.append(_row(rel, status, ph, policy, reason=reason))
    digest_items: list[tuple[str, str]] = [(rel, "") for rel in sorted(skipped)]

    hashed = []  # (rel, sha, size, mtime_ns)
    for rel in files:
        path = raw / rel
        try:
            st = path.stat()
            if not stat_module.S_ISREG(st.st_mode):
                fixed.append(_row(rel, "unreadable", ph, policy, reason="not a regular file (device, socket or pipe)"))
                digest_items.append((rel, ""))
                continue
            hit = cache.get(rel)
            if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                sha = hit[2]
            else:
                sha = sha256_file(path)
        except OSError as exc:
            fixed.append(_row(rel, "unreadable", ph, policy, reason=f"cannot read file ({exc.strerror or exc})"))
            digest_items.append((rel, ""))
            continue
        hashed.append((rel, sha, st.st_size, st.st_mtime_ns))
        digest_items.append((rel, sha))

    first_with: dict[str, str] = {}
    kept = []
    for rel, sha, size, mtime in hashed:
        if size > 0 and sha in first_with:
            fixed.append(_row(rel, "duplicate", ph, policy, sha=sha, source_size=size, source_mtime_ns=mtime,
                              reason=f"same bytes as {first_with[sha]} (only that file is processed)"))
            continue
        first_with.setdefault(sha, rel)
        kept.append((rel, sha, size, mtime))

    bases = _output_bases(files)
    items = pd.DataFrame(
        {
            "source_path": [k[0] for k in kept],
            "source_sha256": [k[1] for k in kept],
            "identity": [_identity(k[0]) for k in kept],
            "output_base": [bases[k[0]] for k in kept],
            "source_size": pd.array([k[2] for k in kept], dtype="int64"),
            "source_mtime_ns": pd.array([k[3] for k in kept], dtype="int64"),
        }
    )

    candidates = manifest.iloc[0:0]
    if not force and len(manifest):
        candidates = manifest[(manifest["params_hash"] == ph) & ~manifest["status"].isin(_NOT_REUSED)
                              & (manifest["source_sha256"] != "")]
    reused, todo = split_reusable(candidates, items, ph, key="source_path")
    if len(reused):
        missing = {sp for sp, op in zip(reused["source_path"], reused["output_path"]) if op and not (out / op).is_file()}
        if missing:
            reused = reused[~reused["source_path"].isin(missing)]
            todo = items[items["source_path"].isin(set(todo["source_path"]) | missing)]
        by_path = items.set_index("source_path")
        reused = reused.assign(
            source_size=reused["source_path"].map(by_path["source_size"]).astype("int64"),
            source_mtime_ns=reused["source_path"].map(by_path["source_mtime_ns"]).astype("int64"),
        )
    reused_rows = _frame(reused) if len(reused) else _frame([])
    fixed_rows = _frame(fixed)
    todo = todo.sort_values("source_path", kind="stable").reset_index(drop=True)

    shards = []
    for index, start in enumerate(range(0, len(todo), shard_size)):
        chunk = todo.iloc[start : start + shard_size].reset_index(drop=True)
        digest = params_hash({"params": ph, "files": list(zip(chunk["source_path"], chunk["source_sha256"]))}, 12)
        shards.append(AlignShard(index=index, name=f"{index:05d}-{digest}", items=chunk))

    if len(manifest):
        stale = manifest[(manifest["output_path"] != "") & ~manifest["item_id"].isin(set(reused_rows["item_id"]))]
        if len(stale):
            invalidate(out)
            write_manifest(out / MANIFEST_FILE, _concat([reused_rows, fixed_rows]), stage=STAGE, extra=EXTRA_COLUMNS)

    plan = AlignPlan(
        raw_dir=raw, out_dir=out, cfg=cfg, params_hash=ph,
        inputs_digest=params_hash({"files": sorted(digest_items)}, 64),
        num_files=len(digest_items), fixed_rows=fixed_rows, reused_rows=reused_rows, shards=shards,
        shard_size=shard_size,
    )
    logger().info(
        "align plan: %d files in %s: %d reused, %d to align in %d shards, %d decided while planning",
        plan.num_files, raw, plan.reused_files, plan.todo_files, len(shards), len(fixed_rows),
    )
    return plan


# --- one shard ------------------------------------------------------------------------------------


def _part_path(out: Path, shard: AlignShard) -> Path:
    return out / "parts" / f"{shard.name}.parquet"


def _finished_part(out: Path, shard: AlignShard, ph: str) -> pd.DataFrame | None:
    """The shard's part file if it exists and covers exactly the shard's files, else None."""
    path = _part_path(out, shard)
    if not path.is_file():
        return None
    try:
        part = read_manifest(path, stage=STAGE, extra=EXTRA_COLUMNS)
    except FormatError:
        return None
    if set(part["source_path"]) != set(shard.items["source_path"]) or set(part["params_hash"]) != {ph}:
        return None
    return _frame(part)


def _apply(matrix3: np.ndarray, points: np.ndarray) -> np.ndarray:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    return pts @ matrix3[:2, :2].T + matrix3[:2, 2]


@dataclass
class _Loaded:
    item: Any  # a row of AlignShard.items
    data: bytes
    sha: str
    image: DecodedImage


@dataclass
class _Faces:
    """One photo between detection and writing: its chosen faces, in source pixels, and the
    decode to warp from (fine enough for the output)."""

    loaded: _Loaded
    image: DecodedImage
    to_src: np.ndarray  # (3, 3) decoded pixels -> source pixels
    chosen: list[int]
    boxes: np.ndarray  # (n, 4) source pixels, faces scoring >= min_score
    scores: np.ndarray  # (n,)
    landmarks: np.ndarray  # (n, 5, 2) source pixels
    common: dict[str, Any]


def _prepare(loaded: _Loaded, det: Detections, raw: Path, out: Path, cfg: AlignConfig, ph: str) -> _Faces | list[dict]:
    """Choose the faces of one photo and make sure its decode is fine enough to warp them from;
    the rows of a photo without faces (and its fallback crop) are final already."""
    item, image = loaded.item, loaded.image
    common = dict(sha=loaded.sha, width=image.width, height=image.height,
                  source_size=int(item.source_size), source_mtime_ns=int(item.source_mtime_ns))
    to_src = image.to_source()
    keep = np.flatnonzero(det.scores >= cfg.min_score)
    boxes = _apply(to_src, det.boxes[keep].reshape(-1, 2)).reshape(-1, 4)
    landmarks = _apply(to_src, det.landmarks[keep].reshape(-1, 2)).reshape(-1, 5, 2)
    scores = det.scores[keep]
    size = crop_size(cfg.image_size)
    chosen = choose_faces(boxes, scores, (image.height, image.width), cfg.face_policy)

    if chosen:
        template = template_for(size)
        matrices = [estimate_similarity(landmarks[i], template) for i in chosen]
    elif cfg.no_face == "center_crop":
        fallback_box = crop_box((image.height, image.width), None, FALLBACK_MARGIN)
        matrices = [crop_transform(fallback_box, size)]
    else:
        low = len(det) - len(keep)
        reason = "no face found" + (f" ({low} below min_score {cfg.min_score})" if low else "")
        return [_row(item.source_path, "no_face", ph, cfg.face_policy, reason=reason, num_faces=0, **common)]

    # Warp from enough resolution: at least one decoded pixel per output pixel across the face.
    needed = max(transform_scale(m) for m in matrices) * max(image.width, image.height)
    if image.reduced and needed > max(image.pixels.shape[:2]):
        image = decode_image(raw / item.source_path, loaded.data, min_long_side=math.ceil(needed))
        to_src = image.to_source()
    faces = _Faces(loaded, image, to_src, chosen, boxes, scores, landmarks, common)
    if chosen:
        return faces
    output_path = f"{item.output_base}.jpg"
    _write_face(faces, matrices[0], out / output_path, size, cfg.jpeg_quality)
    return [_row(item.source_path, "fallback", ph, cfg.face_policy, output_path=output_path, num_faces=0,
                 bbox=fallback_box, reason="no face found; centre crop written (spec 5.3)", **common)]


def _warp(faces: _Faces, matrix: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``faces``' decode warped by ``matrix`` (source pixels -> output, ``(2, 3)``) to ``size`` (h, w)."""
    return warp_affine(faces.image.pixels, (np.vstack([matrix, [0, 0, 1]]) @ faces.to_src)[:2], size)


def _write_face(faces: _Faces, matrix: np.ndarray, target: Path, size: tuple[int, int], quality: int) -> None:
    atomic_write_bytes(target, encode_jpeg(_warp(faces, matrix, size), quality))


def _write_faces(faces: _Faces, out: Path, cfg: AlignConfig, ph: str) -> list[dict]:
    """Align and write every chosen face of one photo; its rows."""
    item = faces.loaded.item
    size = crop_size(cfg.image_size)
    template = template_for(size)
    rows = []
    for i in faces.chosen:
        output_path = f"{item.output_base}_{i}.jpg" if cfg.face_policy == "all" else f"{item.output_base}.jpg"
        _write_face(faces, estimate_similarity(faces.landmarks[i], template), out / output_path, size, cfg.jpeg_quality)
        rows.append(_row(item.source_path, "ok", ph, cfg.face_policy, output_path=output_path, face_index=i,
                         num_faces=len(faces.scores), det_score=faces.scores[i], bbox=faces.boxes[i],
                         landmarks=faces.landmarks[i], **faces.common))
    return rows


def _load(item, raw: Path, cfg: AlignConfig, ph: str) -> _Loaded | dict[str, Any]:
    """Read and decode one file: a :class:`_Loaded`, or the row saying why it cannot be."""
    stat = dict(source_size=int(item.source_size), source_mtime_ns=int(item.source_mtime_ns))
    try:
        data = (raw / item.source_path).read_bytes()
    except OSError as exc:
        return _row(item.source_path, "unreadable", ph, cfg.face_policy, reason=f"cannot read file ({exc.strerror or exc})", **stat)
    sha = sha256_bytes(data)
    if sha != item.source_sha256:
        logger().warning("align: %s changed since it was planned; aligning the new content", item.source_path)
    try:
        reduce = None if cfg.already_aligned else (cfg.max_side or None)
        image = decode_image(raw / item.source_path, data, min_long_side=reduce)
    except UnreadableImage as exc:
        return _row(item.source_path, "unreadable", ph, cfg.face_policy, sha=sha, reason=exc.reason, **stat)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the shard
        return _row(item.source_path, "error", ph, cfg.face_policy, sha=sha,
                    reason=f"decode failed: {type(exc).__name__}: {exc}", **stat)
    return _Loaded(item, data, sha, image)


def _detect_and_align(loaded: list[_Loaded], raw: Path, out: Path, cfg: AlignConfig, ph: str,
                      detector: FaceDetector, refiner: FaceDetector | None) -> list[dict]:
    """Detect faces in a batch of decoded photos, write their aligned faces, return their rows."""
    try:
        detections: list[Detections | Exception] = list(detector.detect([x.image.pixels for x in loaded]))
    except Exception:  # noqa: BLE001 - find the file(s) it fails on, one at a time
        logger().exception("align: batched detection failed; retrying the %d files one by one", len(loaded))
        detections = []
        for x in loaded:
            try:
                detections.append(detector.detect([x.image.pixels])[0])
            except Exception as exc:  # noqa: BLE001
                detections.append(exc)
    prepared: list[_Faces] = []
    rows: list[dict] = []

    def failed(x: _Loaded, exc: Exception) -> None:
        logger().exception("align: %s failed", x.item.source_path)
        rows.append(_row(x.item.source_path, "error", ph, cfg.face_policy, sha=x.sha, reason=f"{type(exc).__name__}: {exc}",
                         width=x.image.width, height=x.image.height,
                         source_size=int(x.item.source_size), source_mtime_ns=int(x.item.source_mtime_ns)))

    for x, det in zip(loaded, detections):
        try:
            if isinstance(det, Exception):
                raise RuntimeError(f"detection failed: {type(det).__name__}: {det}") from det
            result = _prepare(x, det, raw, out, cfg, ph)
        except Exception as exc:  # noqa: BLE001
            failed(x, exc)
            continue
        if isinstance(result, list):
            rows.extend(result)
        else:
            prepared.append(result)
    if prepared and cfg.refine_passes and refiner is not None:
        try:
            for _ in range(cfg.refine_passes):
                _refine(prepared, refiner)
        except Exception:  # noqa: BLE001 - refinement is an improvement, not a requirement
            logger().exception("align: landmark refinement failed for %d photos; using the first detection",
                               len(prepared))
    for faces in prepared:
        try:
            rows.extend(_write_faces(faces, out, cfg, ph))
        except Exception as exc:  # noqa: BLE001
            failed(faces.loaded, exc)
    return rows


#: Refinement crops: the face aligned onto the 112x112 template at this many crop pixels per
#: template pixel, with this many template pixels of margin on every side.
REFINE_SCALE = 2.0
REFINE_MARGIN = 28.0
#: A refined estimate is taken only when its landmarks lie, on average, within this fraction of the
#: template's eye distance of the template in the crop (farther: probably another face; kept as is).
REFINE_TOLERANCE = 0.5


def refine_crop_size() -> int:
    """Side of the square refinement crop, pixels."""
    return round((112 + 2 * REFINE_MARGIN) * REFINE_SCALE)


def make_refiner(cfg: AlignConfig) -> FaceDetector:
    """The detector that finds landmarks again in refinement crops (all the same size, so one
    MTCNN batch per ``batch_size`` crops; no pyramid levels for faces much smaller than expected)."""
    return FaceDetector(min_face_size=round(40 * REFINE_SCALE), thresholds=cfg.thresholds, factor=cfg.factor,
                        max_side=0, batch_size=cfg.batch_size, device=cfg.device, threads=cfg.detect_threads)


def _refine(prepared: list[_Faces], refiner: FaceDetector) -> None:
    """One refinement pass over the chosen faces of many photos, in place: each face is aligned
    onto the template (at ``REFINE_SCALE`` with ``REFINE_MARGIN``) from the warp decode, MTCNN
    runs on all these crops in batches, and the landmarks of the detection nearest the template
    are mapped back to source pixels. A face whose crop has no detection near the template
    (mean landmark distance above ``REFINE_TOLERANCE`` of the template's eye distance) keeps its landmarks."""
    side = refine_crop_size()
    target = TEMPLATE_112x112 * REFINE_SCALE + REFINE_MARGIN * REFINE_SCALE
    tolerance = REFINE_TOLERANCE * float(np.linalg.norm(target[1] - target[0]))
    jobs, crops = [], []
    for faces in prepared:
        for i in faces.chosen:
            matrix = estimate_similarity(faces.landmarks[i], target)
            jobs.append((faces, i, matrix))
            crops.append(_warp(faces, matrix, (side, side)))
    for (faces, i, matrix), det in zip(jobs, refiner.detect(crops)):
        if not len(det):
            continue
        distance = np.linalg.norm(det.landmarks - target, axis=2).mean(axis=1)
        best = int(np.argmin(distance))
        if distance[best] > tolerance:
            continue
        inverse = cv2.invertAffineTransform(matrix)
        faces.landmarks[i] = det.landmarks[best].astype(np.float64) @ inverse[:, :2].T + inverse[:, 2]


def _fit(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An aligned crop ``(h, w, 3)`` brought to ``size`` (height, width): scaled to the output
    height with its aspect kept, then centre-cropped or black-padded to the output width."""
    h, w = size
    ih, iw = pixels.shape[:2]
    scaled_w = max(1, round(iw * h / ih))
    if (ih, iw) != (h, scaled_w):
        pixels = cv2.resize(pixels, (scaled_w, h), interpolation=cv2.INTER_AREA if ih > h else cv2.INTER_CUBIC)
    if scaled_w >= w:
        x0 = (scaled_w - w) // 2
        return np.ascontiguousarray(pixels[:, x0:x0 + w])
    left = (w - scaled_w) // 2
    return cv2.copyMakeBorder(pixels, 0, 0, left, w - scaled_w - left, cv2.BORDER_CONSTANT, value=0)


def _import_aligned(loaded: _Loaded, out: Path, cfg: AlignConfig, ph: str) -> dict[str, Any]:
    """Row (and written face) for an already aligned crop: its bytes when it is a JPEG of the
    output size, else :func:`_fit` and encoded."""
    item, image = loaded.item, loaded.image
    common = dict(sha=loaded.sha, width=image.width, height=image.height,
                  source_size=int(item.source_size), source_mtime_ns=int(item.source_mtime_ns))
    try:
        size = crop_size(cfg.image_size)
        output_path = f"{item.output_base}.jpg"
        if image.format == "JPEG" and image.pixels.shape[:2] == size:
            data = loaded.data
        else:
            data = encode_jpeg(_fit(image.pixels, size), cfg.jpeg_quality)
        atomic_write_bytes(out / output_path, data)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the shard
        logger().exception("align: %s failed", item.source_path)
        return _row(item.source_path, "error", ph, cfg.face_policy, reason=f"{type(exc).__name__}: {exc}", **common)
    return _row(item.source_path, "ok", ph, cfg.face_policy, output_path=output_path, face_index=0, num_faces=1,
                **common)


def align_shard(
    plan: AlignPlan,
    shard: int | AlignShard,
    out_dir: str | os.PathLike | None = None,
    cfg: AlignConfig | None = None,
    *,
    detector: FaceDetector | None = None,
) -> pd.DataFrame:
    """Detect and align one shard's files, write their faces and ``parts/<shard>.parquet``, and
    return the rows. A shard whose part file already exists and covers its files is not redone.
    ``out_dir`` and ``cfg`` default to the plan's; ``detector`` can be shared between shards."""
    if isinstance(shard, (int, np.integer)):
        shard = plan.shards[int(shard)]
    out = Path(out_dir).resolve() if out_dir is not None else plan.out_dir
    cfg = cfg or plan.cfg
    plan.check_cfg(cfg, "align_shard")
    done = _finished_part(out, shard, plan.params_hash)
    if done is not None:
        logger().info("align: shard %s already done (%d rows)", shard.name, len(done))
        return done
    refiner = None
    if not cfg.already_aligned:
        detector = detector or cfg.make_detector()
        refiner = make_refiner(cfg) if cfg.refine_passes else None
    # Decode a few batches' worth of photos at a time (bucketing needs a choice of sizes), but
    # never hold more than _DECODED_BUDGET bytes of decoded pixels (full-size PNGs are large).
    per_round = max(4 * cfg.batch_size, 16)
    rows: list[dict] = []
    loaded: list[_Loaded] = []
    held = 0
    for item in shard.items.itertuples(index=False):
        result = _load(item, plan.raw_dir, cfg, plan.params_hash)
        if isinstance(result, dict):
            rows.append(result)
            continue
        if cfg.already_aligned:
            rows.append(_import_aligned(result, out, cfg, plan.params_hash))
            continue
        loaded.append(result)
        held += result.image.pixels.nbytes
        if len(loaded) >= per_round or held >= _DECODED_BUDGET:
            rows.extend(_detect_and_align(loaded, plan.raw_dir, out, cfg, plan.params_hash, detector, refiner))
            loaded, held = [], 0
    if loaded:
        rows.extend(_detect_and_align(loaded, plan.raw_dir, out, cfg, plan.params_hash, detector, refiner))
    frame = _frame(rows)
    write_part(out, shard.name, frame, stage=STAGE, extra=EXTRA_COLUMNS)
    return frame


# --- finalize -------------------------------------------------------------------------------------


def _remove_unreferenced(out: Path, referenced: set[str]) -> int:
    """Delete files under ``out/images`` that no manifest row names (and empty folders)."""
    root = out / IMAGES_DIR
    removed = 0
    if not root.is_dir():
        return 0
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        here = Path(dirpath)
        for name in filenames:
            p = here / name
            if p.relative_to(out).as_posix() not in referenced:
                p.unlink(missing_ok=True)
                removed += 1
        if here != root and not any(here.iterdir()):
            here.rmdir()
    return removed


def _code_version() -> str:
    return code_version(*_CODE_MODULES)


def finalize_align(plan: AlignPlan, out_dir: str | os.PathLike | None = None, cfg: AlignConfig | None = None) -> AlignResult:
    """Fold the shards' part files and the reused and planned rows into ``manifest.parquet``,
    delete images no row refers to, clear the parts and commit ``stage.json``."""
    out = Path(out_dir).resolve() if out_dir is not None else plan.out_dir
    if cfg is not None:
        plan.check_cfg(cfg, "finalize_align")
    frames = [plan.fixed_rows, plan.reused_rows]
    for shard in plan.shards:
        part = _finished_part(out, shard, plan.params_hash)
        if part is None:
            raise RuntimeError(
                f"{_part_path(out, shard)}: shard {shard.index} ({len(shard.items)} files) is not aligned yet; "
                f"run align_shard(plan, {shard.index}) before finalize_align"
            )
        frames.append(part)
    rows = _concat(frames)
    write_manifest(out / MANIFEST_FILE, rows, stage=STAGE, extra=EXTRA_COLUMNS)
    removed = _remove_unreferenced(out, set(rows["output_path"]) - {""})
    remove_partials(out)
    clear_parts(out)
    counts = status_counts(rows)
    commit_record(
        out, STAGE, plan.record_params, {"raw": plan.inputs_digest}, _code_version(), [MANIFEST_FILE],
        summary={"counts": counts, "files": plan.num_files, "rows": len(rows), "raw_dir": str(plan.raw_dir)},
    )
    logger().info("align: %s -> %s (%s); %d stale images removed", plan.raw_dir, out, counts, removed)
    return AlignResult(out_dir=out, manifest_path=out / MANIFEST_FILE, counts=counts, files=plan.num_files,
                       rows=len(rows), processed=plan.todo_files, reused=plan.reused_files, skipped=False)


def check_up_to_date(plan: AlignPlan) -> AlignResult | None:
    """The result of the committed run, marked ``skipped``, when the stage record matches the
    plan's parameters, inputs and code and no file needs work; otherwise None."""
    if plan.shards:
        return None
    record = current_record(plan.out_dir, STAGE, plan.record_params, {"raw": plan.inputs_digest}, _code_version())
    if record is None:
        return None
    logger().info("align: %s is up to date (%s)", plan.out_dir, record.summary.get("counts"))
    return AlignResult(out_dir=plan.out_dir, manifest_path=plan.out_dir / MANIFEST_FILE,
                       counts=dict(record.summary.get("counts", {})), files=plan.num_files,
                       rows=int(record.summary.get("rows", 0)), processed=0, reused=plan.reused_files, skipped=True)


def run_align(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: AlignConfig | None = None,
    *,
    force: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    detector: FaceDetector | None = None,
) -> AlignResult:
    """Plan, align every shard in this process, finalize. Returns at once, marked ``skipped``,
    when the stage record matches and no file needs work; ``force`` redoes every file.

    Holds ``out_dir``'s lock (:func:`datasets.locks.folder_lock`) throughout: a second run on the
    same folder raises :class:`datasets.locks.FolderBusy` at once and leaves this one undisturbed.
    """
    cfg = cfg or AlignConfig()
    out = Path(out_dir).resolve()
    with folder_lock(out, STAGE):
        return _run_align_locked(raw_dir, out, cfg, force=force, shard_size=shard_size, detector=detector)


def _run_align_locked(raw_dir: str | os.PathLike, out: Path, cfg: AlignConfig, *, force: bool, shard_size: int,
                      detector: FaceDetector | None) -> AlignResult:
    if force:
        invalidate(out)
    plan = plan_align(raw_dir, out, cfg, shard_size=shard_size, force=force)
    done_already = None if force else check_up_to_date(plan)
    if done_already is not None:
        return done_already
    progress = Progress("align", total=plan.todo_files, description="align: detect + warp")
    done = 0
    for shard in plan.shards:
        if detector is None and not cfg.already_aligned and _finished_part(out, shard, plan.params_hash) is None:
            detector = cfg.make_detector()
        align_shard(plan, shard, detector=detector)
        done += len(shard.items)
        progress.update(done)
    return finalize_align(plan)


# --- geometry in the aligned image (what the lst stage lists) ----------------------------------------


def _box_in(matrices: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Integer boxes ``(K, 4)``: the bounds of ``boxes`` ``(K, 4)`` mapped by ``matrices`` ``(K, 2, 3)``."""
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x1, y2], 1), np.stack([x2, y2], 1)], 1)
    mapped = np.einsum("kij,kcj->kci", matrices[:, :, :2], corners) + matrices[:, None, :, 2]
    return np.concatenate([np.rint(mapped.min(axis=1)), np.rint(mapped.max(axis=1))], axis=1).astype(np.int64)


def aligned_geometry(faces: pd.DataFrame, size: tuple[int, int]) -> tuple[list, list]:
    """Per manifest row (``status``, ``bbox``, ``landmarks`` in source pixels), its box ``(x1, y1,
    x2, y2)`` ints and five landmarks ``((x, y), ...)`` in its aligned ``size`` image (``None`` when
    unknown): detected faces through the same similarity :func:`align_shard` warped them with
    (estimated from the recorded final landmarks, vectorised), fallbacks through their crop."""
    boxes: list = [None] * len(faces)
    points: list = [None] * len(faces)
    bbox_col, landmark_col, status = faces["bbox"].to_numpy(), faces["landmarks"].to_numpy(), faces["status"].to_numpy()
    has_box = np.array([b is not None and len(b) == 4 for b in bbox_col], dtype=bool)
    has_points = np.array([p is not None and len(p) == 10 for p in landmark_col], dtype=bool)
    detected = np.flatnonzero((status == "ok") & has_box & has_points)
    if len(detected):
        src = np.stack(landmark_col[detected]).astype(np.float64).reshape(-1, 5, 2)
        matrices = estimate_similarities(src, template_for(size))
        warped = np.round(np.einsum("kij,knj->kni", matrices[:, :, :2], src) + matrices[:, None, :, 2], 3)
        box = _box_in(matrices, np.stack(bbox_col[detected]).astype(np.float64))
        for i, b, w in zip(detected.tolist(), box.tolist(), warped.tolist()):
            boxes[i] = tuple(b)
            points[i] = tuple(map(tuple, w))
    for i in np.flatnonzero((status == "fallback") & has_box):
        bbox = np.asarray(bbox_col[i], np.float64)
        boxes[i] = tuple(int(v) for v in _box_in(crop_transform(bbox, size)[None], bbox[None])[0])
    return boxes, points

"""IJB-B / IJB-C protocol files as arcface_torch's ``eval_ijbc.py`` reads them, and their aligned faces.

Layout of one target (``IJBB`` or ``IJBC``; ``<t>`` is the target in lower case)::

    <root>/<TARGET>/meta/<t>_face_tid_mid.txt         image name, template id, media id (one image a line)
    <root>/<TARGET>/meta/<t>_name_5pts_score.txt      image name, x1 y1 ... x5 y5, detector score
    <root>/<TARGET>/meta/<t>_template_pair_label.txt  template id 1, template id 2, label (1 same, 0 not)
    <root>/<TARGET>/loose_crop/<image name>           the loosely cropped face images (JPEG)

Fields are separated by white space; lines of the two image files describe the same images in the
same order (``eval_ijbc.py`` relies on it; here it is checked). Landmarks are ``(x, y)`` pixels of
the loose crop in the order left eye, right eye, nose tip, left and right mouth corner.

Optional 1:N identification files (``insightface/recognition/_evaluation_/ijb/ijb_1n.py``), CSV with
a header line whose first two columns are ``TEMPLATE_ID,SUBJECT_ID`` (one line per image)::

    <t>_1N_probe_mixed.csv                              probe templates
    <t>_1N_gallery_G1.csv, <t>_1N_gallery_G2.csv        IJB-C galleries (S1/S2 for IJB-B)

Bad rows raise :class:`~datasets.errors.FormatError` naming the file and the line (1-based).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .errors import FormatError
from .face_align import TEMPLATE_112x96, estimate_similarity, warp_affine

__all__ = ["TARGETS", "IjbMeta", "IdentificationMeta", "target_dir", "meta_file", "read_face_tid_mid",
           "read_name_5pts_score", "read_template_pair_label", "read_template_subjects", "load_meta",
           "read_aligned_face"]

TARGETS = ("IJBB", "IJBC")
_GALLERIES = {"IJBB": ("S1", "S2"), "IJBC": ("G1", "G2")}
_T96 = TEMPLATE_112x96.astype(np.float32)
#: eval_ijbc.py's reference points: the 112x96 ones as a float32 array, x + 8.0 in float32 for 112x112.
_TEMPLATES = {(112, 96): _T96.astype(np.float64),
              (112, 112): (_T96 + np.array([8.0, 0.0], np.float32)).astype(np.float64)}


def _check_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"IJB target {target!r}: expected one of {', '.join(TARGETS)}")
    return target


def target_dir(root: str | os.PathLike, target: str) -> Path:
    """``<root>/<target>`` (the folder holding ``meta/`` and ``loose_crop/``), or ``root`` itself when
    it is that folder; ``FileNotFoundError`` naming both otherwise."""
    _check_target(target)
    root = Path(root).expanduser().resolve()
    for folder in (root / target, root):
        if (folder / "meta").is_dir():
            return folder
    raise FileNotFoundError(f"{root}: no {target}/meta folder (expected the IJB layout <root>/{target}/meta and "
                            f"<root>/{target}/loose_crop)")


def meta_file(folder: Path, target: str, kind: str) -> Path:
    """``<folder>/meta/<target lower>_<kind>``, e.g. ``kind="face_tid_mid.txt"``."""
    return folder / "meta" / f"{target.lower()}_{kind}"


def _bad_line(path: Path, fields: int, kinds: Sequence[type], skip: int = 0, sep: str | None = None) -> FormatError | None:
    """The first line of ``path`` that does not hold ``fields`` fields of ``kinds`` (the last kind repeats)."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, 1):
            if number <= skip:
                continue
            line = raw.decode("utf-8", errors="replace").strip()
            parts = line.split(sep) if sep else line.split()
            if len(parts) < fields or (sep is None and len(parts) != fields):
                return FormatError(path, f"line {number} has {len(parts)} fields ({line[:80]!r})", f"{fields} fields")
            for i, part in enumerate(parts[:fields]):
                kind = kinds[min(i, len(kinds) - 1)]
                try:
                    value = kind(part)
                except ValueError:
                    return FormatError(path, f"line {number}, field {i + 1}: {part!r} is not {'an integer' if kind is int else 'a number'}")
                if kind is float and not np.isfinite(value):
                    return FormatError(path, f"line {number}, field {i + 1}: {part!r} is not finite")
    return None


def _read_table(path: Path, fields: int, kinds: Sequence[type], *, skip: int = 0, sep: str | None = None,
                usecols: int | None = None) -> list[np.ndarray]:
    """Columns of a white-space (or ``sep``) separated table, parsed by pandas' C reader; any bad row
    is found again line by line and named."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"{path}: IJB protocol file not found")
    ncols = usecols or fields
    dtypes = {i: (str if kinds[min(i, len(kinds) - 1)] is str else
                  np.int64 if kinds[min(i, len(kinds) - 1)] is int else np.float64) for i in range(ncols)}
    try:
        frame = pd.read_csv(path, sep=sep or r"\s+", header=None, skiprows=skip, dtype=dtypes, engine="c",
                            usecols=range(ncols) if usecols else None, keep_default_na=False, na_filter=False)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        if isinstance(exc, pd.errors.EmptyDataError):
            raise FormatError(path, "file is empty", f"one line per entry, {fields} fields") from None
        bad = _bad_line(path, fields, kinds, skip, sep)
        raise (bad or FormatError(path, f"unreadable ({exc})", f"{fields} fields a line")) from None
    if frame.shape[1] != ncols:
        raise _bad_line(path, fields, kinds, skip, sep) or FormatError(path, f"{frame.shape[1]} fields a line", f"{fields}")
    columns = [frame[c].to_numpy() for c in frame.columns]
    for i, col in enumerate(columns):
        if col.dtype.kind == "f" and not np.isfinite(col).all():
            raise _bad_line(path, fields, kinds, skip, sep) or FormatError(path, f"column {i + 1} holds a non-finite value")
    if len(columns[0]) == 0:
        raise FormatError(path, "file has no entries", f"one line per entry, {fields} fields")
    return columns


def read_face_tid_mid(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``<t>_face_tid_mid.txt`` -> ``(names, templates (N,) int64, medias (N,) int64)``."""
    names, templates, medias = _read_table(Path(path), 3, (str, int, int))
    return [str(n) for n in names], templates.astype(np.int64), medias.astype(np.int64)


def read_name_5pts_score(path: str | os.PathLike) -> tuple[list[str], np.ndarray, np.ndarray]:
    """``<t>_name_5pts_score.txt`` -> ``(names, landmarks (N, 5, 2) float32, scores (N,) float32)``
    (float32 as ``eval_ijbc.py`` parses them)."""
    cols = _read_table(Path(path), 12, (str, float))
    names = [str(n) for n in cols[0]]
    landmarks = np.stack(cols[1:11], axis=1).astype(np.float32).reshape(-1, 5, 2)
    return names, landmarks, cols[11].astype(np.float32)


def read_template_pair_label(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``<t>_template_pair_label.txt`` -> ``(t1, t2, label)``, each ``(P,) int64``; labels must be 0 or 1."""
    path = Path(path)
    t1, t2, label = _read_table(path, 3, (int, int, int))
    bad = np.flatnonzero((label != 0) & (label != 1))
    if bad.size:
        raise FormatError(path, f"line {int(bad[0]) + 1}: label {int(label[bad[0]])}", "1 (same subject) or 0")
    return t1.astype(np.int64), t2.astype(np.int64), label.astype(np.int64)


def read_template_subjects(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """A 1:N CSV (header line, ``TEMPLATE_ID,SUBJECT_ID,...`` a line) -> ``(templates, subjects)`` ``(M,) int64``,
    one entry per line (a template repeats once per image)."""
    templates, subjects = _read_table(Path(path), 2, (int, int), skip=1, sep=",", usecols=2)
    return templates.astype(np.int64), subjects.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class IdentificationMeta:
    """1:N protocol: probe and gallery templates, each with its subject (first line of the template)."""

    probe_templates: np.ndarray
    probe_subjects: np.ndarray
    gallery_templates: np.ndarray
    gallery_subjects: np.ndarray
    files: tuple[Path, ...]


@dataclasses.dataclass(frozen=True)
class IjbMeta:
    """One IJB target's protocol. Per image ``i`` (line ``i + 1`` of both image files): ``names[i]``,
    ``templates[i]``, ``medias[i]``, ``landmarks[i]`` ``(5, 2) float32``, ``scores[i]`` (detector
    score, float32). Per pair ``p``: ``t1[p]``, ``t2[p]``, ``labels[p]`` (1 same subject).
    ``identification`` when the 1:N files are there."""

    target: str
    folder: Path
    names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    scores: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    labels: np.ndarray
    identification: IdentificationMeta | None
    files: tuple[Path, ...]

    @property
    def image_dir(self) -> Path:
        return self.folder / "loose_crop"

    def __len__(self) -> int:
        return len(self.names)


def _subjects_per_template(path: Path, templates: np.ndarray, subjects: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique templates (sorted) and the subject of each (its first line, as ``np.unique(return_index)`` picks)."""
    unique, first = np.unique(templates, return_index=True)
    return unique, subjects[first]


def _identification(folder: Path, target: str, known: np.ndarray) -> IdentificationMeta | None:
    probe = meta_file(folder, target, "1N_probe_mixed.csv")
    galleries = [meta_file(folder, target, f"1N_gallery_{g}.csv") for g in _GALLERIES[target]]
    present = [p for p in (probe, *galleries) if p.is_file()]
    if not present:
        return None
    if len(present) != 3:
        missing = [str(p) for p in (probe, *galleries) if not p.is_file()]
        raise FileNotFoundError(f"{folder / 'meta'}: 1:N identification needs {', '.join(missing)} too")
    gallery_t, gallery_s = [], []
    for path in galleries:
        t, s = read_template_subjects(path)
        gallery_t.append(t)
        gallery_s.append(s)
    probe_t, probe_s = read_template_subjects(probe)
    for path, t in ((probe, probe_t), *zip(galleries, gallery_t)):
        unknown = np.setdiff1d(t, known)
        if unknown.size:
            raise FormatError(path, f"template {int(unknown[0])} has no image in {target.lower()}_face_tid_mid.txt "
                                    f"({unknown.size} such templates)")
    pt, ps = _subjects_per_template(probe, probe_t, probe_s)
    gt, gs = _subjects_per_template(galleries[0], np.concatenate(gallery_t), np.concatenate(gallery_s))
    return IdentificationMeta(pt, ps, gt, gs, (probe, *galleries))


def load_meta(root: str | os.PathLike, target: str) -> IjbMeta:
    """Read and cross-check one target's protocol files (see the module docstring).

    Raises :class:`FormatError` naming the file and line for a bad row, an image listed differently
    in the two image files, or a pair naming a template that has no image.
    """
    folder = target_dir(root, target)
    tid_path = meta_file(folder, target, "face_tid_mid.txt")
    pts_path = meta_file(folder, target, "name_5pts_score.txt")
    pair_path = meta_file(folder, target, "template_pair_label.txt")
    names, templates, medias = read_face_tid_mid(tid_path)
    pts_names, landmarks, scores = read_name_5pts_score(pts_path)
    if len(pts_names) != len(names):
        raise FormatError(pts_path, f"{len(pts_names)} images, but {tid_path.name} lists {len(names)}",
                          "one line per image of the face_tid_mid file, in the same order")
    differ = next((i for i, (a, b) in enumerate(zip(names, pts_names)) if a != b), None)
    if differ is not None:
        raise FormatError(pts_path, f"line {differ + 1} names {pts_names[differ]!r}, but line {differ + 1} of "
                                    f"{tid_path.name} names {names[differ]!r}", "the same images in the same order")
    t1, t2, labels = read_template_pair_label(pair_path)
    known = np.unique(templates)
    for column in (t1, t2):
        missing = ~np.isin(column, known)
        if missing.any():
            line = int(np.flatnonzero(missing)[0])
            raise FormatError(pair_path, f"line {line + 1}: template {int(column[line])} has no image in {tid_path.name}")
    ident = _identification(folder, target, known)
    files = (tid_path, pts_path, pair_path, *(ident.files if ident else ()))
    return IjbMeta(target, folder, names, templates, medias, landmarks, scores, t1, t2, labels, ident, files)


def read_aligned_face(path: str | os.PathLike, landmarks: np.ndarray, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """The loose crop at ``path`` aligned from its five ``landmarks`` to the ArcFace template,
    ``(H, W, 3) uint8 RGB``, as ``eval_ijbc.py`` does it (OpenCV decode, least-squares similarity,
    bilinear ``warpAffine`` with a black border: :func:`datasets.face_align.estimate_similarity` and
    :func:`~datasets.face_align.warp_affine`, onto the script's float32 reference points).

    ``size`` ``(H, W)``: ``(112, 112)`` or ``(112, 96)`` warp to that template; any other size gets the
    112x112 crop resized to it (``cv2.INTER_AREA``), for models with another input size.
    """
    path = Path(path)
    try:
        data = np.fromfile(path, np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: IJB image not found") from None
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise FormatError(path, "not a decodable image", "a JPEG/PNG loose crop")
    size = (int(size[0]), int(size[1]))
    warp_size = size if size in _TEMPLATES else (112, 112)
    matrix = estimate_similarity(np.asarray(landmarks, np.float64).reshape(5, 2), _TEMPLATES[warp_size])
    aligned = warp_affine(bgr, matrix, warp_size)
    if size not in _TEMPLATES:
        aligned = cv2.resize(aligned, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(aligned[:, :, ::-1])

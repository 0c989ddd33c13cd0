"""Pack stage: a ``.lst`` into ``train.rec`` / ``train.idx`` / ``property`` (spec 2.1-2.2).

Input: a ``.lst`` in either form (:mod:`datasets.lst`; the form is detected from its first lines):
usually the ``train.lst`` of an lst-stage folder (:mod:`tasks.lst`; its ``stage.json`` gives the image
size and class count, its ``labels.csv`` the identity names), or a user's list -- InsightFace form
(``aligned \t path \t label [\t bbox [\t landmarks]]``, e.g. the align_megaface / webface lists) or
MXNet im2rec form (``index \t label \t path``: face crops, packed as they are, class = first label,
records renumbered 1..N). Relative image paths are taken relative to the list's folder.

Output (``out_dir``), as face2rec2 writes it:

* ``train.rec`` / ``train.idx``: image records keys ``1..N`` in list order (or shuffled, below),
  then record 0 (``[N+1, N+1+K]``), then one identity record per run of equal labels. Image
  headers carry ``[label, aligned]`` (``label_format="array"``, face2rec2, flag 2) or the scalar
  label (``"scalar"``, dir2rec / dataset_merge, flag 0). The payload of an ``aligned=1`` line is
  the image file's bytes, copied verbatim (no re-encode); each is checked to be an image of the
  dataset's size. An ``aligned=0`` line with landmarks is aligned as face2rec2 does (5-point
  similarity to the template of the image size, then JPEG ``jpeg_quality``). One with a bbox and no
  landmarks is cropped as InsightFace's ``face_preprocess.preprocess`` does without landmarks (the
  box grown by 22 pixels on every side, clipped to the photo, resized to the image size; face2rec2
  itself skips such lines) and gets a ``fallback`` manifest row that says so; one with neither is
  skipped (a ``skipped`` row), as face2rec2 does.
* ``property``: ``num_classes,height,width`` (no newline); ``num_classes`` from the lst stage
  (largest label + 1) or the largest label + 1.
* ``labels.csv``: the lst stage's ``label,identity`` table, copied (when there is one).
* ``manifest.parquet``: one row per list line: ``status`` (``ok``, ``fallback``: bbox crop,
  ``skipped``), ``label``, ``key`` and ``offset`` (byte offset of its record in ``train.rec``; -1 when
  skipped), ``line`` (0-based entry of the list).
* ``stage.json``, written last.

``shuffle`` (seeded, ``numpy`` PCG64) permutes the identity order and the order within every
identity; an identity stays one contiguous run (one identity record). Same list, image bytes
and parameters give a byte-identical ``train.rec``. The three files are replaced atomically, so
a killed run leaves the previous set or none, and the next run rebuilds it. The stage record is
removed before anything is replaced and written last.

Up to date: same list, labels file, parameters and code, and every image with the size and mtime
it had when it was read (``stat`` only, no reads). Speed (``bench/pack.py``): a plain list is
parsed with one split; entries go in batches of :data:`_BATCH`: read with one ``read`` each (size
and mtime from ``fstat`` of the open file), size-checked from the JPEG frame header, hashed, then
framed with one header array and one copy (:meth:`InsightFaceRecWriter.add_many`); a background
thread writes the ``.rec`` and syncs it every 8 MiB, and the manifest is written while the last
bytes are synced.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    import sys

    from tasks import cli

    _args = cli.build_parser("pack").parse_args()
    from tasks.pack import run_command

    sys.exit(cli.execute(run_command, _args))

import argparse
import hashlib
import io
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image
from prefect import task
from prefect.cache_policies import NO_CACHE

from datasets.atomic import atomic_paths, atomic_write_bytes, remove_partials
from datasets.errors import FormatError
from datasets.face_codec import encode_jpeg
from datasets.face_align import center_crop, warp_face
from datasets.hashing import params_hash, sha256_file
from datasets.image_size import parse_image_size
from datasets.images import UnreadableImage, decode_image
from datasets.locks import folder_lock
from datasets.lst import InsightFaceColumns, InsightFaceLine, read_lst_columns
from datasets.manifest import MANIFEST_FILE, status_counts, write_manifest
from datasets.rec_layout import IDX_FILE, LABELS_FILE, PROPERTY_FILE, REC_FILE, InsightFaceRecWriter
from tasks import cli
from tasks.configs import PackConfig
from tasks.runtime import Progress, finished, logger
from tasks.stage import code_version, commit_record, current_record, invalidate, load_record

__all__ = ["STAGE", "EXTRA_COLUMNS", "PackConfig", "PackResult", "encoded_size", "pack_order", "run_pack", "pack_task",
           "main"]

STAGE = "pack"
DEFAULT_IMAGE_SIZE = (112, 112)
LIST_FILE = "train.lst"
_CODE_MODULES = ("tasks.pack", "datasets.lst", "datasets.rec_layout", "datasets.recordio", "datasets.face_align",
                 "datasets.face_codec")

EXTRA_COLUMNS: dict[str, pa.DataType] = {
    "label": pa.int64(),
    "key": pa.int64(),
    "offset": pa.int64(),
    "line": pa.int64(),
    "aligned": pa.bool_(),
}


@dataclass
class PackResult:
    """Outcome of :func:`run_pack`. ``image_size`` is (height, width)."""

    out_dir: Path
    rec_path: Path
    idx_path: Path
    property_path: Path
    manifest_path: Path
    images: int
    identities: int
    num_classes: int
    image_size: tuple[int, int]
    counts: dict[str, int]
    skipped: bool


def pack_order(labels: np.ndarray | list[int], shuffle: bool, seed: int) -> np.ndarray:
    """Order (indices into ``labels``) in which list entries are packed.

    Without ``shuffle`` the list order. With it, entries are grouped by label (groups in order of
    first appearance), the groups are permuted, then the entries of each group, with one
    ``numpy.random.default_rng(seed)``: every label ends up one contiguous run.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not shuffle:
        return np.arange(len(labels))
    uniq, first = np.unique(labels, return_index=True)
    groups = [np.flatnonzero(labels == lab) for lab in uniq[np.argsort(first)]]
    rng = np.random.default_rng(seed)
    parts = [groups[g][rng.permutation(len(groups[g]))] for g in rng.permutation(len(groups))]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _resolve_all(paths: list[str], root: str) -> list[str]:
    """``paths`` with the relative ones taken relative to ``root``."""
    if os.sep == "/" and all(map(str.startswith, paths, itertools.repeat("/"))):
        return list(paths)  # all absolute (what the lst stage writes): one C-level pass
    isabs, join = os.path.isabs, os.path.join
    return [p if isabs(p) else join(root, p) for p in paths]


def _images_stamp(paths: list[str], sizes: list[int], mtimes: list[int]) -> str:
    """Digest of every listed image's path, size (bytes) and mtime (ns), in list order."""
    digest = hashlib.sha256("\0".join(paths).encode("utf-8", "surrogateescape"))
    digest.update(np.array(sizes, np.int64).tobytes())
    digest.update(np.array(mtimes, np.int64).tobytes())
    return digest.hexdigest()


def _cannot_read(lst: Path, entry: int, path: str, exc: OSError) -> FormatError:
    return FormatError(lst, f"entry {entry + 1}: image {path} cannot be read ({exc.strerror or exc})",
                       "an existing image file for every line")


def _stat_images(paths: list[str], lst: Path) -> str:
    """:func:`_images_stamp` of the images as they are now (``stat`` only; they are not read)."""
    try:
        stats = list(map(os.stat, paths))
    except OSError:
        for i, p in enumerate(paths):
            try:
                os.stat(p)
            except OSError as exc:
                raise _cannot_read(lst, i, p, exc) from None
        raise
    return _images_stamp(paths, [st.st_size for st in stats], [st.st_mtime_ns for st in stats])


#: JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _jpeg_frame_header(data: bytes) -> int | None:
    """Offset of a JPEG's start-of-frame marker (found by walking the segments before it)."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker in _SOF_MARKERS:
            return i
        if marker == 0xDA:  # image data before any frame header
            return None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None


def encoded_size(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG (from its frame header) or PNG (IHDR) without decoding;
    None for other or malformed data. Microseconds instead of Pillow's ~70 us per file."""
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big")
    i = _jpeg_frame_header(data)
    if i is None:
        return None
    return (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]


class _SizeCheck:
    """``check(data)``: is ``data`` a JPEG of ``size`` (height, width)? Exactly
    ``encoded_size(data) == size`` for JPEGs, in a fraction of the time.

    Files from one encoder share the bytes before the frame header (JFIF header, quantisation
    tables). The check remembers them from the last JPEG it walked: a file that starts with the
    same bytes has its frame header at the same offset (the walk reads only those bytes), so a
    prefix comparison and the four size bytes decide. Other files are walked.
    """

    def __init__(self, size: tuple[int, int]):
        self.size = size
        self.prefix: bytes | None = None  # bytes up to and including the frame marker
        self.size_bytes = bytes([size[0] >> 8, size[0] & 0xFF, size[1] >> 8, size[1] & 0xFF])

    def __call__(self, data: bytes) -> bool:
        prefix = self.prefix
        if prefix is not None and data.startswith(prefix):
            k = len(prefix)  # frame header: marker, length (2), precision, height (2), width (2)
            return data[k + 3:k + 7] == self.size_bytes
        i = _jpeg_frame_header(data)
        if i is None:
            return False
        self.prefix = data[:i + 2]
        return encoded_size(data) == self.size


_O_READ = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)


def _aligned_payload(data: bytes, size: tuple[int, int], lst: Path, where: str) -> bytes:
    """``data`` if it is an image of ``size``; FormatError naming the entry otherwise."""
    found = encoded_size(data)
    if found is None:
        try:
            with Image.open(io.BytesIO(data)) as img:
                found = img.size[1], img.size[0]
        except Exception as exc:  # noqa: BLE001 - Pillow raises many types for non-images
            raise FormatError(lst, f"{where}: not an image ({type(exc).__name__}: {exc})", "an encoded face image") from None
    height, width = found
    if (height, width) != size:
        raise FormatError(lst, f"{where}: image is {height}x{width}", f"{size[0]}x{size[1]} like the dataset (aligned=1)")
    return data


#: Margin (pixels, both sides together) of the bbox crop of face_preprocess.preprocess.
BBOX_MARGIN = 44


def _unaligned_payload(line: InsightFaceLine, path: str, size: tuple[int, int], quality: int, lst: Path,
                       where: str) -> bytes | None:
    """JPEG of the face of an ``aligned=0`` line: aligned on its landmarks as face2rec2 does, or its
    bbox cropped with a margin and resized as ``face_preprocess.preprocess`` does without landmarks
    (None: neither landmarks nor a bbox)."""
    if line.landmarks is None and line.bbox is None:
        return None
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        pixels = decode_image(path, data).pixels
    except UnreadableImage as exc:
        raise FormatError(lst, f"{where}: {exc.reason}", "a readable photo") from None
    if line.landmarks is not None:
        face = warp_face(pixels, np.asarray(line.landmarks, dtype=np.float64), size)
    else:
        try:
            face = center_crop(pixels, size, bbox=line.bbox, margin=BBOX_MARGIN)
        except ValueError as exc:
            raise FormatError(lst, f"{where}: bbox {line.bbox}: {exc}", "a box inside the photo") from None
    return encode_jpeg(face, quality)


#: List entries read, checked, hashed and written per batch (about 3 MB of 112x112 faces).
_BATCH = 512


class _FaceReader:
    """The record payloads of a list's entries, batch by batch (:meth:`batch`), with the size and
    mtime of every image taken from the open file as it is read (:meth:`stamp`)."""

    def __init__(self, rows: InsightFaceColumns, paths: list[str], size: tuple[int, int], quality: int, lst: Path):
        self.rows, self.paths, self.size, self.quality, self.lst = rows, paths, size, quality, lst
        self.check = _SizeCheck(size)
        self.cropped: list[int] = []  # rows cropped from their bbox (no landmarks)
        self.sizes = [0] * len(paths)
        self.mtimes = [0] * len(paths)

    def stamp(self) -> str:
        """:func:`_images_stamp` of the images as they were read (once every entry went through :meth:`batch`)."""
        return _images_stamp(self.paths, self.sizes, self.mtimes)

    def read_faces(self, rows: list[int]) -> list[bytes]:
        """The image bytes of (aligned) list rows ``rows``, each read in one ``read`` of the size
        ``fstat`` gives and checked to be an image of the dataset's size."""
        paths, sizes, mtimes, check = self.paths, self.sizes, self.mtimes, self.check
        open_, fstat, read, close = os.open, os.fstat, os.read, os.close
        out: list[bytes] = []
        append = out.append
        prefix, size_bytes = check.prefix, check.size_bytes
        k = len(prefix or b"")
        i = -1
        try:
            for i in rows:
                fd = open_(paths[i], _O_READ)
                try:
                    st = fstat(fd)
                    size = st.st_size
                    data = read(fd, size + 1)  # one byte more to see the end
                    if len(data) > size:  # grew since fstat: read the rest
                        parts = [data]
                        while chunk := read(fd, 1 << 20):
                            parts.append(chunk)
                        data = b"".join(parts)
                finally:
                    close(fd)
                sizes[i], mtimes[i] = size, st.st_mtime_ns
                # _SizeCheck.__call__ inlined for the common case (same encoder as the last JPEG)
                if prefix is None or not (data.startswith(prefix) and data[k + 3:k + 7] == size_bytes):
                    if not check(data):
                        _aligned_payload(data, self.size, self.lst, f"entry {i + 1} ({paths[i]})")
                    prefix = check.prefix
                    k = len(prefix or b"")
                append(data)
        except OSError as exc:
            raise _cannot_read(self.lst, i, paths[i], exc) from None
        return out

    def batch(self, rows: list[int]) -> tuple[list[int], list[bytes]]:
        """``(kept rows, payloads)`` of list rows ``rows``, in order; skipped lines left out."""
        aligned = self.rows.aligned
        if aligned[rows].all():  # the common case: faces copied verbatim
            return rows, self.read_faces(rows)
        kept, payloads = [], []
        for i in rows:
            if aligned[i]:
                data = self.read_faces([i])[0]
            else:
                path = self.paths[i]
                try:
                    st = os.stat(path)
                except OSError as exc:
                    raise _cannot_read(self.lst, i, path, exc) from None
                self.sizes[i], self.mtimes[i] = st.st_size, st.st_mtime_ns
                line = self.rows.line(i)
                data = _unaligned_payload(line, path, self.size, self.quality, self.lst, f"entry {i + 1} ({path})")
                if data is None:
                    continue
                if line.landmarks is None:
                    self.cropped.append(i)
            kept.append(i)
            payloads.append(data)
        return kept, payloads


def _image_size_of(path: str, lst: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Exception as exc:  # noqa: BLE001
        raise FormatError(lst, f"first image {path} cannot be read ({exc})", "an image to take the size from") from None


def _lst_stage_defaults(folder: Path) -> tuple[Path, dict]:
    record = load_record(folder)
    if record is None or record.stage != "lst":
        raise FormatError(folder, "no committed lst stage record (stage.json)", "a finished lst-stage folder or a .lst file")
    return folder / LIST_FILE, {"record": record.fingerprint, **record.summary}


def run_pack(
    lst: str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: PackConfig | None = None,
    *,
    image_size: str | tuple[int, int] | None = None,
    num_classes: int | None = None,
    labels: str | os.PathLike | None = None,
    force: bool = False,
) -> PackResult:
    """Pack ``lst`` (a ``.lst`` file or an lst-stage folder) into ``out_dir``.

    ``image_size`` (height, width), ``num_classes`` and ``labels`` (a ``label,identity`` CSV)
    default to the lst stage's when ``lst`` is its folder; otherwise to the first aligned image's
    size (112x112 when every line is a photo to align), the largest label + 1, and none. Skipped
    (``skipped=True``) when the stage record matches (same list, image sizes and mtimes, parameters,
    code); ``force`` rebuilds. Holds ``out_dir``'s lock (:func:`datasets.locks.folder_lock`) while it runs.
    """
    cfg = cfg or PackConfig()
    out = Path(out_dir).resolve()
    with folder_lock(out, STAGE):  # a second pack into out_dir fails at once (FolderBusy)
        return _run_pack_locked(lst, out, cfg, image_size=image_size, num_classes=num_classes, labels=labels,
                                force=force)


def _run_pack_locked(lst: str | os.PathLike, out: Path, cfg: PackConfig, *,
                     image_size: str | tuple[int, int] | None, num_classes: int | None,
                     labels: str | os.PathLike | None, force: bool) -> PackResult:
    source = Path(lst).resolve()
    stage_info: dict = {}
    if source.is_dir():
        source, stage_info = _lst_stage_defaults(source)
        image_size = image_size or tuple(stage_info["image_size"])
        num_classes = num_classes if num_classes is not None else stage_info.get("num_classes")
        if labels is None and (source.parent / LABELS_FILE).is_file():
            labels = source.parent / LABELS_FILE
    form, lst_rows = read_lst_columns(source)
    if not len(lst_rows):
        raise FormatError(source, "the list has no entries", "one line per image")
    n = len(lst_rows)
    paths = _resolve_all(lst_rows.paths, str(source.parent))
    if image_size is not None:
        size = parse_image_size(image_size)
    elif lst_rows.aligned.any():  # the first face crop's size
        size = _image_size_of(paths[int(np.argmax(lst_rows.aligned))], source)
    else:  # photos only: faces are aligned at the ArcFace size
        size = DEFAULT_IMAGE_SIZE
        logger().info("pack: %s holds no aligned face to take the size from; aligning at %dx%d", source, *size)
    label_array = lst_rows.labels
    if num_classes is not None and int(num_classes) <= int(label_array.max()):
        raise ValueError(f"{source}: num_classes {num_classes} but labels go up to {int(label_array.max())}")

    params = {"config": cfg.model_dump(mode="json"), "image_size": list(size), "num_classes": num_classes}
    inputs = {"lst": sha256_file(source)}
    if labels is not None:
        inputs["labels"] = sha256_file(labels)
    code = code_version(*_CODE_MODULES)
    record = None if force else load_record(out)
    if record is not None and "images" in record.inputs:
        # everything else matches: stat the images (without reading them) to see if they changed
        if current_record(out, STAGE, params, {**inputs, "images": record.inputs["images"]}, code) is not None \
                and _stat_images(paths, source) == record.inputs["images"]:
            logger().info("pack: %s is up to date (%s)", out, record.summary.get("counts"))
            return _result(out, record.summary, skipped=True)
    invalidate(out)  # from here on the old record no longer describes the folder's files
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)

    order = pack_order(label_array, cfg.shuffle, cfg.seed).tolist()
    keys = np.full(n, -1, np.int64)
    offsets = np.full(n, -1, np.int64)
    shas = np.full(n, "", dtype=object)
    ok = np.zeros(n, bool)
    reader = _FaceReader(lst_rows, paths, size, cfg.jpeg_quality, source)
    sha256 = hashlib.sha256
    progress = Progress("pack", total=n, description="pack: copy faces into train.rec", log_every_s=30)
    # The manifest goes to a temporary name and is renamed into place only after train.rec/.idx/
    # property were: a pack that fails on the way (disk full) leaves no manifest of a set it did
    # not write.
    with atomic_paths(out / MANIFEST_FILE) as (manifest_tmp,), \
            ThreadPoolExecutor(1, thread_name_prefix="pack-manifest") as manifest_thread:
        with InsightFaceRecWriter(out, image_size=size, label_format=cfg.label_format, num_classes=num_classes,
                                  background_writes=True) as writer:
            for start in range(0, n, _BATCH):
                kept_rows, payloads = reader.batch(order[start:start + _BATCH])
                if kept_rows:
                    kept = np.array(kept_rows, np.int64)
                    shas[kept] = [sha256(data).hexdigest() for data in payloads]
                    keys[kept], offsets[kept] = writer.add_many(label_array[kept], payloads, lst_rows.aligned[kept])
                    ok[kept] = True
                if (start + _BATCH) // 10000 > start // 10000:
                    progress.update(min(start + _BATCH, n))
            cropped = np.zeros(n, bool)
            cropped[reader.cropped] = True
            manifest = _manifest(paths, shas, params_hash(params), ok, label_array, keys, offsets, lst_rows.aligned,
                                 cropped)
            # written while the .rec is synced to disk and renamed into place (the stage record,
            # written last, commits both)
            manifest_written = manifest_thread.submit(write_manifest, manifest_tmp, manifest, stage=STAGE,
                                                      extra=EXTRA_COLUMNS)
        manifest_written.result()
    progress.update(n)
    inputs["images"] = reader.stamp()
    summary_rec = writer.summary
    assert summary_rec is not None
    outputs = [REC_FILE, IDX_FILE, PROPERTY_FILE, MANIFEST_FILE]
    if labels is not None:
        atomic_write_bytes(out / LABELS_FILE, Path(labels).read_bytes())
        outputs.append(LABELS_FILE)
    summary = {
        "counts": status_counts(manifest), "images": summary_rec.num_images,
        "identities": len(np.unique(label_array[ok])), "identity_runs": len(summary_rec.identities),
        "num_classes": summary_rec.property.num_classes, "image_size": list(size), "lst": str(source),
        "lst_form": form,
    }
    commit_record(out, STAGE, params, inputs, code, outputs, summary=summary)
    logger().info("pack: %d images of %d identities -> %s", summary["images"], summary["identities"], out / REC_FILE)
    return _result(out, summary, skipped=False)


_SKIPPED = "aligned=0 and neither landmarks nor a bbox (face2rec2 skips such lines)"
_CROPPED = (f"aligned=0 with a bbox and no landmarks: the bbox grown by {BBOX_MARGIN // 2} px on every side, "
            "cropped and resized (face_preprocess.preprocess), not landmark-aligned")


def _manifest(paths: list[str], shas: np.ndarray, params_digest: str, ok: np.ndarray, labels: np.ndarray,
              keys: np.ndarray, offsets: np.ndarray, aligned: np.ndarray, cropped: np.ndarray | None = None
              ) -> pd.DataFrame:
    """One manifest row per list entry (``item_id`` = its 0-based entry number)."""
    n = len(paths)
    cropped = np.zeros(n, bool) if cropped is None else cropped
    return pd.DataFrame({
        "item_id": [str(i) for i in range(n)],
        "source_path": paths,
        "source_sha256": shas,
        "params_hash": params_digest,
        "status": np.where(ok, np.where(cropped, "fallback", "ok"), "skipped").astype(object),
        "reason": np.where(ok, np.where(cropped, _CROPPED, ""), _SKIPPED).astype(object),
        "output_path": np.where(ok, REC_FILE, "").astype(object),
        "label": labels,
        "key": keys,
        "offset": offsets,
        "line": np.arange(n, dtype=np.int64),
        "aligned": aligned,
    })


def _result(out: Path, summary: dict, skipped: bool) -> PackResult:
    return PackResult(
        out_dir=out, rec_path=out / REC_FILE, idx_path=out / IDX_FILE, property_path=out / PROPERTY_FILE,
        manifest_path=out / MANIFEST_FILE, images=int(summary["images"]), identities=int(summary["identities"]),
        num_classes=int(summary["num_classes"]), image_size=tuple(summary["image_size"]),
        counts=dict(summary["counts"]), skipped=skipped,
    )


@task(name="pack", cache_policy=NO_CACHE)
def pack_task(lst: str | os.PathLike, out_dir: str | os.PathLike, cfg: PackConfig | None = None,
              force: bool = False, image_size: str | None = None) -> PackResult:
    """:func:`run_pack` on an lst-stage folder (or a ``.lst``); Skipped in the UI when up to date."""
    return finished(run_pack(lst, out_dir, cfg, image_size=image_size, force=force))


def run_command(args: argparse.Namespace) -> int:
    """``facepipe pack`` / ``python -m tasks.pack`` with parsed arguments."""
    cfg = cli.config_from_args(args, PackConfig)
    result = run_pack(args.lst, args.out_dir, cfg, image_size=args.image_size, num_classes=args.num_classes, force=args.force)
    print(json.dumps({"rec": str(result.rec_path), "images": result.images, "identities": result.identities,
                      "num_classes": result.num_classes, "skipped": result.skipped}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("pack", run_command, argv)

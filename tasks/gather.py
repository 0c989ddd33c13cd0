"""The finished training set: one folder with everything a trainer reads, plus a picture of it.

``gather_dataset`` fills ``<data_root>/datasets/<name>/`` with **hard links** to the final
``train.rec``, ``train.idx``, ``property`` and ``labels.csv`` (from the pack stage, or the merge
stage when there is one) and to every verification ``<set>.bin``, plus ``dataset.json``
(counts, image size, where each file came from). Hard links cost no space and make the folder a
consistent snapshot: a stage rewrites its files by atomic rename, which leaves the linked inode
alone until the next gather re-links. Where hard links are impossible (another file system) the
files are copied. Every link or copy replaces its target atomically; files of an earlier gather
that are no longer wanted are removed; ``stage.json`` is written last.

``sample_grid`` draws the first face of some identities of a packed set as one JPEG, for the
Prefect UI (a markdown artifact with a ``data:`` URI).
"""
from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import cv2
import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from datasets.atomic import atomic_paths, atomic_write_text
from datasets.errors import FormatError
from datasets.face_codec import decode_face, encode_jpeg
from datasets.hashing import params_hash
from datasets.rec_layout import LABELS_FILE, PROPERTY_FILE, REC_FILES, read_rec_index
from datasets.recordio import MXRecordIO, unpack
from tasks.runtime import finished, logger
from tasks.stage import code_version, commit_record, current_record, load_record

__all__ = ["STAGE", "DATASET_FILE", "DatasetResult", "gather_dataset", "sample_grid", "sample_grid_markdown",
           "gather_dataset_task"]

STAGE = "dataset"
DATASET_FILE = "dataset.json"
TRAIN_FILES = (*REC_FILES, LABELS_FILE)


@dataclass
class DatasetResult:
    """The gathered folder and what ``dataset.json`` says about it."""

    out_dir: Path
    info: dict[str, Any]
    skipped: bool


def _link(source: Path, target: Path) -> str:
    """Hard-link (else copy) ``source`` to ``target``, replacing it atomically; returns how."""
    with atomic_paths(target) as (tmp,):
        try:
            os.link(source, tmp)
            how = "link"
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            shutil.copyfile(source, tmp)
            how = "copy"
    return how


def _stamp(paths: Mapping[str, Path]) -> str:
    return params_hash({name: [str(p), p.stat().st_size, p.stat().st_mtime_ns] for name, p in sorted(paths.items())}, 32)


def gather_dataset(
    out_dir: str | os.PathLike,
    train_dir: str | os.PathLike,
    bins: Mapping[str, str | os.PathLike] | None = None,
    *,
    info: Mapping[str, Any] | None = None,
    force: bool = False,
) -> DatasetResult:
    """Link ``train_dir``'s training files and the ``bins`` (``{set name: .bin path}``) into
    ``out_dir`` and write ``dataset.json`` (``info`` plus counts read from the ``.rec``)."""
    out = Path(out_dir).resolve()
    train = Path(train_dir).resolve()
    wanted: dict[str, Path] = {name: train / name for name in TRAIN_FILES if (train / name).is_file()}
    for required in TRAIN_FILES[:3]:
        if required not in wanted:
            raise FileNotFoundError(f"{train / required}: missing; gather needs a packed dataset folder")
    for set_name, path in (bins or {}).items():
        wanted[f"{set_name}.bin"] = Path(path).resolve()
    params = {"files": {name: str(p) for name, p in sorted(wanted.items())}, "info": dict(info or {})}
    inputs = {"files": _stamp(wanted)}
    code = code_version("tasks.gather")
    if not force:
        record = current_record(out, STAGE, params, inputs, code)
        if record is not None:
            logger().info("dataset: %s is up to date", out)
            return DatasetResult(out, dict(record.summary), skipped=True)

    out.mkdir(parents=True, exist_ok=True)
    previous = load_record(out)
    how = {name: _link(source, out / name) for name, source in sorted(wanted.items())}
    if previous is not None:
        for stale in set(previous.outputs) - set(wanted) - {DATASET_FILE}:
            (out / stale).unlink(missing_ok=True)
    index = read_rec_index(out)
    assert index.property is not None
    summary = {
        **dict(info or {}),
        "images": int(len(index.keys)),
        "identities": int(len(np.unique(index.labels))),
        "num_classes": index.property.num_classes,
        "image_size": [index.property.height, index.property.width],
        "bins": sorted(bins or {}),
        "files": {name: {"from": str(wanted[name]), "how": how[name]} for name in sorted(wanted)},
    }
    atomic_write_text(out / DATASET_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    commit_record(out, STAGE, params, inputs, code, [*sorted(wanted), DATASET_FILE], summary=summary)
    logger().info("dataset: %s: %d images, %d identities, bins %s", out, summary["images"], summary["identities"],
                  summary["bins"])
    return DatasetResult(out, summary, skipped=False)


@task(name="gather", cache_policy=NO_CACHE)
def gather_dataset_task(out_dir: str | os.PathLike, train_dir: str | os.PathLike,
                        bins: Mapping[str, str] | None = None, info: Mapping[str, Any] | None = None,
                        force: bool = False) -> DatasetResult:
    """:func:`gather_dataset`; Skipped in the UI when up to date."""
    return finished(gather_dataset(out_dir, train_dir, bins, info=info, force=force))


def sample_grid(dataset_dir: str | os.PathLike, faces: int = 16, columns: int = 8, quality: int = 80) -> bytes:
    """JPEG bytes of a grid: the first image of up to ``faces`` identities spread over the set
    (identity records of an InsightFace set; the first ``faces`` images of any other)."""
    index = read_rec_index(dataset_dir)
    if len(index.identities):
        picks = np.linspace(0, len(index.identities) - 1, min(faces, len(index.identities))).round().astype(int)
        keys = [int(index.identities[i][0]) for i in np.unique(picks)]
        offsets = [int(index.offsets[k - 1]) for k in keys]
    else:
        offsets = [int(o) for o in index.offsets[:faces]]
    tiles = []
    with MXRecordIO(index.rec_path, "r") as reader:
        for offset in offsets:
            _header, payload = unpack(reader.read_at(offset))
            with contextlib.suppress(FormatError):  # a record that does not decode is left out of the picture
                tiles.append(decode_face(payload, index.rec_path))
    if not tiles:
        raise ValueError(f"{dataset_dir}: no decodable image to draw")
    h, w = tiles[0].shape[:2]
    tiles = [t if t.shape[:2] == (h, w) else cv2.resize(t, (w, h)) for t in tiles]
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    grid = np.zeros((rows * h, cols * w, 3), np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return encode_jpeg(grid, quality)


def sample_grid_markdown(dataset_dir: str | os.PathLike, title: str, faces: int = 16) -> str:
    """Markdown with :func:`sample_grid` embedded as a ``data:image/jpeg;base64`` URI."""
    data = base64.b64encode(sample_grid(dataset_dir, faces)).decode("ascii")
    return f"### {title}\n\n![sample aligned faces](data:image/jpeg;base64,{data})\n"

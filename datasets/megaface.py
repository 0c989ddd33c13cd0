"""MegaFace devkit files (formats-spec 6.1-6.3): feature files, their names, noise lists, image lists.

Feature file ("OpenCV mat" of the devkit's ``matio``): four little-endian int32
``rows, cols, stride_bytes, cv_type`` then ``rows * cols`` values row-major; a D-dim feature is
``(D, 1, 4, 5)`` + D float32 (cv type 5 = CV_32F, 6 = CV_64F with 8-byte values), so 512-d = 2064
bytes and the 513-d output of noise removal = 2068 bytes.

Feature file name = image file name + suffix: ``<img>_<algo>.bin`` (2018-12 ``Evaluation/Megaface``)
or ``<img>_<algo>_<H>x<W>.bin`` (early-2018 ``src/megaface``); the devkit finds features as
``<root>/<relative image path><suffix>``.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

from datasets.atomic import atomic_write_bytes
from datasets.errors import FormatError

HEADER = struct.Struct("<4i")
CV_32F = 5
CV_64F = 6
_VALUE_DTYPE = {CV_32F: np.dtype("<f4"), CV_64F: np.dtype("<f8")}


def encode_feature(vec: np.ndarray) -> bytes:
    """Bytes of a feature file for ``vec`` ``(D,)`` or ``(D, 1)``, written as float32 (CV_32F)."""
    arr = np.asarray(vec)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"a feature must be a non-empty (D,) vector, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"a feature must be numeric, got dtype {arr.dtype}")
    values = arr.astype("<f4")
    if not np.isfinite(values).all():
        raise ValueError(f"feature value {int(np.flatnonzero(~np.isfinite(values))[0])} is not finite")
    return HEADER.pack(values.size, 1, 4, CV_32F) + values.tobytes()


def decode_feature(data: bytes, path: str | os.PathLike | None = None) -> np.ndarray:
    """Values of a feature file: ``(rows,)`` when ``cols == 1``, else ``(rows, cols)``; float32 for
    CV_32F, float64 for CV_64F. Raises :class:`FormatError` naming the header field that is wrong."""
    if len(data) < HEADER.size:
        raise FormatError(path, f"file is {len(data)} bytes, shorter than the 16-byte header", "rows, cols, stride, type")
    rows, cols, stride, cv_type = HEADER.unpack_from(data)
    if cv_type not in _VALUE_DTYPE:
        raise FormatError(path, f"OpenCV type {cv_type} at offset 12", "5 (CV_32F) or 6 (CV_64F)")
    if rows <= 0 or cols <= 0:
        raise FormatError(path, f"header rows={rows}, cols={cols} at offset 0", "positive sizes")
    itemsize = _VALUE_DTYPE[cv_type].itemsize
    if stride != cols * itemsize:
        raise FormatError(path, f"row stride {stride} bytes at offset 8", f"{cols * itemsize} = cols x {itemsize}")
    expected = HEADER.size + rows * cols * itemsize
    if len(data) != expected:
        raise FormatError(
            path, f"file is {len(data)} bytes",
            f"{expected} = 16-byte header + {rows} x {cols} values of {itemsize} bytes",
        )
    values = np.frombuffer(data, dtype=_VALUE_DTYPE[cv_type], offset=HEADER.size)
    values = values.astype(values.dtype.newbyteorder("="))
    return values if cols == 1 else values.reshape(rows, cols)


def write_feature(path: str | os.PathLike, vec: np.ndarray) -> None:
    """Write one feature file (float32, atomically)."""
    try:
        data = encode_feature(vec)
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None
    atomic_write_bytes(path, data)


def read_feature(path: str | os.PathLike) -> np.ndarray:
    """Read one feature file; see :func:`decode_feature`."""
    with open(path, "rb") as fh:
        return decode_feature(fh.read(), path)


def feature_file_name(image_name: str, algo: str, size: tuple[int, int] | None = None) -> str:
    """``"4174611825_0.jpg", "r100"`` -> ``"4174611825_0.jpg_r100.bin"``; with ``size=(112, 112)``
    the 2018 form ``"4174611825_0.jpg_r100_112x112.bin"``. ``image_name`` may be a relative path."""
    if not algo or "/" in algo or os.sep in algo:
        raise ValueError(f"algorithm name {algo!r} must be non-empty and contain no path separator")
    suffix = f"_{algo}" if size is None else f"_{algo}_{int(size[0])}x{int(size[1])}"
    return f"{image_name}{suffix}.bin"


def feature_path(root: str | os.PathLike, image_rel_path: str, algo: str, size: tuple[int, int] | None = None) -> Path:
    """Where the devkit looks for the feature of ``image_rel_path``: ``<root>/<rel path>_<algo>[...].bin``."""
    return Path(root) / feature_file_name(image_rel_path, algo, size)


def save_features(
    root: str | os.PathLike, image_rel_paths: Sequence[str], feats: np.ndarray, algo: str,
    size: tuple[int, int] | None = None,
) -> list[Path]:
    """Write one feature file per row of ``feats`` ``(N, D)`` under ``root``; returns the paths."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] != len(image_rel_paths):
        raise ValueError(f"features of shape {feats.shape} for {len(image_rel_paths)} image paths")
    paths = []
    for rel, vec in zip(image_rel_paths, feats):
        path = feature_path(root, rel, algo, size)
        write_feature(path, vec)
        paths.append(path)
    return paths


def load_features(
    root: str | os.PathLike, image_rel_paths: Sequence[str], algo: str, size: tuple[int, int] | None = None,
) -> np.ndarray:
    """``(N, D)`` float32 features of the listed images; every file must exist and have the same D."""
    rows: list[np.ndarray] = []
    for rel in image_rel_paths:
        path = feature_path(root, rel, algo, size)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: feature file of {rel!r} not found")
        vec = read_feature(path)
        if vec.ndim != 1 or (rows and vec.size != rows[0].size):
            raise FormatError(path, f"feature of shape {vec.shape}", f"({rows[0].size},) like {image_rel_paths[0]!r}" if rows else "a (D, 1) matrix")
        rows.append(vec.astype(np.float32, copy=False))
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def _text_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``(line number, text without line ending)`` of a UTF-8 text file."""
    out = []
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                out.append((number, raw.decode("utf-8").rstrip("\r\n")))
            except UnicodeDecodeError as exc:
                raise FormatError(path, f"line {number} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    return out


def read_noise_list(path: str | os.PathLike) -> set[str]:
    """InsightFace noise list (``facescrub_noises.txt``, ``megaface_noises.txt``): one image per line,
    ``#`` lines are comments, blank lines are skipped, a TAB-separated line names its second field."""
    names: set[str] = set()
    for number, line in _text_lines(path):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if "\t" in line:
            fields = line.split("\t")
            text = fields[1].strip()
            if not text:
                raise FormatError(path, f"line {number}: empty second field in {line!r}", "<anything>\\t<image path>")
        names.add(text)
    return names


def read_image_list(path: str | os.PathLike) -> list[str]:
    """FaceScrub / MegaFace image list (``facescrub_lst``, ``megaface_lst``): one relative path per line
    (``<name>/<file>`` or ``<a>/<b>/<file>``); blank lines are skipped, absolute paths rejected."""
    paths: list[str] = []
    for number, line in _text_lines(path):
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") or PurePosixPath(text).is_absolute() or ".." in PurePosixPath(text).parts:
            raise FormatError(path, f"line {number}: {text!r} is not a relative path inside the image root")
        paths.append(text)
    return paths


def read_features_list_json(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Devkit template list (``facescrub_features_list.json``, ``megaface_features_list.json_<N>_1``):
    a JSON object whose ``"path"`` key lists relative image paths and, for FaceScrub, ``"id"`` the
    identity of each. Returns ``(paths, ids or None)``."""
    try:
        with open(path, "rb") as fh:
            doc = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(path, f"not JSON ({exc})") from None
    paths = doc.get("path") if isinstance(doc, dict) else None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise FormatError(path, "no list of strings under key 'path'", '{"path": ["<relative image path>", ...]}')
    ids = doc.get("id")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(paths)):
        raise FormatError(path, f"key 'id' is not a list of {len(paths)} identities", "one id per path")
    return paths, None if ids is None else [str(i) for i in ids]

"""``.lst`` image lists in their two forms (spec s2.4). UTF-8 text, one TAB-separated line per image.

* MXNet im2rec: ``index \\t label_1 [\\t label_2 ...] \\t path`` -- index ``%d``, labels ``%f``, the
  path is the last column (relative to the image root). :class:`Im2recLine`.
* InsightFace: ``aligned \\t path \\t label [\\t x1 \\t y1 \\t x2 \\t y2 [\\t 5 landmark x \\t 5 landmark y]]``
  -- ``aligned`` 0/1, label int, bbox four ints, landmarks ten floats (five x values, then five y
  values). 3, 7 or 17 columns. The "1 PATH LABEL" lists of dir2lst/align_* are this form with
  ``aligned=1`` and no box. :class:`InsightFaceLine`.

:func:`detect_lst_form` tells the two forms apart from the first lines and :func:`read_lst_columns`
reads either into :class:`InsightFaceColumns` (an im2rec line becomes an ``aligned=1`` line with its
first label as the class).

Paths may hold spaces and any Unicode character (they are never split); only the line ending is
stripped. Blank lines are skipped; any other malformed line raises
:class:`~datasets.errors.FormatError` naming the file and the line number. Writes are atomic.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from .atomic import atomic_write_text
from .errors import FormatError


@dataclass(frozen=True)
class Im2recLine:
    """One im2rec line: record index, one or more float labels, image path."""

    index: int
    labels: tuple[float, ...]
    path: str

    def format(self) -> str:
        labels = "\t".join("%f" % v for v in self.labels)
        return f"{self.index:d}\t{labels}\t{self.path}"


@dataclass(frozen=True)
class InsightFaceLine:
    """One InsightFace line: aligned flag, path, class label, optional box and 5 landmarks.

    ``bbox`` is ``(x1, y1, x2, y2)`` in pixels (ints); ``landmarks`` is ``((x, y),) * 5`` in pixels
    (left eye, right eye, nose, left and right mouth corner), stored on disk as 5 x then 5 y.
    """

    aligned: bool
    path: str
    label: int
    bbox: tuple[int, int, int, int] | None = None
    landmarks: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.landmarks is not None and self.bbox is None:
            raise ValueError(f"{self.path}: landmarks need a bbox column group in the InsightFace .lst form")
        if self.landmarks is not None and np.shape(self.landmarks) != (5, 2):
            raise ValueError(f"{self.path}: landmarks must be 5 (x, y) points, got shape {np.shape(self.landmarks)}")

    def format(self) -> str:
        cols = [str(int(bool(self.aligned))), self.path, str(int(self.label))]
        if self.bbox is not None:
            cols += [str(int(v)) for v in self.bbox]
        if self.landmarks is not None:
            pts = np.asarray(self.landmarks)
            cols += [_float_text(v) for v in pts[:, 0]] + [_float_text(v) for v in pts[:, 1]]
        return "\t".join(cols)


def _float_text(v) -> str:
    """Shortest text that reads back to the same value (float32 values stay short)."""
    return np.format_float_positional(v, trim="-") if isinstance(v, np.floating) else repr(float(v))


def _check_path(path: str, where: str) -> None:
    if not path or any(c in path for c in "\t\n\r"):
        raise ValueError(f"{where}: image path {path!r} is empty or holds a TAB or newline, which .lst cannot store")


def _read_text(path: str | os.PathLike) -> str:
    """The list's text (UTF-8, universal newlines); FormatError names the file and the bad line."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(p, "list file does not exist", "a .lst file") from None
    except UnicodeDecodeError as exc:
        line = p.read_bytes()[: exc.start].count(b"\n") + 1
        raise FormatError(p, f"line {line}: bytes are not UTF-8 ({exc.reason})", "UTF-8 text") from None


def _lines(path: str | os.PathLike, text: str | None = None) -> Iterable[tuple[int, list[str]]]:
    if text is None:
        text = _read_text(path)
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield lineno, line.split("\t")


def read_im2rec_lst(path: str | os.PathLike) -> list[Im2recLine]:
    """Parse an im2rec ``.lst``: ``index\\tlabel...\\tpath`` per line."""
    out = []
    for lineno, cols in _lines(path):
        if len(cols) < 3:
            raise FormatError(path, f"line {lineno}: {len(cols)} tab-separated columns", "'index\\tlabel[\\tlabel...]\\tpath' (at least 3 columns)")
        try:
            index = int(cols[0])
        except ValueError:
            raise FormatError(path, f"line {lineno}: index {cols[0]!r} is not an integer", "an integer record index") from None
        try:
            labels = tuple(float(c) for c in cols[1:-1])
        except ValueError:
            raise FormatError(path, f"line {lineno}: labels {cols[1:-1]!r} are not numbers", "float labels") from None
        if not cols[-1]:
            raise FormatError(path, f"line {lineno}: empty image path", "a path in the last column")
        out.append(Im2recLine(index, labels, cols[-1]))
    return out


def write_im2rec_lst(path: str | os.PathLike, lines: Sequence[Im2recLine]) -> Path:
    """Write an im2rec ``.lst`` (``%d`` index, ``%f`` labels, as MXNet's im2rec.py)."""
    for line in lines:
        _check_path(line.path, f"{path}: index {line.index}")
        if not line.labels:
            raise ValueError(f"{path}: index {line.index} has no label")
    atomic_write_text(path, "".join(line.format() + "\n" for line in lines))
    return Path(path)


def read_insightface_lst(path: str | os.PathLike, *, text: str | None = None) -> list[InsightFaceLine]:
    """Parse an InsightFace ``.lst``: 3, 7 or 17 TAB-separated columns per line (``text``: the
    file's contents, when already read)."""
    out = []
    for lineno, cols in _lines(path, text):
        n = len(cols)
        if n not in (3, 7, 17):
            raise FormatError(path, f"line {lineno}: {n} tab-separated columns", "3 (aligned, path, label), 7 (+ bbox x1 y1 x2 y2) or 17 (+ 5 landmark x, 5 landmark y)")
        if cols[0] not in ("0", "1"):
            raise FormatError(path, f"line {lineno}: aligned flag {cols[0]!r}", "0 or 1 in the first column")
        if not cols[1]:
            raise FormatError(path, f"line {lineno}: empty image path", "a path in the second column")
        try:
            label = int(cols[2])
        except ValueError:
            raise FormatError(path, f"line {lineno}: label {cols[2]!r} is not an integer", "an integer class label") from None
        bbox = landmarks = None
        if n >= 7:
            try:
                bbox = tuple(int(c) for c in cols[3:7])
            except ValueError:
                raise FormatError(path, f"line {lineno}: bbox {cols[3:7]!r}", "four integers x1 y1 x2 y2") from None
        if n == 17:
            try:
                vals = [float(c) for c in cols[7:17]]
            except ValueError:
                raise FormatError(path, f"line {lineno}: landmarks {cols[7:17]!r}", "ten numbers: 5 x then 5 y") from None
            landmarks = tuple(zip(vals[:5], vals[5:]))
        out.append(InsightFaceLine(cols[0] == "1", cols[1], label, bbox, landmarks))  # type: ignore[arg-type]
    return out


@dataclass(frozen=True, eq=False)
class InsightFaceColumns:
    """An InsightFace ``.lst`` as columns, one row per non-blank line, in file order.

    ``aligned`` bool ``(N,)``; ``paths`` N strings as written (relative ones not resolved);
    ``labels`` int64 ``(N,)``. ``lines``: the rows as :class:`InsightFaceLine` (with their boxes
    and landmarks) when the list was parsed line by line, else None; :meth:`line` gives one row
    either way.
    """

    aligned: np.ndarray
    paths: list[str]
    labels: np.ndarray
    lines: list[InsightFaceLine] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def line(self, i: int) -> InsightFaceLine:
        """Row ``i`` as an :class:`InsightFaceLine` (what :func:`read_insightface_lst` gives)."""
        if self.lines is not None:
            return self.lines[i]
        return InsightFaceLine(bool(self.aligned[i]), self.paths[i], int(self.labels[i]))


#: A whole list of "aligned \t path \t label" lines (label in ASCII digits, no blank line): the
#: common case, parsed with one split instead of line by line.
_PLAIN_LIST = re.compile(r"(?:[01]\t[^\t\n]+\t[0-9]{1,18}\n)*(?:[01]\t[^\t\n]+\t[0-9]{1,18})?")


def read_insightface_columns(path: str | os.PathLike) -> InsightFaceColumns:
    """Parse an InsightFace ``.lst`` into :class:`InsightFaceColumns`.

    Accepts and refuses what :func:`read_insightface_lst` does, with the same errors, and a label
    outside int64 with a FormatError. A list of plain 3-column lines (the form the lst stage
    writes) is parsed with one split of the whole text (about 0.5 us a line instead of 10); any
    other list line by line.
    """
    text = _read_text(path)
    if _PLAIN_LIST.fullmatch(text):
        fields = (text[:-1] if text.endswith("\n") else text).replace("\n", "\t").split("\t") if text else []
        flags = "".join(fields[0::3]).encode("ascii")  # one "0"/"1" character a line
        return InsightFaceColumns(np.frombuffer(flags, np.uint8) == ord("1"), fields[1::3],
                                  np.array(fields[2::3], dtype=np.int64).reshape(-1))
    lines = read_insightface_lst(path, text=text)
    for i, line in enumerate(lines):
        if not -2**63 <= line.label < 2**63:
            raise FormatError(path, f"entry {i + 1} ({line.path}): label {line.label}", "a class label that fits in int64")
    return InsightFaceColumns(np.array([line.aligned for line in lines], dtype=bool), [line.path for line in lines],
                              np.array([line.label for line in lines], dtype=np.int64), lines)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


LstForm = Literal["insightface", "im2rec"]


def detect_lst_form(path: str | os.PathLike, *, text: str | None = None, lines: int = 20) -> LstForm:
    """Which form a ``.lst`` is in, from its first ``lines`` non-blank lines.

    InsightFace: 3, 7 or 17 columns, ``0``/``1`` first and an integer label third (``aligned \\t path \\t
    label``). im2rec: an integer index first, numbers up to the last column and a path last that is
    not a number (``index \\t 3.000000 \\t path``). A first line that fits neither raises
    :class:`FormatError` naming it and both forms; any other list is taken as InsightFace form, whose
    reader names a later line that does not fit.
    """
    rows = []
    for lineno, cols in _lines(path, text):
        rows.append((lineno, cols))
        if len(rows) >= lines:
            break
    if not rows:
        raise FormatError(path, "the list has no entries", "one line per image")

    def insightface(cols: list[str]) -> bool:
        return len(cols) in (3, 7, 17) and cols[0] in ("0", "1") and _is_int(cols[2]) and bool(cols[1])

    def im2rec(cols: list[str]) -> bool:
        return (len(cols) >= 3 and _is_int(cols[0]) and all(_is_float(c) for c in cols[1:-1])
                and bool(cols[-1]) and not _is_float(cols[-1]))

    if all(im2rec(cols) for _, cols in rows) and not all(insightface(cols) for _, cols in rows):
        return "im2rec"
    lineno, cols = rows[0]
    if not insightface(cols) and not im2rec(cols):
        raise FormatError(path, f"line {lineno}: {len(cols)} tab-separated columns {cols[:4]!r}",
                          r"InsightFace 'aligned\tpath\tlabel[\tbbox[\tlandmarks]]' or im2rec 'index\tlabel\tpath'")
    return "insightface"  # its reader names any later line that does not fit


def read_lst_columns(path: str | os.PathLike) -> tuple[LstForm, InsightFaceColumns]:
    """Read a ``.lst`` in either form: ``(form, columns)``.

    An im2rec line becomes an ``aligned=1`` row (the image is a face crop, packed as it is) whose
    class is its first label, which must be a whole number (FormatError naming the line otherwise);
    further labels and the record index are not kept (records are renumbered ``1..N`` as InsightFace's
    layout needs).
    """
    text = _read_text(path)
    form = detect_lst_form(path, text=text)
    if form == "insightface":
        return form, read_insightface_columns(path)
    rows = read_im2rec_lst(path)
    labels = []
    for i, row in enumerate(rows):
        value = row.labels[0]
        if not (math.isfinite(value) and value == int(value) and -2**63 <= value < 2**63):
            raise FormatError(path, f"entry {i + 1} ({row.path}): label {value!r}", "a whole-number class label first")
        labels.append(int(value))
    lines = [InsightFaceLine(True, row.path, label) for row, label in zip(rows, labels)]
    return form, InsightFaceColumns(np.ones(len(rows), dtype=bool), [row.path for row in rows],
                                    np.array(labels, dtype=np.int64).reshape(-1), lines)


def write_insightface_lst(path: str | os.PathLike, lines: Sequence[InsightFaceLine]) -> Path:
    """Write an InsightFace ``.lst`` (TAB-separated, bbox as ints, landmarks 5 x then 5 y)."""
    for i, line in enumerate(lines, 1):
        _check_path(line.path, f"{path}: line {i}")
    atomic_write_text(path, "".join(line.format() + "\n" for line in lines))
    return Path(path)


__all__ = [
    "Im2recLine", "InsightFaceLine", "read_im2rec_lst", "write_im2rec_lst",
    "read_insightface_lst", "write_insightface_lst", "InsightFaceColumns", "read_insightface_columns",
    "LstForm", "detect_lst_form", "read_lst_columns",
]

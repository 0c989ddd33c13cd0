"""The InsightFace dataset layout: ``train.rec`` / ``train.idx`` / ``property`` (spec s2.1-2.3).

Records (keys are ``.idx`` keys and header ids; N images, K identity runs):

* keys ``1..N``: one face image each. Label either scalar (``flag 0``, dir2rec/dataset_merge
  style) or ``[class, aligned]`` (``flag 2``, face2rec2 style); payload = encoded image bytes.
* key ``0``: meta record, ``flag 2``, label ``[N+1, N+1+K]``, empty payload.
* keys ``N+1..N+K``: identity records, ``flag 2``, label ``[start, end)`` = the image keys of one
  run of consecutive images with the same class, empty payload.
* ``property``: text ``K,H,W`` (classes, image height, width), no trailing newline; readers take
  the last line.
* ``labels.csv`` (facepipe's, beside them): ``label,identity`` header, then one row per class label
  with the identity's name (folder name of the photos), sorted by label; UTF-8, ``\n`` line ends.

All indices live in float32 labels, exact only up to 2**24 = 16,777,216; the writer refuses to go
beyond instead of writing a corrupt file (the Glint360K trap, spec s2.1).

Plain im2rec files (record 0 is an ordinary image with ``flag 0``, no identity records) are read
too: every ``.idx`` key is an image, its label is the header's (first) label.
"""
from __future__ import annotations

import contextlib
import csv
import io
import mmap
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Mapping

import numpy as np

from .atomic import atomic_paths, atomic_write_text
from .errors import FormatError
from .recordio import MAGIC, IRHeader, MXIndexedRecordIO, MXRecordIO, pack, read_idx_arrays, unpack

#: float32 represents every integer up to and including this value exactly.
FLOAT32_EXACT_LIMIT = 2**24
REC_FILE, IDX_FILE, PROPERTY_FILE, LABELS_FILE = "train.rec", "train.idx", "property", "labels.csv"
#: The files of a packed training set, as :class:`InsightFaceRecWriter` writes them.
REC_FILES = (REC_FILE, IDX_FILE, PROPERTY_FILE)
LabelFormat = Literal["scalar", "array"]


# --- labels.csv ---------------------------------------------------------------------------------

def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """``{identity: label}`` from a ``label,identity`` CSV; empty when the file does not exist.
    Raises :class:`FormatError` naming the line for a malformed row, a repeated label or name."""
    path = Path(path)
    if not path.exists():
        return {}
    table: dict[str, int] = {}
    seen: dict[int, int] = {}
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"byte {exc.start} is not UTF-8 ({exc.reason})", "a UTF-8 'label,identity' CSV") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header != ["label", "identity"]:
        raise FormatError(path, f"line 1: header {header!r}", "'label,identity'")
    for row in reader:
        line = reader.line_num
        if not row:
            continue
        if len(row) != 2:
            raise FormatError(path, f"line {line}: {len(row)} fields {row!r}", "two fields 'label,identity'")
        try:
            label = int(row[0])
        except ValueError:
            raise FormatError(path, f"line {line}: label {row[0]!r}", "a non-negative integer") from None
        if label < 0:
            raise FormatError(path, f"line {line}: label {label}", "a non-negative integer")
        if row[1] in table or label in seen:
            raise FormatError(path, f"line {line}: {row!r} repeats a label or identity", "each label and identity once")
        table[row[1]] = label
        seen[label] = line
    return table


def write_labels(path: str | os.PathLike, table: Mapping[str, int]) -> Path:
    """Write ``{identity: label}`` as a ``label,identity`` CSV sorted by label, atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "identity"])
    for name, label in sorted(table.items(), key=lambda kv: kv[1]):
        writer.writerow([int(label), name])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


# --- property -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Property:
    """Contents of a ``property`` file: number of classes and image size in pixels."""

    num_classes: int
    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.num_classes},{self.height},{self.width}"


def read_property(path: str | os.PathLike) -> Property:
    """Parse ``property`` (``K,H,W``); every line is parsed and the last one wins, as in InsightFace."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(path, "property file does not exist", "a text file 'num_classes,height,width'") from None
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"byte {exc.start} is not UTF-8 ({exc.reason})",
                          "a text file 'num_classes,height,width'") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise FormatError(path, "property file is empty", "'num_classes,height,width', e.g. '85742,112,112'")
    prop = None
    for lineno, line in lines:
        parts = [p.strip() for p in line.split(",")]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3 or min(values) < 0:
            raise FormatError(path, f"line {lineno}: {line!r}", "three non-negative integers 'num_classes,height,width'")
        prop = Property(*values)
    return prop  # type: ignore[return-value]


def write_property(path: str | os.PathLike, prop: Property) -> Path:
    """Write ``K,H,W`` without a trailing newline (as dir2rec/dataset_merge do), atomically."""
    atomic_write_text(path, str(prop))
    return Path(path)


# --- writer -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordLocation:
    """Where one image went: its ``.idx`` key and the byte offset of its record in the ``.rec``."""

    key: int
    offset: int


@dataclass
class PackSummary:
    """What an :class:`InsightFaceRecWriter` wrote."""

    rec_path: Path
    idx_path: Path
    property_path: Path
    property: Property
    num_images: int
    identities: list[tuple[int, int]] = field(default_factory=list)  # [start, end) image keys


def _check_exact(value: int, what: str) -> None:
    if value > FLOAT32_EXACT_LIMIT:
        raise ValueError(
            f"{what} {value} exceeds 2**24 = {FLOAT32_EXACT_LIMIT}: InsightFace stores record indices and "
            "labels as float32, which cannot hold it exactly (the file would have corrupt identity ranges); "
            "split the dataset into several .rec sets"
        )


class InsightFaceRecWriter:
    """Write ``train.rec``, ``train.idx`` and ``property`` in the InsightFace layout, atomically.

    Use as a context manager; :meth:`add` one image at a time in ``.lst`` order (a new identity
    run starts whenever the label changes). On a clean exit the identity records, the meta record
    and ``property`` are written and the three files replace their targets; on an exception the
    targets are left untouched. ``label_format="scalar"`` writes ``flag 0`` image headers,
    ``"array"`` writes ``[label, aligned]`` (``flag 2``, face2rec2). ``meta_last=True`` puts
    record 0 after the identity records (dataset_merge's order) instead of right after the images
    (face2rec2's). ``num_classes`` defaults to max label + 1. :meth:`add_many` appends a batch in
    one go; ``background_writes=True`` writes the ``.rec`` from a background thread (see
    :class:`~datasets.recordio.MXRecordIO`).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        image_size: tuple[int, int] = (112, 112),
        label_format: LabelFormat = "scalar",
        num_classes: int | None = None,
        meta_last: bool = False,
        name: str = "train",
        background_writes: bool = False,
    ):
        if label_format not in ("scalar", "array"):
            raise ValueError(f"label_format must be 'scalar' or 'array', got {label_format!r}")
        self.out_dir = Path(out_dir)
        self.rec_path = self.out_dir / f"{name}.rec"
        self.idx_path = self.out_dir / f"{name}.idx"
        self.property_path = self.out_dir / PROPERTY_FILE
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.label_format = label_format
        self.num_classes = num_classes
        self.meta_last = meta_last
        self.background_writes = background_writes
        self._stack: contextlib.ExitStack | None = None
        self._rec: MXIndexedRecordIO | None = None
        self._tmp_property: Path | None = None
        self._runs: list[tuple[int, int]] = []
        self._run_label: int | None = None
        self._run_start = 1
        self._next_key = 1
        self._max_label = -1
        self.summary: PackSummary | None = None

    def __enter__(self) -> "InsightFaceRecWriter":
        stack = contextlib.ExitStack()
        tmp_rec, tmp_idx, self._tmp_property = stack.enter_context(
            atomic_paths(self.rec_path, self.idx_path, self.property_path)
        )
        self._rec = stack.enter_context(MXIndexedRecordIO(tmp_idx, tmp_rec, "w", background_writes=self.background_writes))
        self._stack = stack
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        stack = self._stack
        try:
            if exc_type is None:
                self._finish()
        except BaseException:
            stack.__exit__(*sys.exc_info())
            raise
        finally:
            self._stack = self._rec = None
        stack.__exit__(exc_type, exc, tb)

    @property
    def num_images(self) -> int:
        return self._next_key - 1

    def _writer(self) -> MXIndexedRecordIO:
        if self._rec is None or self._stack is None:
            raise RuntimeError("InsightFaceRecWriter is used outside its 'with' block")
        return self._rec

    def add(self, label: int, payload: bytes, *, aligned: bool = True) -> RecordLocation:
        """Append one image record (``payload`` = encoded image bytes, written verbatim)."""
        rec = self._writer()
        label = int(label)
        if label < 0:
            raise ValueError(f"image {self._next_key}: label {label} is negative (expected a class id >= 0)")
        key = self._next_key
        _check_exact(key + 1, "image record key")  # the meta record stores N+1 >= key+1
        _check_exact(label, "class label")
        if label != self._run_label:
            if self._run_label is not None:
                self._runs.append((self._run_start, key))
            self._run_label, self._run_start = label, key
        if self.label_format == "scalar":
            header = IRHeader(0, float(label), key, 0)
        else:
            header = IRHeader(0, [float(label), 1.0 if aligned else 0.0], key, 0)
        offset = rec.tell()
        rec.write_idx(key, pack(header, payload))
        self._next_key += 1
        self._max_label = max(self._max_label, label)
        return RecordLocation(key, offset)

    def add_many(self, labels: np.ndarray | list[int], payloads: list[bytes],
                 aligned: np.ndarray | list[bool] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Append one image record per payload, byte for byte as that many :meth:`add` calls.

        ``labels`` int ``(N,)``, ``payloads`` N encoded images (verbatim), ``aligned`` bool
        ``(N,)`` (default all True). Returns ``(keys, offsets)``, int64 ``(N,)`` each. Checks the
        whole batch before writing any of it.
        """
        rec = self._writer()
        labels = np.asarray(labels).reshape(-1)
        if labels.size and labels.dtype.kind not in "iub":
            raise ValueError(f"image labels must be integers, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
        n = len(labels)
        aligned = np.ones(n, bool) if aligned is None else np.asarray(aligned, dtype=bool).reshape(-1)
        if len(payloads) != n or len(aligned) != n:
            raise ValueError(f"add_many: {n} labels, {len(payloads)} payloads and {len(aligned)} aligned flags")
        first = self._next_key
        keys = np.arange(first, first + n, dtype=np.int64)
        if n == 0:
            return keys, np.zeros(0, np.int64)
        if labels.min() < 0:
            i = int(np.argmax(labels < 0))
            raise ValueError(f"image {first + i}: label {int(labels[i])} is negative (expected a class id >= 0)")
        _check_exact(first + n, "image record key")  # the meta record stores N+1 >= last key + 1
        _check_exact(int(labels.max()), "class label")
        starts = (np.flatnonzero(labels[1:] != labels[:-1]) + 1 + first).tolist()
        if int(labels[0]) != self._run_label:
            starts.insert(0, first)
        for start in starts:
            if self._run_label is not None:
                self._runs.append((self._run_start, start))
            self._run_label, self._run_start = -1, start  # any label: the next start closes this run
        self._run_label = int(labels[-1])
        if self.label_format == "scalar":
            header_labels = labels.astype(np.float32)
        else:
            header_labels = np.stack([labels.astype(np.float32), aligned.astype(np.float32)], axis=1)
        offsets = rec.write_idx_batch(keys, header_labels, payloads)
        self._next_key += n
        self._max_label = max(self._max_label, int(labels.max()))
        return keys, offsets

    def add_record(self, record: bytes, label: int | None = None) -> RecordLocation:
        """Copy a packed image record from another ``.rec`` without re-encoding its image.

        The payload bytes are kept; the header is rewritten with the new key and ``label`` (default:
        the record's own class, i.e. its scalar label or ``label[0]``). For merging datasets.
        """
        header, payload = unpack(record)
        aligned = True
        if label is None:
            label = int(header.label[0]) if header.flag else int(header.label)
        if header.flag >= 2:
            aligned = bool(header.label[1])
        return self.add(label, payload, aligned=aligned)

    def _finish(self) -> None:
        rec = self._writer()
        n = self.num_images
        if n == 0:
            raise ValueError(f"{self.rec_path}: no images were added; refusing to write an empty dataset")
        self._runs.append((self._run_start, self._next_key))
        k = len(self._runs)
        first_identity = n + 1
        _check_exact(first_identity + k, "identity record key")
        meta = pack(IRHeader(0, [float(first_identity), float(first_identity + k)], 0, 0), b"")
        if not self.meta_last:
            rec.write_idx(0, meta)
        for i, (start, end) in enumerate(self._runs):
            key = first_identity + i
            rec.write_idx(key, pack(IRHeader(0, [float(start), float(end)], key, 0), b""))
        if self.meta_last:
            rec.write_idx(0, meta)
        rec.close()
        num_classes = self._max_label + 1 if self.num_classes is None else int(self.num_classes)
        if num_classes <= self._max_label:
            raise ValueError(f"num_classes={num_classes} but labels go up to {self._max_label}")
        prop = Property(num_classes, *self.image_size)
        assert self._tmp_property is not None
        self._tmp_property.write_text(str(prop), encoding="utf-8")
        self.summary = PackSummary(self.rec_path, self.idx_path, self.property_path, prop, n, list(self._runs))


# --- reader -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecIndex:
    """The image records of a ``.rec`` set, as arrays.

    ``keys``, ``offsets``, ``labels``: int64 ``(N,)``, in training order (InsightFace: keys 1..N;
    im2rec: ``.idx`` order). ``identities``: int64 ``(K, 2)`` ``[start, end)`` image-key ranges
    (empty for im2rec). ``property`` is ``None`` when the folder has no ``property`` file.
    """

    rec_path: Path
    idx_path: Path
    layout: Literal["insightface", "im2rec"]
    keys: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    identities: np.ndarray
    property: Property | None

    def __len__(self) -> int:
        return len(self.keys)


def rec_paths(root: str | os.PathLike, name: str = "train") -> tuple[Path, Path, Path]:
    """``(rec, idx, property)`` paths for a dataset folder, or for a ``.rec`` file given directly."""
    root = Path(root)
    if root.suffix == ".rec" and not root.is_dir():
        return root, root.with_suffix(".idx"), root.parent / PROPERTY_FILE
    return root / f"{name}.rec", root / f"{name}.idx", root / PROPERTY_FILE


@contextlib.contextmanager
def _words(path: Path) -> Iterator[np.ndarray]:
    """The ``.rec`` as a read-only uint32 array (whole words only), memory-mapped."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 4:
            yield np.zeros(0, np.uint32)
            return
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        words = np.frombuffer(mm, np.uint32, size // 4)
        yield words
        del words
    finally:
        with contextlib.suppress(BufferError):  # an escaped view keeps the map alive until collected
            mm.close()


def _last_offsets(keys: np.ndarray, offsets: np.ndarray, wanted: np.ndarray, idx_path: Path) -> np.ndarray:
    """Offsets of ``wanted`` keys, taking the last ``.idx`` line of a duplicated key (MXNet's dict)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    pos = np.searchsorted(sorted_keys, wanted, side="right") - 1
    bad = (pos < 0) | (sorted_keys[np.clip(pos, 0, None)] != wanted)
    if bad.any():
        missing = wanted[bad]
        raise FormatError(idx_path, f"{len(missing)} record keys missing, first {missing[:5].tolist()}", "every image key 1..N in the .idx")
    return offsets[order[pos]]


def _id_mismatch(rec_path: Path, key: int, offset: int, found: int) -> FormatError:
    return FormatError(rec_path, f"record key {key} at offset {offset}: the record's header id is {found}",
                       f"header id {key}, the .idx key (a wrong or stale .idx points at another record)")


def _read_labels(rec_path: Path, keys: np.ndarray, offsets: np.ndarray, *, check_ids: bool = False) -> np.ndarray:
    """Class label of each record (scalar label, or the first of a label array), vectorised.

    Reads the segment and IRHeader words straight from the mapped file; records whose first
    segment is too short to hold the label (multi-segment records) go through the full reader.
    ``check_ids``: also require each record's ``IRHeader.id`` to equal its ``.idx`` key (true for
    every InsightFace writer, formats-spec s1.3), so that an ``.idx`` line pointing at another
    valid record is a :class:`FormatError` naming the key and the id found, not a wrong image.
    """
    if (offsets < 0).any():
        i = int(np.flatnonzero(offsets < 0)[0])
        raise FormatError(rec_path, f"record key {keys[i]}: negative offset {offsets[i]}", "a byte offset >= 0")
    if (offsets % 4).any():
        i = int(np.flatnonzero(offsets % 4)[0])
        raise FormatError(rec_path, f"record key {keys[i]}: offset {offsets[i]} is not a multiple of 4", "the offset of a record start")
    labels = np.empty(len(offsets), np.float32)
    slow: list[int] = []
    with _words(rec_path) as words:
        n_words = len(words)
        floats = words.view(np.float32)
        for lo in range(0, len(offsets), 1 << 20):
            w = offsets[lo:lo + (1 << 20)] >> 2
            outside = w + 4 > n_words
            if outside.any():
                i = lo + int(np.flatnonzero(outside)[0])
                raise FormatError(rec_path, f"record key {keys[i]}: offset {offsets[i]} is past the end of the file", "an offset inside the .rec (stale .idx or truncated .rec)")
            magic = words[w]
            if (magic != MAGIC).any():
                i = lo + int(np.flatnonzero(magic != MAGIC)[0])
                raise FormatError(rec_path, f"record key {keys[i]} at offset {offsets[i]}: no RecordIO magic word (found 0x{int(words[offsets[i] >> 2]):08X})", "0xCED7230A at a record start; stale .idx?")
            lrec = words[w + 1]
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            flag = words[w + 2]
            label_word = np.where(flag > 0, w + 8, w + 3)
            needed = np.where(flag > 0, 28, 8)
            simple = (cflag == 0) & (length >= needed) & (label_word < n_words)
            labels[lo:lo + len(w)] = floats[np.where(simple, label_word, 0)]
            if check_ids:  # id: uint64 at header bytes 8..16 = words w+4 (low), w+5 (high)
                has_id = (length >= 16) & (w + 6 <= n_words)
                low = words[np.where(has_id, w + 4, 0)].astype(np.int64)
                high = words[np.where(has_id, w + 5, 0)].astype(np.int64)
                wrong = has_id & ((high != 0) | (low != keys[lo:lo + len(w)]))
                if wrong.any():
                    i = lo + int(np.flatnonzero(wrong)[0])
                    found = (int(high[i - lo]) << 32) | int(low[i - lo])
                    raise _id_mismatch(rec_path, int(keys[i]), int(offsets[i]), found)
                slow.extend((lo + np.flatnonzero(~has_id & simple)).tolist())
            slow.extend((lo + np.flatnonzero(~simple)).tolist())
        del floats
    if slow:
        with MXRecordIO(rec_path, "r") as rec:
            for i in sorted(set(slow)):
                header, _payload = unpack(rec.read_at(int(offsets[i])))
                labels[i] = header.label[0] if header.flag else header.label
                if check_ids and header.id != int(keys[i]):
                    raise _id_mismatch(rec_path, int(keys[i]), int(offsets[i]), int(header.id))
    return labels.astype(np.int64)


def _meta(rec_path: Path, keys: np.ndarray, offsets: np.ndarray, idx_path: Path) -> tuple[int, int] | None:
    """``(first identity key, end)`` if record 0 is an InsightFace meta record, else ``None``."""
    if not (keys == 0).any():
        return None
    offset = int(_last_offsets(keys, offsets, np.array([0]), idx_path)[0])
    with MXRecordIO(rec_path, "r") as rec:
        header, payload = unpack(rec.read_at(offset))
    if header.flag != 2 or len(payload):
        return None  # an im2rec image (flag 0 or --pack-label) under key 0
    start, end = (float(v) for v in header.label)
    if start != int(start) or end != int(end) or start < 1 or end < start:
        raise FormatError(rec_path, f"meta record 0 has label [{start}, {end}]", "[N+1, N+1+K] with integers 1 <= N+1 <= N+1+K")
    return int(start), int(end)


def read_rec_index(root: str | os.PathLike, *, name: str = "train") -> RecIndex:
    """Index an InsightFace (or plain im2rec) ``.rec`` set: image keys, offsets, labels, identities.

    ``root`` is the dataset folder (``<name>.rec``, ``<name>.idx``, optional ``property``) or a
    ``.rec`` path. InsightFace sets are recognised by record 0 having ``flag 2`` and an empty
    payload; their images are keys ``1..label[0]-1``. Otherwise every ``.idx`` key is an image
    (in ``.idx`` order, a duplicated key read at its last offset, as MXNet does).
    """
    rec_path, idx_path, prop_path = rec_paths(root, name)
    if not rec_path.exists():
        raise FormatError(rec_path, "record file does not exist", f"{rec_path.name} in the dataset folder")
    all_keys, all_offsets = read_idx_arrays(idx_path)
    meta = _meta(rec_path, all_keys, all_offsets, idx_path)
    prop = read_property(prop_path) if prop_path.exists() else None
    if meta is None:
        keys = all_keys
        offsets = _last_offsets(all_keys, all_offsets, keys, idx_path) if len(np.unique(keys)) != len(keys) else all_offsets
        return RecIndex(rec_path, idx_path, "im2rec", keys, offsets, _read_labels(rec_path, keys, offsets),
                        np.zeros((0, 2), np.int64), prop)
    first_identity, end = meta
    keys = np.arange(1, first_identity, dtype=np.int64)
    offsets = _last_offsets(all_keys, all_offsets, keys, idx_path)
    id_keys = np.arange(first_identity, end, dtype=np.int64)
    identities = np.zeros((len(id_keys), 2), np.int64)
    if len(id_keys):
        id_offsets = _last_offsets(all_keys, all_offsets, id_keys, idx_path)
        with MXRecordIO(rec_path, "r") as rec:
            for i, (key, off) in enumerate(zip(id_keys.tolist(), id_offsets.tolist())):
                header, _ = unpack(rec.read_at(off))
                if header.id != key:
                    raise _id_mismatch(rec_path, key, off, int(header.id))
                if header.flag != 2:
                    raise FormatError(rec_path, f"identity record key {key}: flag {header.flag}", "flag 2 with label [start, end)")
                start, stop = int(header.label[0]), int(header.label[1])
                if not 1 <= start <= stop <= first_identity:
                    raise FormatError(rec_path, f"identity record key {key}: range [{start}, {stop})", f"a range inside the image keys 1..{first_identity - 1}")
                identities[i] = (start, stop)
    labels = _read_labels(rec_path, keys, offsets, check_ids=True)
    return RecIndex(rec_path, idx_path, "insightface", keys, offsets, labels, identities, prop)


def identity_of_images(index: RecIndex) -> np.ndarray:
    """For an InsightFace index: the identity-run number of every image, int64 ``(N,)`` (-1 if none)."""
    run = np.full(len(index.keys), -1, np.int64)
    for i, (start, stop) in enumerate(index.identities.tolist()):
        run[start - 1:stop - 1] = i
    return run


__all__ = [
    "FLOAT32_EXACT_LIMIT", "Property", "read_property", "write_property", "RecordLocation", "PackSummary",
    "InsightFaceRecWriter", "RecIndex", "rec_paths", "read_rec_index", "identity_of_images",
]


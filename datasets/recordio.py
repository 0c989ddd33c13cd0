"""MXNet RecordIO without MXNet: a drop-in for ``mxnet.recordio`` (spec: formats-spec.md section 1).

Same names and semantics as MXNet 1.9.1: :class:`IRHeader`, :func:`pack`, :func:`unpack`,
:func:`pack_img`, :func:`unpack_img`, :class:`MXRecordIO`, :class:`MXIndexedRecordIO`; files written
here are byte-identical to MXNet's (checked against real MXNet in ``tests/test_recordio_mxnet.py``).

Byte layout (all integers little-endian):

* ``.rec``: a sequence of segments ``magic u32 = 0xCED7230A | lrec u32 | data | zero pad to 4``
  where ``lrec = cflag << 29 | length``. A record is one segment with ``cflag 0``, or, when its
  payload holds the magic word at a 4-byte-aligned offset, segments ``cflag 1, 2, ..., 3`` cut at
  those offsets with the magic bytes dropped (the reader puts them back). Unaligned occurrences
  stay in the data. Every record starts at a multiple of 4. Records must be < 2**29 bytes (s1.1-1.2).
* ``.idx``: text, one ``<key>\\t<offset>\\n`` line per record in write order, offset = byte offset of
  the record's first magic word. A duplicated key stays twice in ``keys``; ``idx`` keeps the last
  offset (s1.3).
* Record payload as packed by :func:`pack`: ``IRHeader`` = struct ``<IfQQ`` (24 bytes: flag u32,
  label f32, id u64, id2 u64); when ``flag > 0`` the header label is 0 and ``flag`` float32 labels
  follow the header; then the image bytes (s1.5).

Reading maps the file (``mmap``) and parses headers with ``struct.unpack_from``: no per-record
file calls, and a reader is safe to use in forked DataLoader workers (the mapping is re-made in a
new process; positions are plain integers, never a shared file offset). Pickling a reader stores
only its paths and flag. Writers buffer in their own memory, so a forked copy never writes the
parent's pending bytes; writing from another process raises, as in MXNet.

Differences from MXNet: corrupt files raise :class:`~datasets.errors.FormatError` naming the file,
key and offset instead of aborting the process; :func:`unpack_img` raises instead of returning
``None`` for an undecodable payload; ``read()`` in a forked child works (MXNet raises); pickling
an open writer raises (MXNet's copy would truncate the file); blank ``.idx`` lines are skipped.
Extras: :meth:`MXRecordIO.read_at`, :meth:`MXRecordIO.iter_with_offsets`, :func:`rebuild_index`,
:func:`read_idx_arrays`; for bulk writers :func:`pack_framed`, :meth:`MXIndexedRecordIO.write_idx_batch`
and ``background_writes``.
"""
from __future__ import annotations

import io
import mmap
import numbers
import os
import re
import struct
from collections import deque, namedtuple
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .atomic import atomic_open
from .errors import FormatError

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
#: Largest record payload the format can hold (29-bit length field).
MAX_RECORD_BYTES = (1 << 29) - 1
_LENGTH_MASK = (1 << 29) - 1
_SEGMENT_HEADER = struct.Struct("<II")  # magic, lrec
_IR_FORMAT = "<IfQQ"
_IR = struct.Struct(_IR_FORMAT)
_IR_SIZE = _IR.size  # 24
_FLOAT32 = np.dtype("<f4")
_tuple_new = tuple.__new__  # builds an IRHeader from a tuple without the namedtuple's Python __new__

IRHeader = namedtuple("HEADER", ["flag", "label", "id", "id2"])
IRHeader.__doc__ = """Record header ``(flag, label, id, id2)``: struct ``<IfQQ``, 24 bytes.

``flag`` u32 (number of float32 labels after the header, 0 for a scalar label), ``label`` f32 (or a
float32 array when ``flag > 0``), ``id`` u64 (record id, the ``.idx`` key in every known writer),
``id2`` u64 (reserved, 0)."""


# --- pack / unpack ------------------------------------------------------------------------------

def _as_payload(s: Any) -> bytes | bytearray:
    if isinstance(s, (bytes, bytearray)):
        return s
    if isinstance(s, memoryview):
        return s.tobytes()
    if isinstance(s, np.ndarray) and s.dtype == np.uint8:
        return s.tobytes()
    if isinstance(s, str):
        raise TypeError(
            "RecordIO payload must be bytes, got str (Python 2 InsightFace scripts pass '' for meta "
            "records; use b'')"
        )
    raise TypeError(f"RecordIO payload must be bytes, got {type(s).__name__}")


def pack(header: IRHeader | tuple, s: bytes) -> bytes:
    """Pack ``header`` and payload ``s`` into one record, exactly like ``mxnet.recordio.pack``.

    A numeric ``header.label`` is stored in the header and the stored flag is forced to 0; any
    other label is converted to a float32 array whose size becomes the flag and whose bytes go
    between the 24-byte header and the payload (header label field 0.0).
    """
    flag, label, id_, id2 = header
    s = _as_payload(s)
    if isinstance(label, numbers.Number):
        return _IR.pack(0, label, id_, id2) + s
    labels = np.asarray(label, dtype=np.float32)
    return _IR.pack(labels.size, 0.0, id_, id2) + labels.tobytes() + s


def unpack(s: bytes) -> tuple[IRHeader, bytes]:
    """Split a record into ``(IRHeader, payload)`` like ``mxnet.recordio.unpack``.

    When ``flag > 0`` the header's label is a read-only float32 array of ``flag`` elements and the
    payload starts after it; otherwise the label is the header's float.
    """
    try:
        fields = _IR.unpack_from(s)
    except struct.error:
        raise FormatError(None, f"record of {len(s)} bytes is shorter than an IRHeader", "at least 24 bytes") from None
    flag = fields[0]
    if not flag:
        return _tuple_new(IRHeader, fields), s[_IR_SIZE:]
    end = _IR_SIZE + 4 * flag
    if len(s) < end:
        raise FormatError(None, f"record of {len(s)} bytes announces {flag} float32 labels", f"at least {end} bytes")
    labels = np.frombuffer(s, _FLOAT32, flag, _IR_SIZE)
    return _tuple_new(IRHeader, (flag, labels, fields[2], fields[3])), s[end:]


def pack_img(header: IRHeader | tuple, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg") -> bytes:
    """Encode ``img`` (HxWx3 uint8, OpenCV BGR order) with ``cv2.imencode`` and :func:`pack` it.

    ``quality`` is the JPEG quality (1-100) for ``.jpg``/``.jpeg`` or the PNG compression level
    (0-9) for ``.png``, as in MXNet.
    """
    import cv2

    fmt = img_fmt.upper()
    params: list[int] = []
    if fmt in (".JPG", ".JPEG"):
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == ".PNG":
        params = [cv2.IMWRITE_PNG_COMPRESSION, quality]
    ok, buf = cv2.imencode(img_fmt, img, params)
    if not ok:
        raise ValueError(f"cv2.imencode could not encode an image of shape {getattr(img, 'shape', None)} as {img_fmt}")
    return pack(header, buf.tobytes())


def unpack_img(s: bytes, iscolor: int = -1) -> tuple[IRHeader, np.ndarray]:
    """:func:`unpack` then ``cv2.imdecode(payload, iscolor)`` (BGR order, like MXNet).

    Raises :class:`FormatError` if the payload is not a decodable image (MXNet returns ``None``).
    """
    import cv2

    header, payload = unpack(s)
    img = cv2.imdecode(np.frombuffer(payload, np.uint8), iscolor) if len(payload) else None
    if img is None:
        raise FormatError(None, f"record id {header.id}: payload of {len(payload)} bytes is not a decodable image", "JPEG/PNG bytes")
    return header, img


# --- framing ------------------------------------------------------------------------------------

def _segments(buf: bytes | bytearray) -> list[tuple[int, int, int]]:
    """Cut points of one record: ``[(cflag, start, end), ...]`` (see module docstring)."""
    n = len(buf)
    cuts: list[tuple[int, int, int]] = []
    start = 0
    pos = buf.find(MAGIC_BYTES)
    while pos != -1 and pos + 4 <= n:
        if pos % 4 == 0:
            cuts.append((2 if cuts else 1, start, pos))
            start = pos + 4
            pos = buf.find(MAGIC_BYTES, start)
        else:
            pos = buf.find(MAGIC_BYTES, pos + 1)
    cuts.append((3 if cuts else 0, start, n))
    return cuts


_PADDING = (b"", b"\0\0\0", b"\0\0", b"\0")  # indexed by length % 4


def _frame_into(out: bytearray, buf: bytes | bytearray) -> None:
    """Append the on-disk bytes of one logical record to ``out`` (the writers' hot path)."""
    n = len(buf)
    if n > MAX_RECORD_BYTES:
        raise ValueError(f"RecordIO record of {n} bytes is too large (limit {MAX_RECORD_BYTES} bytes)")
    if buf.find(MAGIC_BYTES) == -1:  # the common case: one segment, cflag 0
        out += _SEGMENT_HEADER.pack(MAGIC, n)
        out += buf
        out += _PADDING[n % 4]
        return
    for cflag, start, end in _segments(buf):
        length = end - start
        out += _SEGMENT_HEADER.pack(MAGIC, (cflag << 29) | length)
        out += buf[start:end]
        out += _PADDING[length % 4]


def frame_record(buf: bytes | bytearray) -> bytes:
    """On-disk bytes of one logical record (segments, headers, padding), as MXNet writes them."""
    out = bytearray()
    _frame_into(out, _as_payload(buf))
    return bytes(out)


def _header_dtype(width: int) -> np.dtype:
    """Segment header + IRHeader (+ ``width`` float32 labels), packed: one record's first bytes."""
    fields = [("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"), ("id2", "<u8")]
    return np.dtype(fields + ([("labels", "<f4", (width,))] if width else []))


def pack_framed(ids: Sequence[int] | np.ndarray, labels: Sequence[float] | np.ndarray,
                payloads: Sequence[bytes]) -> tuple[bytes, np.ndarray]:
    """On-disk bytes of the records ``pack(IRHeader(0, labels[i], ids[i], 0), payloads[i])``, framed
    back to back as :meth:`MXRecordIO.write` appends them, and the offset of each record in them.

    ``ids`` int ``(N,)``; ``labels`` float ``(N,)`` (scalar labels, flag 0) or ``(N, L)`` (label
    arrays, flag L); ``payloads`` N byte strings. Returns ``(bytes, offsets int64 (N,))``. The
    headers are built as one array and the records joined in one copy; a batch in which a record
    holds the magic word at a 4-byte-aligned offset is framed record by record instead (MXNet
    splits such records into segments).
    """
    n = len(payloads)
    labels = np.asarray(labels, dtype=np.float32)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if labels.ndim not in (1, 2) or len(labels) != n or len(ids) != n:
        raise ValueError(f"pack_framed: {len(ids)} ids, labels of shape {labels.shape} and {n} payloads do not match")
    if n and ids.min() < 0:
        raise ValueError(f"pack_framed: record id {int(ids.min())} is negative (ids are u64)")
    width = labels.shape[1] if labels.ndim == 2 else 0
    dtype = _header_dtype(width)
    lengths = np.fromiter(map(len, payloads), np.int64, n) + (dtype.itemsize - _SEGMENT_HEADER.size)
    if n and lengths.max() > MAX_RECORD_BYTES:
        i = int(np.argmax(lengths))
        raise ValueError(f"RecordIO record {i} of {int(lengths[i])} bytes is too large (limit {MAX_RECORD_BYTES} bytes)")
    heads = np.zeros(n, dtype)
    heads["magic"] = MAGIC
    heads["lrec"] = lengths
    heads["flag"] = width
    heads["id"] = ids
    heads["labels" if width else "label"] = labels
    size = dtype.itemsize
    head_bytes = heads.tobytes()
    parts: list = [None] * (3 * n)
    parts[0::3] = [head_bytes[o:o + size] for o in range(0, n * size, size)]
    parts[1::3] = payloads
    parts[2::3] = [_PADDING[r] for r in (lengths & 3).tolist()]
    data = b"".join(parts)
    offsets = np.zeros(n, np.int64)
    np.cumsum((lengths[:-1] + _SEGMENT_HEADER.size + 3) & ~3, out=offsets[1:])
    if np.count_nonzero(np.frombuffer(data, "<u4") == MAGIC) == n:
        return data, offsets  # the only aligned magic words are the n segment headers: one segment a record
    out = bytearray()
    for i in range(n):
        offsets[i] = len(out)
        _frame_into(out, head_bytes[i * size + _SEGMENT_HEADER.size:(i + 1) * size] + _as_payload(payloads[i]))
    return bytes(out), offsets


class _RecordBuffer:
    """Read-only view of a ``.rec`` file (memory-mapped) with record parsing.

    ``read_at(offset)`` returns ``(record bytes, next offset)``, or ``(None, offset)`` at the end.
    """

    __slots__ = ("path", "data", "size", "pid")

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self.data: mmap.mmap | bytes = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self.size = size
        self.pid = os.getpid()

    def close(self) -> None:
        if isinstance(self.data, mmap.mmap):
            self.data.close()
        self.data = b""

    def _error(self, offset: int, what: str, expected: str, key: Any = None) -> FormatError:
        where = f"record at offset {offset}" if key is None else f"record key {key!r} at offset {offset}"
        return FormatError(self.path, f"{where}: {what}", expected)

    def read_at(self, offset: int, key: Any = None) -> tuple[bytes | None, int]:
        data = self.data
        if offset >= 0 and not offset & 3:  # fast path: a whole single-segment record
            try:
                magic, lrec = _SEGMENT_HEADER.unpack_from(data, offset)
            except struct.error:
                pass
            else:
                end = offset + 8 + lrec  # lrec == length when cflag == 0
                if magic == MAGIC and lrec <= _LENGTH_MASK and end <= self.size:
                    return data[offset + 8:end], (end + 3) & ~3
        return self._read_checked(offset, key)

    def _read_checked(self, offset: int, key: Any) -> tuple[bytes | None, int]:
        """Every other case: end of file, multi-segment records, and all the errors."""
        data, size = self.data, self.size
        if offset + 8 > size or offset < 0:
            if offset == size:
                return None, offset
            if offset > size or offset < 0:
                raise self._error(offset, f"offset is outside the file of {size} bytes", "an offset from the .idx inside the .rec", key)
            raise self._error(offset, f"file ends after {size - offset} bytes of a segment header (truncated .rec)", "an 8-byte segment header")
        magic, lrec = _SEGMENT_HEADER.unpack_from(data, offset)
        if magic != MAGIC or offset % 4:
            raise self._error(offset, f"no RecordIO magic word here (found 0x{magic:08X})", "0xCED7230A at the start of a record; a wrong or stale .idx, or not a .rec file", key)
        start = offset + 8
        end = start + (lrec & _LENGTH_MASK)
        if end > size:
            raise self._error(offset, f"segment of {end - start} bytes runs past the end of the file ({size} bytes, truncated .rec)", "a complete record", key)
        cflag = lrec >> 29
        if cflag == 0:
            return data[start:end], (end + 3) & ~3
        if cflag != 1:
            raise self._error(offset, f"segment with cflag {cflag} is the middle or end of a record", "a record start (cflag 0 or 1); the offset points inside a record", key)
        parts = [data[start:end]]
        pos = (end + 3) & ~3
        while True:
            if pos + 8 > size:
                raise self._error(pos, "file ends inside a multi-segment record (truncated .rec)", "a continuation segment (cflag 2 or 3)", key)
            magic, lrec = _SEGMENT_HEADER.unpack_from(data, pos)
            cflag = lrec >> 29
            if magic != MAGIC or cflag not in (2, 3):
                raise self._error(pos, f"broken multi-segment record (magic 0x{magic:08X}, cflag {cflag})", "a continuation segment (cflag 2 or 3)", key)
            start = pos + 8
            end = start + (lrec & _LENGTH_MASK)
            if end > size:
                raise self._error(pos, "segment runs past the end of the file (truncated .rec)", "a complete record", key)
            parts.append(MAGIC_BYTES)
            parts.append(data[start:end])
            pos = (end + 3) & ~3
            if cflag == 3:
                return b"".join(parts), pos


class _AppendFile:
    """A truncated-on-open output file with its own write buffer, safe to inherit across ``fork``.

    A forked child that drops its copy only closes the descriptor: it never flushes the parent's
    pending bytes a second time (a ``BufferedWriter`` would). With ``background=True`` full
    buffers (and large writes) go to the file from one background thread, in order, and every
    :attr:`SYNC` bytes the thread syncs the file to disk (``fdatasync``), so that writing and the
    final ``fsync`` of an atomic replace overlap the caller's work; at most :attr:`QUEUE` writes
    wait; :meth:`close` waits for them and raises a failed write's error.
    """

    __slots__ = ("raw", "buffer", "flushed", "pid", "pool", "pending")
    LIMIT = 1 << 20
    QUEUE = 8
    SYNC = 8 << 20

    def __init__(self, path: str, background: bool = False):
        self.raw = open(path, "wb", buffering=0)
        self.buffer = bytearray()
        self.flushed = 0
        self.pid = os.getpid()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="recordio-write") if background else None
        self.pending: deque[Future] = deque()

    def tell(self) -> int:
        return self.flushed + len(self.buffer)

    def write(self, data: bytes | bytearray) -> None:
        if len(data) >= self.LIMIT and (self.pool is None or isinstance(data, bytes)):
            self.flush()  # keep the order, then write it without copying it into the buffer
            if self.pool is not None:
                self._submit(data)  # immutable bytes: safe to hand over
            else:
                self._write_all(data)
                self.flushed += len(data)
            return
        self.buffer += data
        if len(self.buffer) >= self.LIMIT:
            self.flush()

    def write_record(self, payload: bytes | bytearray) -> int:
        """Frame and append one record; returns the offset where it starts."""
        pos = self.flushed + len(self.buffer)
        _frame_into(self.buffer, payload)
        if len(self.buffer) >= self.LIMIT:
            self.flush()
        return pos

    def _write_all(self, data: bytes | bytearray) -> None:
        with memoryview(data) as view:
            done = 0
            while done < len(view):
                done += self.raw.write(view[done:])

    def _write_and_sync(self, data: bytes, synced_to: int) -> None:
        """Background: write, then sync the file's data to disk up to here every :attr:`SYNC` bytes."""
        self._write_all(data)
        if synced_to:
            os.fdatasync(self.raw.fileno())

    def _submit(self, data: bytes | bytearray) -> None:
        while len(self.pending) >= self.QUEUE:
            self.pending.popleft().result()
        sync = (self.flushed + len(data)) // self.SYNC > self.flushed // self.SYNC
        self.pending.append(self.pool.submit(self._write_and_sync, data, sync))  # type: ignore[union-attr]
        self.flushed += len(data)

    def flush(self) -> None:
        if self.pool is not None:
            if self.buffer:
                data, self.buffer = self.buffer, bytearray()
                self._submit(data)
            return
        self._write_all(self.buffer)
        self.flushed += len(self.buffer)
        self.buffer.clear()

    def wait(self) -> None:
        """Block until every background write is on the file; raises the first failed write's error."""
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        if self.raw.closed:
            return
        mine = self.pid == os.getpid()
        try:
            if mine:
                self.flush()
                self.wait()
        finally:
            if self.pool is not None and mine:
                self.pool.shutdown(wait=True)
            self.raw.close()


# --- sequential reader / writer -----------------------------------------------------------------

class MXRecordIO:
    """Read or write a ``.rec`` file sequentially, like ``mxnet.recordio.MXRecordIO``.

    ``MXRecordIO(uri, 'w')`` truncates and appends records with :meth:`write`; ``'r'`` reads them
    back with :meth:`read` (``None`` at the end) or by iterating. Also a context manager.
    ``background_writes=True`` (not in MXNet) writes full 1 MiB buffers from a background thread
    and syncs them to disk every 8 MiB there; :meth:`close` waits for them.
    """

    def __init__(self, uri: str | os.PathLike, flag: str, *, background_writes: bool = False):
        self.uri = os.fspath(uri)
        self.flag = flag
        self.background_writes = background_writes
        self.pid: int | None = None
        self.is_open = False
        self.writable = flag == "w"
        self._reader: _RecordBuffer | None = None
        self._writer: _AppendFile | None = None
        self._pos = 0
        self.open()

    # lifecycle
    def open(self) -> None:
        """Open the file: ``'w'`` truncates it, ``'r'`` maps it and starts at the first record."""
        if self.flag == "w":
            self._writer = _AppendFile(self.uri, background=self.background_writes)
            self.writable = True
        elif self.flag == "r":
            self._reader = _RecordBuffer(self.uri)
            self.writable = False
        else:
            raise ValueError(f"Invalid flag {self.flag!r} for {self.uri} (expected 'r' or 'w')")
        self._pos = 0
        self.pid = os.getpid()
        self.is_open = True

    def close(self) -> None:
        """Close the file (idempotent)."""
        if not self.is_open:
            return
        if self._writer is not None:
            self._writer.close()  # flushes only in the process that opened it
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.is_open = False
        self.pid = None

    def reset(self) -> None:
        """Back to the first record; in ``'w'`` mode this truncates the file, as in MXNet."""
        self.close()
        self.open()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    def __getstate__(self) -> dict:
        if self.writable and self.is_open:
            raise TypeError(f"cannot pickle {type(self).__name__} open for writing {self.uri} (a copy would truncate it)")
        state = {k: v for k, v in self.__dict__.items() if k not in ("_reader", "_writer")}
        state["_pos"] = 0
        state["pid"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        was_open = state.pop("is_open")
        self.__dict__.update(state)
        self.is_open = False
        self._reader = self._writer = None
        if was_open:
            self.open()

    # process checks
    def _buffer(self) -> _RecordBuffer:
        """The mapped file, re-mapped after a fork; refuses writers and closed objects."""
        reader = self._reader
        if reader is not None and reader.pid == os.getpid():
            return reader
        if not self.is_open:
            raise ValueError(f"I/O operation on closed RecordIO file {self.uri}")
        if self.writable:
            raise io.UnsupportedOperation(f"{self.uri} is open for writing, not reading")
        self._reader = _RecordBuffer(self.uri)  # new process: map again, keep the position
        self.pid = self._reader.pid
        return self._reader

    def _out(self) -> _AppendFile:
        if not self.is_open:
            raise ValueError(f"I/O operation on closed RecordIO file {self.uri}")
        if not self.writable:
            raise io.UnsupportedOperation(f"{self.uri} is open for reading, not writing")
        if self.pid != os.getpid():
            raise RuntimeError(f"{self.uri}: writing from another process than the one that opened it is forbidden")
        return self._writer  # type: ignore[return-value]

    # I/O
    def write(self, buf: bytes) -> None:
        """Append one record (bytes, any size below 2**29)."""
        self._out().write_record(_as_payload(buf))

    def read(self) -> bytes | None:
        """The next record's bytes, or ``None`` after the last record."""
        record, self._pos = self._buffer().read_at(self._pos)
        return record

    def read_at(self, offset: int) -> bytes:
        """The record starting at byte ``offset`` (from a ``.idx``); does not move :meth:`read`."""
        record, _ = self._buffer().read_at(offset)
        if record is None:
            raise FormatError(self.uri, f"offset {offset} is the end of the file", "the offset of a record")
        return record

    def tell(self) -> int:
        """Byte offset where the next record will be written (writers) or read (readers)."""
        if self.writable:
            return self._out().tell()
        return self._pos

    def iter_with_offsets(self) -> Iterator[tuple[int, bytes]]:
        """``(offset, record)`` for every record in file order, independent of :meth:`read`."""
        buf = self._buffer()
        pos = 0
        while True:
            record, nxt = buf.read_at(pos)
            if record is None:
                return
            yield pos, record
            pos = nxt
            if buf.pid != os.getpid():  # pragma: no cover - generator carried across a fork
                buf = self._buffer()

    def __iter__(self) -> Iterator[bytes]:
        """Every record in file order (a fresh pass each time)."""
        for _, record in self.iter_with_offsets():
            yield record


# --- indexed reader / writer --------------------------------------------------------------------

_WELL_FORMED_INT_IDX = re.compile(r"(?:-?[0-9]+\t[0-9]+\n)*(?:-?[0-9]+\t[0-9]+)?")


def _parse_idx_lines(text: str, path: str, key_type: Callable[[str], Any]) -> tuple[list, list[int]]:
    """``(keys, offsets)`` from ``.idx`` text, in file order; FormatError names the bad line."""
    if key_type is int and _WELL_FORMED_INT_IDX.fullmatch(text):
        tokens = text.split()  # fast path: validated as '<int>\t<int>\n' lines
        return list(map(int, tokens[0::2])), list(map(int, tokens[1::2]))
    keys, offsets = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # MXNet would stop with a ValueError; a blank line carries nothing
        fields = line.strip().split("\t")
        if len(fields) != 2:
            raise FormatError(path, f"line {lineno}: {line!r} has {len(fields)} tab-separated fields", "'<key>\\t<offset>'")
        try:
            key = key_type(fields[0])
        except (TypeError, ValueError):
            raise FormatError(path, f"line {lineno}: key {fields[0]!r} is not a valid {getattr(key_type, '__name__', key_type)}", "a record key") from None
        try:
            offset = int(fields[1])
        except ValueError:
            raise FormatError(path, f"line {lineno}: offset {fields[1]!r} is not an integer", "a byte offset") from None
        if offset < 0:
            raise FormatError(path, f"line {lineno}: key {key!r} has the negative offset {offset}", "a byte offset >= 0 into the .rec")
        keys.append(key)
        offsets.append(offset)
    return keys, offsets


def read_idx_file(idx_path: str | os.PathLike, key_type: Callable[[str], Any] = int) -> tuple[list, list[int]]:
    """Parse a ``.idx`` file: ``(keys, offsets)`` in file order (duplicates kept)."""
    path = os.fspath(idx_path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise FormatError(path, "index file does not exist", "a .idx next to the .rec (rebuild it with rebuild_index)") from None
    return _parse_idx_lines(text, path, key_type)


def read_idx_arrays(idx_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Integer-keyed ``.idx`` as two int64 arrays ``(keys (R,), offsets (R,))`` in file order."""
    keys, offsets = read_idx_file(idx_path, int)
    return np.asarray(keys, dtype=np.int64), np.asarray(offsets, dtype=np.int64)


class MXIndexedRecordIO(MXRecordIO):
    """Random access to a ``.rec`` through its ``.idx``, like ``mxnet.recordio.MXIndexedRecordIO``.

    Reader: ``idx`` maps key -> byte offset, ``keys`` lists keys in ``.idx`` order;
    :meth:`read_idx` returns one record. Writer: :meth:`write_idx` appends a record and its
    ``key\\toffset`` line.
    """

    def __init__(self, idx_path: str | os.PathLike, uri: str | os.PathLike, flag: str, key_type: Callable = int, *,
                 background_writes: bool = False):
        self.idx_path = os.fspath(idx_path)
        self.idx: dict = {}
        self.keys: list = []
        self.key_type = key_type
        self.fidx: _AppendFile | None = None
        super().__init__(uri, flag, background_writes=background_writes)

    def open(self) -> None:
        super().open()
        self.idx = {}
        self.keys = []
        if self.writable:
            self.fidx = _AppendFile(self.idx_path)
        else:
            self.fidx = None
            self.keys, offsets = read_idx_file(self.idx_path, self.key_type)
            self.idx = dict(zip(self.keys, offsets))

    def close(self) -> None:
        if not self.is_open:
            return
        if self.fidx is not None:
            self.fidx.close()
            self.fidx = None
        super().close()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("fidx", None)
        state["idx"], state["keys"] = {}, []  # paths only: the index is read again on unpickling
        return state

    def __setstate__(self, state: dict) -> None:
        self.fidx = None
        super().__setstate__(state)

    def seek(self, idx: Any) -> None:
        """Make :meth:`read` return the record with key ``idx`` next."""
        self._buffer()
        self._pos = self.idx[idx]

    def read_idx(self, idx: Any) -> bytes:
        """The record stored under key ``idx`` (``KeyError`` if the key is not in the ``.idx``)."""
        reader = self._reader
        if reader is None or reader.pid != os.getpid():
            reader = self._buffer()
        offset = self.idx[idx]
        record, self._pos = reader.read_at(offset, idx)
        if record is None:
            raise FormatError(self.uri, f"record key {idx!r}: offset {offset} is the end of the file", "the offset of a record (stale .idx?)")
        return record

    def write_idx(self, idx: Any, buf: bytes) -> None:
        """Append record ``buf`` and the line ``"<key>\\t<offset>\\n"`` to the ``.idx``."""
        key = self.key_type(idx)
        pos = self._out().write_record(_as_payload(buf))
        self.fidx.write(f"{key}\t{pos}\n".encode())  # type: ignore[union-attr]
        self.idx[key] = pos
        self.keys.append(key)

    def write_idx_batch(self, keys: Sequence[int] | np.ndarray, labels: Sequence[float] | np.ndarray,
                        payloads: Sequence[bytes]) -> np.ndarray:
        """``write_idx(keys[i], pack(IRHeader(0, labels[i], keys[i], 0), payloads[i]))`` for every i,
        byte for byte, framed in one go (:func:`pack_framed`). ``keys`` are integers (they are
        also the header ids); ``labels`` float ``(N,)`` or ``(N, L)``. Returns the record offsets,
        int64 ``(N,)``."""
        out = self._out()
        ids = np.asarray(keys, dtype=np.int64).reshape(-1)
        data, offsets = pack_framed(ids, labels, payloads)
        offsets += out.tell()
        out.write(data)
        key_list = ids.tolist() if self.key_type is int else [self.key_type(k) for k in ids.tolist()]
        offset_list = offsets.tolist()
        self.fidx.write("".join(map("{}\t{}\n".format, key_list, offset_list)).encode())  # type: ignore[union-attr]
        self.idx.update(zip(key_list, offset_list))
        self.keys.extend(key_list)
        return offsets


def rebuild_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike) -> int:
    """Rebuild a lost ``.idx`` by scanning ``rec_path``: key = header ``id``, offset = record start.

    Valid for every InsightFace/MXNet writer (their ``.idx`` key is the header id, spec s1.3).
    Written atomically; returns the number of records.
    """
    lines = []
    with MXRecordIO(rec_path, "r") as rec:
        for offset, record in rec.iter_with_offsets():
            if len(record) < _IR_SIZE:
                raise FormatError(rec_path, f"record at offset {offset} has {len(record)} bytes", "an IRHeader of 24 bytes")
            lines.append(f"{_IR.unpack_from(record)[2]}\t{offset}\n")
    with atomic_open(idx_path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("".join(lines))
    return len(lines)


__all__ = [
    "IRHeader", "pack", "unpack", "pack_img", "unpack_img", "frame_record", "pack_framed",
    "MXRecordIO", "MXIndexedRecordIO", "read_idx_file", "read_idx_arrays", "rebuild_index",
    "MAGIC", "MAX_RECORD_BYTES",
]


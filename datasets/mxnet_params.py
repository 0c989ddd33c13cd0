"""MXNet checkpoint files without MXNet: the NDArray list container (``.params``, ``mx.nd.save``) and ``-symbol.json``.

A checkpoint is ``prefix-symbol.json`` (the graph) + ``prefix-%04d.params`` (weights of epoch N), named
``"prefix,epoch"`` by InsightFace's command lines (``--pretrained ../models/model-r100-ii/model,0``).

``.params`` container (little-endian; MXNet ``src/ndarray/ndarray.cc``, dmlc serializers)::

    uint64  magic 0x112            (kMXAPINDArrayListMagic)
    uint64  reserved (0)
    uint64  count, then count NDArrays:
        uint32  magic              0xF993FAC9 (V2) / 0xF993FACA (V3, numpy shapes) / 0xF993FAC8 (V1) /
                                   anything else: legacy, the value is ndim and dims are uint32
        V2/V3:  int32 storage type (0 dense; 1 row_sparse, 2 csr are refused here)
        shape:  uint32 ndim, int64 dims[ndim]   (legacy: uint32 dims); ndim 0 (V3: -1) = an empty NDArray,
                                                 nothing more follows
        int32   dev_type, int32 dev_id         (context; data are always stored as on the CPU)
        int32   type flag                      (0 float32, 1 float64, 2 float16, 3 uint8, 4 int32, 5 int8,
                                                 6 int64, 7 bool, 8 int16, 9 uint16, 10 uint32, 11 uint64)
        data    prod(dims) * itemsize bytes, C order
    uint64  count of names (0, or the NDArray count), then each: uint64 length + UTF-8 bytes

``mx.model.save_checkpoint`` names the arrays ``arg:<name>`` (learned) and ``aux:<name>`` (BN moving
statistics). :func:`read_ndarray_list` returns arrays and names; :func:`read_params` splits them into
``(arg_params, aux_params)`` as ``mx.model.load_checkpoint`` does; :func:`write_ndarray_list` writes
the V2 form byte for byte as MXNet 1.x does for dense CPU arrays. Bad files raise
:class:`datasets.errors.FormatError` naming the file, the array and the byte offset.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from datasets.atomic import atomic_paths
from datasets.errors import FormatError

__all__ = ["LIST_MAGIC", "V1_MAGIC", "V2_MAGIC", "V3_MAGIC", "DTYPES", "read_ndarray_list", "read_params",
           "write_ndarray_list", "read_symbol", "MXNetCheckpoint", "resolve_mxnet_checkpoint", "is_ndarray_list"]

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"), 1: np.dtype("<f8"), 2: np.dtype("<f2"), 3: np.dtype("u1"), 4: np.dtype("<i4"),
    5: np.dtype("i1"), 6: np.dtype("<i8"), 7: np.dtype("?"), 8: np.dtype("<i2"), 9: np.dtype("<u2"),
    10: np.dtype("<u4"), 11: np.dtype("<u8"),
}
_FLAGS = {v: k for k, v in DTYPES.items()}
_MAX_NDIM = 32
_PREFIX_EPOCH = re.compile(r"^(?P<prefix>.+),(?P<epoch>\d+)$")


class _Reader:
    def __init__(self, fh: BinaryIO, path: Path, size: int):
        self.fh, self.path, self.size = fh, path, size

    def take(self, n: int, what: str) -> bytes:
        offset = self.fh.tell()
        if n < 0 or offset + n > self.size:
            raise FormatError(self.path, f"{what} at byte {offset} needs {n} bytes, {self.size - offset} left",
                              "an MXNet NDArray list (.params)")
        return self.fh.read(n)

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def is_ndarray_list(path: str | os.PathLike) -> bool:
    """True when the file starts with the NDArray list magic 0x112 and a zero reserved word."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return len(head) == 16 and struct.unpack("<QQ", head) == (LIST_MAGIC, 0)


def _read_array(r: _Reader, index: int) -> np.ndarray | None:
    where = f"NDArray {index}"
    (magic,) = r.unpack("I", f"{where} magic")
    if magic in (V2_MAGIC, V3_MAGIC):
        (stype,) = r.unpack("i", f"{where} storage type")
        if stype != 0:
            raise FormatError(r.path, f"{where} has storage type {stype} (sparse)", "dense arrays (storage type 0)")
        (ndim,) = r.unpack("i", f"{where} ndim")
        if ndim == -1 or ndim == 0:
            return None
        if not 0 < ndim <= _MAX_NDIM:
            raise FormatError(r.path, f"{where} has ndim {ndim}", f"1..{_MAX_NDIM}")
        dims = r.unpack(f"{ndim}q", f"{where} shape")
    elif magic == V1_MAGIC:
        (ndim,) = r.unpack("I", f"{where} ndim")
        if ndim == 0:
            return None
        if ndim > _MAX_NDIM:
            raise FormatError(r.path, f"{where} has ndim {ndim}", f"1..{_MAX_NDIM}")
        dims = r.unpack(f"{ndim}q", f"{where} shape")
    else:  # legacy: the magic word is ndim, dims are uint32
        ndim = magic
        if ndim == 0:
            return None
        if ndim > _MAX_NDIM:
            raise FormatError(r.path, f"{where} starts with {magic:#x}",
                              f"an NDArray magic ({V2_MAGIC:#x}, {V1_MAGIC:#x}) or a legacy ndim <= {_MAX_NDIM}")
        dims = r.unpack(f"{ndim}I", f"{where} shape")
    if any(d < 0 for d in dims):
        raise FormatError(r.path, f"{where} has shape {dims}", "non-negative dimensions")
    r.unpack("ii", f"{where} context")
    (flag,) = r.unpack("i", f"{where} type flag")
    if flag not in DTYPES:
        raise FormatError(r.path, f"{where} has type flag {flag}", f"one of {sorted(DTYPES)}")
    dtype = DTYPES[flag]
    count = int(np.prod(dims, dtype=np.int64))
    data = r.take(count * dtype.itemsize, f"{where} data ({dims} {dtype.name})")
    return np.frombuffer(data, dtype=dtype).reshape(dims).copy()


def read_ndarray_list(path: str | os.PathLike) -> tuple[list[np.ndarray | None], list[str]]:
    """Arrays (``None`` for an empty NDArray) and names (``[]`` for an unnamed list) of an ``mx.nd.save`` file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        r = _Reader(fh, path, size)
        magic, reserved = r.unpack("QQ", "header")
        if magic != LIST_MAGIC or reserved != 0:
            raise FormatError(path, f"header {magic:#x}/{reserved:#x}", f"an MXNet NDArray list (magic {LIST_MAGIC:#x}, reserved 0)")
        (count,) = r.unpack("Q", "array count")
        if count > size:
            raise FormatError(path, f"array count {count} for a file of {size} bytes", "an MXNet NDArray list")
        arrays = [_read_array(r, i) for i in range(count)]
        (n_names,) = r.unpack("Q", "name count")
        if n_names not in (0, count):
            raise FormatError(path, f"{n_names} names for {count} arrays", "no names or one per array")
        names = []
        for i in range(n_names):
            (length,) = r.unpack("Q", f"name {i} length")
            raw = r.take(length, f"name {i}")
            try:
                names.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise FormatError(path, f"name {i} is not UTF-8 ({raw[:40]!r})") from None
        if fh.tell() != size:
            raise FormatError(path, f"{size - fh.tell()} bytes after the last name", "nothing after the names")
    return arrays, names


def read_params(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(arg_params, aux_params)`` of a ``save_checkpoint`` ``.params`` file (names without ``arg:``/``aux:``)."""
    arrays, names = read_ndarray_list(path)
    if not names and arrays:
        raise FormatError(path, "an unnamed NDArray list", "named arrays (arg:NAME / aux:NAME)")
    args: dict[str, np.ndarray] = {}
    aux: dict[str, np.ndarray] = {}
    for name, array in zip(names, arrays):
        kind, _, key = name.partition(":")
        if kind not in ("arg", "aux") or not key:
            raise FormatError(path, f"array name {name!r}", "arg:NAME or aux:NAME")
        if array is None:
            raise FormatError(path, f"array {name!r} is empty", "weights with a shape")
        (args if kind == "arg" else aux)[key] = array
    return args, aux


def write_ndarray_list(path: str | os.PathLike, arrays: list[np.ndarray] | dict[str, np.ndarray]) -> Path:
    """Write dense arrays (a list, or a dict of names) as ``mx.nd.save`` does (V2, CPU context), atomically."""
    names = list(arrays) if isinstance(arrays, dict) else []
    values = list(arrays.values()) if isinstance(arrays, dict) else list(arrays)
    parts = [struct.pack("<QQQ", LIST_MAGIC, 0, len(values))]
    for value in values:
        a = np.ascontiguousarray(value)
        flag = _FLAGS.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
        if flag is None:
            raise ValueError(f"dtype {a.dtype} has no MXNet type flag")
        parts.append(struct.pack("<Iii", V2_MAGIC, 0, a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape))
        parts.append(struct.pack("<iii", 1, 0, flag) + a.astype(DTYPES[flag], copy=False).tobytes())
    parts.append(struct.pack("<Q", len(names)))
    for name in names:
        raw = name.encode("utf-8")
        parts.append(struct.pack("<Q", len(raw)) + raw)
    path = Path(path)
    with atomic_paths(path) as (tmp,):
        Path(tmp).write_bytes(b"".join(parts))
    return path


def read_symbol(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The ``nodes`` of an MXNet ``-symbol.json`` (each: ``op``, ``name``, ``attrs``/``attr``/``param``, ``inputs``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"cannot be read as JSON ({exc})", "an MXNet symbol file (-symbol.json)") from None
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    if not isinstance(nodes, list) or not all(isinstance(n, dict) and "op" in n and "name" in n for n in nodes):
        raise FormatError(path, "no 'nodes' list of {op, name} objects", "an MXNet symbol file (-symbol.json)")
    return nodes


class MXNetCheckpoint:
    """The two files of an MXNet checkpoint: ``symbol`` (``prefix-symbol.json``) and ``params`` (``prefix-NNNN.params``)."""

    def __init__(self, symbol: Path, params: Path):
        self.symbol, self.params = symbol, params

    @property
    def files(self) -> list[Path]:
        return [self.symbol, self.params]

    def __repr__(self) -> str:
        return f"MXNetCheckpoint({self.symbol}, {self.params})"


def resolve_mxnet_checkpoint(spec: str | os.PathLike) -> MXNetCheckpoint | None:
    """The checkpoint named by ``"prefix,epoch"``, ``prefix-NNNN.params`` or ``prefix-symbol.json``; None when
    ``spec`` names none of these forms. Raises ``FileNotFoundError`` naming the missing file.

    A ``.params`` file without its ``-symbol.json`` is refused: the graph says how the weights are used
    (input normalisation, BatchNorm eps and fix_gamma).
    """
    text = os.fspath(spec)
    match = _PREFIX_EPOCH.match(text)
    if match and not Path(text).exists():
        prefix, epoch = match["prefix"], int(match["epoch"])
        params = Path(f"{prefix}-{epoch:04d}.params")
        if not params.is_file():
            return None  # maybe prefix-NNNN.pt
    elif text.endswith(".params"):
        params = Path(text)
        prefix = re.sub(r"-\d+\.params$", "", text) if re.search(r"-\d+\.params$", text) else text[: -len(".params")]
    elif text.endswith("-symbol.json"):
        prefix = text[: -len("-symbol.json")]
        found = sorted(Path(prefix).parent.glob(Path(prefix).name + "-[0-9][0-9][0-9][0-9].params"))
        if not found:
            raise FileNotFoundError(f"{text}: no {prefix}-NNNN.params beside it (give 'prefix,epoch' or the .params file)")
        if len(found) > 1:
            raise FileNotFoundError(f"{text}: several epochs ({', '.join(p.name for p in found[:4])}); "
                                    f"give 'prefix,epoch' or the .params file")
        params = found[0]
    else:
        return None
    symbol = Path(f"{prefix}-symbol.json")
    if not params.is_file():
        raise FileNotFoundError(f"MXNet checkpoint {text!r}: {params} does not exist")
    if not symbol.is_file():
        raise FileNotFoundError(f"MXNet checkpoint {text!r}: {symbol} does not exist (the graph is needed beside {params.name})")
    return MXNetCheckpoint(symbol, params)

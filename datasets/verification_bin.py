"""Verification packs (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``; spec s4.1-4.4).

File layout: one pickle (protocol 2 in the released packs, written by Python 2) of the tuple
``(bins, issame)``: ``bins`` is a list of 2P encoded images (JPEG, 112x112 in released packs),
pair ``i`` = ``(bins[2i], bins[2i+1])``; ``issame`` is a list of P bools. Elements occur as Python 2
``str`` (lfw2pack), as the uint8 ``ndarray`` that ``cv2.imencode`` returns (cfp2pack, agedb2pack2,
build_eval_pack), and, from Python 3 writers, as ``bytes``/``bytearray``.

Files are read with a restricted unpickler: only the globals that numpy arrays, numpy scalars and
Python 3's protocol-2 ``bytes`` need can be loaded; anything else (``os.system``, ...) raises
:class:`~datasets.errors.UnsafePickleError` naming the file and the global. Python 2 strings are
read as bytes (``encoding='bytes'``, as InsightFace's loaders do).
"""
from __future__ import annotations

import io
import math
import os
import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from .atomic import atomic_write_bytes
from .errors import FormatError, UnsafePickleError
from .face_codec import encode_jpeg

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]
import _codecs
import builtins


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        table[(f"{mod}.multiarray", "_reconstruct")] = _multiarray._reconstruct
        table[(f"{mod}.multiarray", "scalar")] = _multiarray.scalar
        table[(f"{mod}.numeric", "_frombuffer")] = _numeric._frombuffer
    table[("_codecs", "encode")] = _codecs.encode
    for mod in ("builtins", "__builtin__"):
        for name in ("bytes", "bytearray", "set", "frozenset"):
            table[(mod, name)] = getattr(builtins, name)
    return table


_ALLOWED = _allowed_globals()


#: Bytes that calls made by a pack's pickle may allocate beyond the file's own size (see
#: :class:`_RestrictedUnpickler`).
ALLOCATION_SLACK = 1 << 20


def _count(value: Any) -> int:
    """Bytes a ``bytes``/``bytearray``/``set`` constructor argument makes the call allocate."""
    if isinstance(value, int):
        return max(value, 0)
    try:
        return len(value)
    except TypeError:
        return 0


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`_ALLOWED` globals (never imports anything) and keeps
    the memory its calls allocate within a byte budget.

    Every allocation a pickle can request by calling an allowed global (``bytearray(n)``,
    ``bytes(n)``, ``_codecs.encode(text)``, ``ndarray(shape)`` / ``_reconstruct(ndarray, shape,
    dtype)``, ``set(items)``) is counted before the call; once the total would exceed ``budget``
    bytes the load stops with a :class:`FormatError` naming the call, before allocating. The
    default budget is the file's size plus :data:`ALLOCATION_SLACK`: every image of a pack is
    spelled out in the file, so honest calls never need more than the file holds, while a
    49-byte file calling ``bytearray(2**30)`` (or one reusing a memoised string thousands of
    times) is refused at once.
    """

    def __init__(self, file, path: str, budget: int):
        super().__init__(file, encoding="bytes")
        self._path = path
        self._budget = budget
        self._spent = 0

    def _spend(self, nbytes: int, call: str) -> None:
        self._spent += nbytes
        if self._spent > self._budget:
            raise FormatError(
                self._path, f"pickle call {call} would allocate {nbytes} bytes ({self._spent} in all)",
                f"at most {self._budget} bytes for a pack of this size (allocation budget)",
            )

    def _array_bytes(self, call: str, shape: Any, dtype: Any) -> None:
        try:
            dims = tuple(int(d) for d in (shape if isinstance(shape, (tuple, list)) else (shape,)))
            itemsize = np.dtype(dtype).itemsize
        except (TypeError, ValueError) as exc:
            raise FormatError(self._path, f"pickle call {call} with shape {shape!r} ({exc})", "an array shape and dtype") from None
        self._spend(itemsize * math.prod(max(d, 0) for d in dims), f"{call}(shape {dims})")

    def _guarded(self, module: str, name: str, func: Any) -> Any:
        """``func`` wrapped so that what it allocates is counted first (see the class docstring)."""
        call = f"{module}.{name}"
        if func is np.ndarray:
            return _NdarrayCall(self, call)
        if func is _multiarray._reconstruct:
            def reconstruct(cls: Any, shape: Any = (0,), dtype: Any = b"b", *rest: Any) -> Any:
                if isinstance(cls, _NdarrayCall):
                    cls = np.ndarray
                self._array_bytes(call, shape, dtype)
                return func(cls, shape, dtype, *rest)
            return reconstruct
        if func is _codecs.encode:  # Python 3's protocol-2 bytes: encode(<latin-1 text>, "latin1"), 1 byte a char
            def encode(text: Any, encoding: Any = "utf-8", *rest: Any) -> Any:
                if encoding not in ("latin1", "latin-1", b"latin1"):
                    raise FormatError(self._path, f"pickle call {call} with encoding {encoding!r}",
                                      "'latin1' (how Python 3 pickles bytes)")
                self._spend(_count(text), call)
                return func(text, "latin1", *rest)
            return encode
        if func in (bytes, bytearray, set, frozenset):
            def sized(*args: Any, **kwargs: Any) -> Any:
                self._spend(_count(args[0]) if args else 0, call)
                return func(*args, **kwargs)
            return sized
        return func

    def find_class(self, module: str, name: str) -> Any:
        try:
            func = _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                self._path, f"pickle asks for global {module}.{name}, which is not allowed",
                "only numpy arrays/scalars, bytes and bools in a verification pack",
            ) from None
        return self._guarded(module, name, func)


class _NdarrayCall:
    """Stands for ``numpy.ndarray`` in a pickle: as a class argument of ``_reconstruct`` it
    becomes ``np.ndarray`` again; called directly, its allocation is counted first."""

    def __init__(self, owner: _RestrictedUnpickler, call: str):
        self._owner, self._call = owner, call

    def __call__(self, shape: Any = (), dtype: Any = float, *args: Any, **kwargs: Any) -> np.ndarray:
        self._owner._array_bytes(self._call, shape, dtype)
        return np.ndarray(shape, dtype, *args, **kwargs)


def _element_bytes(element: Any, index: int, path: str) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, (bytearray, memoryview)):
        return bytes(element)
    if isinstance(element, np.ndarray) and element.dtype == np.uint8:
        return element.tobytes()
    raise FormatError(path, f"image element {index} is a {type(element).__name__}", "bytes, bytearray, Python 2 str or a uint8 ndarray")


def load_bin(path: str | os.PathLike, *, budget: int | None = None) -> tuple[list[bytes], np.ndarray]:
    """Read a verification pack: ``(images, issame)``.

    ``images``: list of 2P encoded images (bytes); ``issame``: bool ndarray ``(P,)``.
    ``budget``: most bytes the pickle's calls may allocate (default: the file's size plus
    :data:`ALLOCATION_SLACK`); a pickle asking for more raises :class:`FormatError` before the
    allocation.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            limit = budget if budget is not None else os.fstat(fh.fileno()).st_size + ALLOCATION_SLACK
            obj = _RestrictedUnpickler(fh, path, limit).load()
    except FileNotFoundError:
        raise FormatError(path, "verification pack does not exist", "a .bin pickle") from None
    except FormatError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, UnicodeDecodeError, struct.error) as exc:
        raise FormatError(path, f"not a readable pickle ({type(exc).__name__}: {exc})", "a pickled (images, issame) tuple") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise FormatError(path, f"pickle holds a {type(obj).__name__}", "a 2-tuple (images, issame)")
    bins, issame = obj
    if isinstance(bins, np.ndarray) and bins.dtype == object:
        bins = list(bins)
    if not isinstance(bins, (list, tuple)):
        raise FormatError(path, f"images are a {type(bins).__name__}", "a list of encoded images")
    images = [_element_bytes(b, i, path) for i, b in enumerate(bins)]
    try:
        same = np.asarray(issame)
    except Exception:  # pragma: no cover - exotic objects
        same = np.asarray([], dtype=object)
    if same.ndim != 1 or not (same.dtype == np.bool_ or np.isin(same, (0, 1)).all()):
        raise FormatError(path, f"issame has dtype {same.dtype} and shape {same.shape}", "a list of P bools")
    same = same.astype(np.bool_)
    if len(images) != 2 * len(same):
        raise FormatError(path, f"{len(images)} images for {len(same)} pairs", f"2 x {len(same)} = {2 * len(same)} images")
    return images, same


def resize_short(img: np.ndarray, size: int) -> np.ndarray:
    """``mx.image.resize_short(img, size)``: shorter side to ``size`` (other side floored), bicubic."""
    h, w = img.shape[:2]
    if h > w:
        new_w, new_h = size, size * h // w
    else:
        new_w, new_h = size * w // h, size
    return cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_CUBIC)


def decode_bin(
    path: str | os.PathLike, image_size: tuple[int, int] = (112, 112), *, num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode a verification pack: ``(images uint8 (2P, H, W, 3) RGB, issame bool (P,))``.

    Like InsightFace's ``load_bin``: OpenCV decode to RGB. An image that already measures
    ``image_size`` = ``(H, W)`` is kept as it is. Otherwise it is scaled as InsightFace does
    (``if img.shape[1] != image_size[0]: resize_short(img, image_size[0])``, bicubic) for a square
    model; for a non-square model (112x96) its shorter side goes to ``min(H, W)`` (:func:`resize_short`),
    which gives ``(H, W)`` for an image of the model's aspect ratio. (InsightFace's rule compares the
    width with the *height*: it turns a 112x96 image into 130x112 even for a 112x96 model, so that
    ``load_bin`` cannot read 112x96 packs; the 2017-18 ``load_bin`` did not resize at all.) Images
    that still do not measure ``(H, W)`` raise :class:`FormatError` naming their index. Decoding runs
    on ``num_threads`` threads (OpenCV releases the GIL), default ``min(8, cpu count)``.
    """
    path = os.fspath(path)
    images, issame = load_bin(path)
    height, width = image_size
    out = np.empty((len(images), height, width, 3), np.uint8)

    def decode(i: int) -> None:
        buf = images[i]
        img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR) if buf else None
        if img is None:
            raise FormatError(path, f"image {i} (pair {i // 2}) of {len(buf)} bytes cannot be decoded", "JPEG/PNG bytes")
        img = img[:, :, ::-1]  # BGR -> RGB, copied by the assignment below
        found = f"{img.shape[0]}x{img.shape[1]}"
        if img.shape[:2] != (height, width):
            short = height if height == width else min(height, width)
            if height != width or img.shape[1] != short:
                img = resize_short(img, short)
                found += f" ({img.shape[0]}x{img.shape[1]} after resize_short to {short})"
        if img.shape[:2] != (height, width):
            raise FormatError(path, f"image {i} (pair {i // 2}) measures {found}", f"{height}x{width}")
        out[i] = img

    threads = num_threads or min(8, os.cpu_count() or 1)
    if threads <= 1 or len(images) < 64:
        for i in range(len(images)):
            decode(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(decode, range(len(images))))
    return out, issame


# --- writer: the opcodes of Python 2's pickle.py, protocol 2 ------------------------------------

_PROTO, _STOP, _MARK = b"\x80", b".", b"("
_EMPTY_LIST, _APPEND, _APPENDS, _TUPLE2 = b"]", b"a", b"e", b"\x86"
_NEWTRUE, _NEWFALSE = b"\x88", b"\x89"
_SHORT_BINSTRING, _BINSTRING = b"U", b"T"
_BINPUT, _LONG_BINPUT = b"q", b"r"
_BATCH = 1000  # pickle.py's _BATCHSIZE


class _Py2PickleWriter:
    """Emit the byte sequence CPython 2.7's ``pickle.dump(obj, f, 2)`` produces for our objects.

    Only what a pack holds: a tuple of two lists, of ``str`` (bytes) and of ``bool``.
    """

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.memo = 0

    def _memoize(self) -> None:
        i = self.memo
        self.out.write(_BINPUT + bytes([i]) if i < 256 else _LONG_BINPUT + struct.pack("<i", i))
        self.memo += 1

    def _save_bytes(self, b: bytes) -> None:
        n = len(b)
        self.out.write(_SHORT_BINSTRING + bytes([n]) if n < 256 else _BINSTRING + struct.pack("<i", n))
        self.out.write(b)
        self._memoize()

    def _save_bool(self, v: bool) -> None:
        self.out.write(_NEWTRUE if v else _NEWFALSE)

    def _save_list(self, items: Sequence, save) -> None:
        self.out.write(_EMPTY_LIST)
        self._memoize()
        for lo in range(0, len(items), _BATCH):
            batch = items[lo:lo + _BATCH]
            if len(batch) > 1:
                self.out.write(_MARK)
                for x in batch:
                    save(x)
                self.out.write(_APPENDS)
            else:
                save(batch[0])
                self.out.write(_APPEND)

    def dump_pack(self, images: Sequence[bytes], issame: Sequence[bool]) -> bytes:
        self.out.write(_PROTO + b"\x02")
        self._save_list(images, self._save_bytes)
        self._save_list(issame, self._save_bool)
        self.out.write(_TUPLE2)
        self._memoize()
        self.out.write(_STOP)
        return self.out.getvalue()


def _encode_image(img: Any, index: int, quality: int) -> bytes:
    if isinstance(img, (bytes, bytearray, memoryview)):
        return bytes(img)
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        raise ValueError(f"image {index}: dtype {arr.dtype} (expected encoded bytes or uint8 pixels)")
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1):
        return arr.tobytes()  # already encoded, e.g. the (n, 1) array cv2.imencode returns
    if arr.ndim == 3 and arr.shape[2] == 3:
        return encode_jpeg(arr, quality)
    raise ValueError(f"image {index}: shape {arr.shape} (expected encoded bytes or (H, W, 3) RGB uint8)")


def write_bin(
    path: str | os.PathLike, images: Sequence[Any], issame: Sequence[bool] | np.ndarray, *, quality: int = 95
) -> Path:
    """Write a verification pack in the form of the released ones, atomically.

    ``images``: 2P encoded images (bytes) or RGB uint8 ``(H, W, 3)`` arrays, which are encoded as
    JPEG (``quality``, OpenCV, from BGR as InsightFace's packers do). ``issame``: P bools.

    Format choice: the opcodes CPython 2.7's ``pickle.dump(..., protocol=2)`` emits for lfw2pack's
    ``(list of str, list of bool)`` (images as ``SHORT_BINSTRING``/``BINSTRING``), not Python 3's
    protocol 2. Both can be read by Python 2, but this one is what the released packs contain,
    stores JPEG bytes 1:1 (Python 3's protocol 2 wraps bytes in ``_codecs.encode(<latin-1 text>)``,
    which costs about 1.5x the size), and is read by every InsightFace loader: Python 2
    ``pickle.load``, the 2019 ``verification.py`` (retries with ``encoding='bytes'``) and
    arcface_torch (``encoding='bytes'``). A plain Python 3 ``pickle.load`` without
    ``encoding='bytes'`` fails on it, as it does on the released packs.
    """
    if isinstance(issame, np.ndarray):
        issame = issame.tolist()
    same = [bool(v) for v in issame]
    if len(images) != 2 * len(same):
        raise ValueError(f"{path}: {len(images)} images for {len(same)} pairs (expected {2 * len(same)} images)")
    encoded = [_encode_image(img, i, quality) for i, img in enumerate(images)]
    atomic_write_bytes(path, _Py2PickleWriter().dump_pack(encoded, same))
    return Path(path)


__all__ = ["load_bin", "decode_bin", "write_bin", "resize_short", "UnsafePickleError"]

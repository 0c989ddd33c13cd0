"""Aligned face images as bytes: what ``.rec`` records, ``.bin`` packs and aligned folders hold.

OpenCV's libjpeg encodes and decodes (bit-exact with ``mx.image.imdecode``, which uses OpenCV too);
arrays are ``(H, W, 3) uint8`` in RGB order, converted from and to OpenCV's BGR here and nowhere else.
Whole photos of any format go through :func:`datasets.images.decode_image` instead.
"""
from __future__ import annotations

import os
from typing import Sequence

import cv2
import numpy as np

from .errors import FormatError

__all__ = ["encode_jpeg", "decode_face", "decode_bgr"]


def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
    """``(H, W, 3) uint8`` RGB -> baseline JPEG bytes (4:2:0) at ``quality``."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:  # pragma: no cover - OpenCV encodes any (H, W, 3) uint8 array
        raise ValueError(f"OpenCV could not encode an array of shape {getattr(rgb, 'shape', None)} as JPEG")
    return buf.tobytes()


def decode_bgr(payload: bytes | memoryview | np.ndarray, where: str | os.PathLike, what: str = "image",
               size: Sequence[int] | None = None, expected: str = "as in property") -> np.ndarray:
    """JPEG/PNG bytes -> ``(H, W, 3) uint8`` BGR (OpenCV's order, for callers that reorder planes
    themselves). Raises :class:`FormatError` naming ``where`` and ``what`` (e.g. ``"record key 7"``)
    when the bytes do not decode or, with ``size`` ``(H, W)``, when the image has another size."""
    data = np.frombuffer(payload, np.uint8) if not isinstance(payload, np.ndarray) else payload
    img = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if img is None:
        raise FormatError(where, f"{what}: payload is not a decodable image ({data.size} bytes)", "JPEG/PNG bytes")
    if size is not None and img.shape[:2] != tuple(size):
        raise FormatError(where, f"{what}: image is {img.shape[0]}x{img.shape[1]}", f"{size[0]}x{size[1]} {expected}")
    return img


def decode_face(payload: bytes | memoryview | np.ndarray, where: str | os.PathLike, what: str = "image",
                size: Sequence[int] | None = None, expected: str = "as in property") -> np.ndarray:
    """:func:`decode_bgr` as ``(H, W, 3) uint8`` RGB (a channel-reversed view)."""
    return decode_bgr(payload, where, what, size, expected)[:, :, ::-1]

"""Shared test data for the format tests: real face photos cut into 112x112 JPEG crops."""
from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import FACES

MAGIC_BYTES = bytes.fromhex("0a23d7ce")


def face_photos() -> list[Path]:
    photos = sorted((FACES / "raw").glob("*/*.jpg"))
    if not photos:
        pytest.skip(f"no face photos under {FACES / 'raw'} (see the README there)")
    return photos


@functools.lru_cache(maxsize=1)
def _decoded_photos() -> tuple[np.ndarray, ...]:
    """The photos, decoded once per test process and shrunk to at most 400 px (crops stay sharp)."""
    out = []
    for p in face_photos():
        img = cv2.imread(str(p))
        scale = 400 / max(img.shape[:2])
        out.append(cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else img)
    return tuple(out)


def face_crops(n: int, seed: int = 0, size: int = 112) -> list[np.ndarray]:
    """``n`` BGR uint8 ``(size, size, 3)`` crops of the real photos (random square windows)."""
    rng = np.random.default_rng(seed)
    images = _decoded_photos()
    out = []
    for i in range(n):
        img = images[i % len(images)]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        out.append(cv2.resize(img[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA))
    return out


def face_jpegs(n: int, seed: int = 0, size: int = 112, quality: int = 95) -> list[bytes]:
    """``n`` JPEG-encoded crops (OpenCV, quality 95), as InsightFace's packers store them."""
    return [cv2.imencode(".jpg", im, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes() for im in face_crops(n, seed, size)]


def tricky_payloads(seed: int = 0) -> list[bytes]:
    """Payloads that exercise the framing: empty, unaligned lengths, magic at aligned/unaligned offsets."""
    rng = np.random.default_rng(seed)
    M = MAGIC_BYTES
    fixed = [b"", b"a", b"ab", b"abc", b"abcd", M, M + b"xyz", b"ab" + M + b"cd", b"abcd" + M, M * 3,
             b"x" * 5 + M + b"1234" + M + b"zz", b"\0" * 4 + M + M[:3], M[1:] + M + b"q"]
    randomised = []
    for _ in range(40):
        body = bytearray(rng.integers(0, 256, int(rng.integers(0, 300)), dtype=np.uint8).tobytes())
        for _ in range(int(rng.integers(0, 4))):
            pos = int(rng.integers(0, len(body) + 1))
            body[pos:pos] = M
        randomised.append(bytes(body))
    return fixed + randomised

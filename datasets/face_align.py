"""Five-point face alignment as InsightFace does it (formats-spec section 5).

Landmarks are ``(5, 2) float`` arrays of ``(x, y)`` pixel coordinates (pixel centres at integers)
in the order left eye, right eye, nose tip, left mouth corner, right mouth corner, "left" meaning
the image's left. Output sizes are ``(height, width)``: ``(112, 112)`` (ArcFace) or ``(112, 96)``
(the 2018 SphereFace/InsightFace 96x112 crop). Images are ``(H, W, 3) uint8``.
"""
from __future__ import annotations

from typing import Literal, Sequence

import cv2
import numpy as np

from .image_size import ImageSize, parse_image_size

#: Reference points of the 112 (high) x 96 (wide) crop (``src/common/face_preprocess.py``).
TEMPLATE_112x96 = np.array(
    [
        [30.2946, 51.6963],
        [65.5318, 51.5014],
        [48.0252, 71.7366],
        [33.5493, 92.3655],
        [62.7299, 92.2041],
    ],
    dtype=np.float64,
)
#: ArcFace 112x112 reference points: the 112x96 ones shifted right by 8 px (``arcface_src``).
TEMPLATE_112x112 = TEMPLATE_112x96 + np.array([8.0, 0.0])

_TEMPLATES = {(112, 112): TEMPLATE_112x112, (112, 96): TEMPLATE_112x96}

FacePolicy = Literal["insightface", "first", "all"]


def crop_size(size: str | Sequence[int]) -> ImageSize:
    """An aligned-crop size (any spelling of :func:`datasets.image_size.parse_image_size`); only the
    two InsightFace crop sizes, ``112x112`` and ``112x96``, have a template."""
    try:
        hw = parse_image_size(size)
    except ValueError:
        hw = None
    if hw not in _TEMPLATES:
        raise ValueError(f"image size {size!r}: expected '112x112' or '112x96' (height x width)")
    return hw


def template_for(size: str | Sequence[int]) -> np.ndarray:
    """The ``(5, 2) float64`` reference points for an output size."""
    return _TEMPLATES[crop_size(size)].copy()


def _points(name: str, value) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name}: expected an (N, 2) array of points with N >= 2, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: points must be finite, got {arr.tolist()}")
    return arr


def estimate_similarity(src, dst) -> np.ndarray:
    """Least-squares similarity (scale, rotation, translation; no reflection) mapping ``src``
    points onto ``dst`` points, by Umeyama's method (what scikit-image >= 0.13 computes).

    ``src``, ``dst``: ``(N, 2)``. Returns the ``(2, 3) float64`` matrix ``M`` with
    ``dst ~= src @ M[:, :2].T + M[:, 2]``.
    """
    src = _points("src", src)
    dst = _points("dst", dst)
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {src.shape} and {dst.shape}")
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise ValueError(f"src points all coincide ({src[0].tolist()}): no similarity is defined")
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # best orthogonal map is a reflection: flip it
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_var
    matrix = np.empty((2, 3))
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def estimate_similarities(src, dst) -> np.ndarray:
    """:func:`estimate_similarity` of many point sets onto one: ``src`` ``(K, N, 2)``, ``dst``
    ``(N, 2)``; returns ``(K, 2, 3) float64``, vectorised (about 1 us per set instead of ~50).

    In the plane a proper similarity is ``z -> a z + b`` on complex numbers, so its least-squares
    fit is linear: with centred points ``s``, ``d``, ``a = sum(conj(s) d) / sum(|s|^2)``, the same
    optimum Umeyama's method finds. Raises ``ValueError`` naming the first set whose points coincide.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = _points("dst", dst)
    if src.ndim != 3 or src.shape[1:] != dst.shape:
        raise ValueError(f"src must be (K, {dst.shape[0]}, 2) point sets, got shape {src.shape}")
    zs = src[..., 0] + 1j * src[..., 1]
    zd = dst[:, 0] + 1j * dst[:, 1]
    zs_mean, zd_mean = zs.mean(axis=1, keepdims=True), zd.mean()
    sc, dc = zs - zs_mean, zd - zd_mean
    power = (np.abs(sc) ** 2).sum(axis=1)
    if (power <= 1e-12 * src.shape[1]).any():
        k = int(np.flatnonzero(power <= 1e-12 * src.shape[1])[0])
        raise ValueError(f"src set {k}: points all coincide ({src[k, 0].tolist()}): no similarity is defined")
    a = (np.conj(sc) * dc).sum(axis=1) / power
    b = zd_mean - a * zs_mean[:, 0]
    out = np.empty((len(src), 2, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 0, 2] = a.real, -a.imag, b.real
    out[:, 1, 0], out[:, 1, 1], out[:, 1, 2] = a.imag, a.real, b.imag
    return out


def transform_scale(matrix: np.ndarray) -> float:
    """Linear scale factor of a ``(2, 3)`` similarity: output pixels per input pixel."""
    return float(np.sqrt(abs(np.linalg.det(np.asarray(matrix)[:, :2]))))


def warp_affine(img: np.ndarray, matrix: np.ndarray, size: str | Sequence[int]) -> np.ndarray:
    """``img`` ``(H, W, C)`` warped by ``matrix`` ``(2, 3)`` (source pixels -> output pixels) to ``size``
    (height, width, any size): ``cv2.warpAffine``, bilinear, constant black border. The one warp of
    the project: alignment, refinement crops and packing of unaligned lists all use it."""
    h, w = parse_image_size(size)
    return cv2.warpAffine(
        img, np.asarray(matrix, dtype=np.float64), (w, h),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )


def warp_face(img: np.ndarray, landmarks, size: str | Sequence[int] = (112, 112)) -> np.ndarray:
    """Aligned face ``(height, width, 3) uint8``: the similarity that maps ``landmarks`` (5, 2)
    onto the template of ``size``, applied to ``img`` ``(H, W, 3) uint8``."""
    landmarks = _points("landmarks", landmarks)
    if landmarks.shape != (5, 2):
        raise ValueError(f"landmarks: expected shape (5, 2), got {landmarks.shape}")
    return warp_affine(img, estimate_similarity(landmarks, template_for(size)), size)


def crop_box(image_hw: Sequence[int], bbox=None, margin: float = 44) -> tuple[int, int, int, int]:
    """The region that the no-landmark fallback crops (spec 5.3), ``(x1, y1, x2, y2)`` integers.

    Without ``bbox`` the box is inset 6.25 % from every side; the box is then enlarged by
    ``margin / 2`` pixels on every side and clipped to the image.
    """
    h, w = int(image_hw[0]), int(image_hw[1])
    if bbox is None:
        x1, y1 = int(w * 0.0625), int(h * 0.0625)
        x2, y2 = w - x1, h - y1
    else:
        x1, y1, x2, y2 = (float(v) for v in bbox)
    half = margin / 2
    box = (
        int(max(np.floor(x1 - half), 0)),
        int(max(np.floor(y1 - half), 0)),
        int(min(np.floor(x2 + half), w)),
        int(min(np.floor(y2 + half), h)),
    )
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"crop box {box} is empty for an image of {w}x{h} (bbox {bbox})")
    return box


def crop_transform(box: Sequence[float], size: str | Sequence[int]) -> np.ndarray:
    """``(2, 3)`` affine map of the crop ``box`` (x1, y1, x2, y2; x2/y2 exclusive) onto an output
    of ``size``, the same sampling as ``cv2.resize(img[y1:y2, x1:x2], (width, height))``."""
    h, w = crop_size(size)
    x1, y1, x2, y2 = (float(v) for v in box)
    sx, sy = w / (x2 - x1), h / (y2 - y1)
    # resize maps output centre u to input x1 + (u + 0.5) / sx - 0.5; invert it.
    return np.array([[sx, 0.0, 0.5 * sx - 0.5 - sx * x1], [0.0, sy, 0.5 * sy - 0.5 - sy * y1]])


def center_crop(img: np.ndarray, size: str | Sequence[int] = (112, 112), bbox=None, margin: float = 44) -> np.ndarray:
    """The fallback crop when there are no landmarks (spec 5.3): ``(height, width, 3) uint8``."""
    h, w = crop_size(size)
    x1, y1, x2, y2 = crop_box(img.shape[:2], bbox, margin)
    return cv2.resize(img[y1:y2, x1:x2], (w, h), interpolation=cv2.INTER_LINEAR)


def choose_faces(boxes, scores, image_hw: Sequence[int], policy: FacePolicy) -> list[int]:
    """Which detections to keep, as indices into ``boxes`` ``(n, 4)`` / ``scores`` ``(n,)``.

    * ``"insightface"``: the one box maximising ``area - 2 * d^2``, ``d`` the distance between the
      box centre and the image centre (``align_lfw.py``; ``image_hw`` is (height, width) in the
      boxes' pixel frame).
    * ``"first"``: the highest-scoring box (what the MegaFace scripts take).
    * ``"all"``: every box, highest score first.

    Ties go to the lower index. No boxes -> ``[]``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    if len(boxes) == 0:
        return []
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if policy == "all":
        return order
    if policy == "first":
        return order[:1]
    if policy == "insightface":
        h, w = float(image_hw[0]), float(image_hw[1])
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        dx = (boxes[:, 0] + boxes[:, 2]) / 2 - w / 2
        dy = (boxes[:, 1] + boxes[:, 3]) / 2 - h / 2
        value = area - 2.0 * (dx**2 + dy**2)
        return [int(np.argmax(value))]
    raise ValueError(f"face policy {policy!r}: expected 'insightface', 'first' or 'all'")

"""Synthetic face identities: reproducible, face-like 112x112 RGB images for tests, demos and benchmarks.

No face data set can be downloaded here, so the project draws its own. Each identity is a set of
latent traits (face outline, skin tone and texture, eyes, brows, nose, mouth, ears, hair style and
colour, beard, glasses, moles) drawn from a seeded random generator; each image of an identity adds
nuisance variation (in-plane rotation, scale, shift, slight yaw, background, directional light,
brightness, contrast, colour cast, expression, blur, sensor noise, occasional occlusion). Images are
already aligned roughly to the ArcFace 112x112 five-point template (:data:`ARCFACE_TEMPLATE`).

Reproducibility: the traits of identity ``i`` depend only on ``(seed, i)`` and the pixels of image
``k`` of identity ``i`` only on ``(seed, i, k, image_size, difficulty)``, never on how many
identities or images are generated, so train and held-out sets are disjoint identity ranges of one
seed. Everything is numpy ``Generator`` (PCG64) draws plus OpenCV drawing: identical pixels in
every process and run.

Typical use::

    faces = SyntheticFaces(num_identities=200, images_per_identity=20, seed=0)
    image = faces.render(3, 0)                          # (112, 112, 3) uint8 RGB
    paths = write_identity_folders("data/synth", faces)  # data/synth/<id_name>/<k>.jpg
    write_pairs_csv("data/synth/pairs.csv", paths, num_pairs=600)
"""
from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np

from .atomic import atomic_write_bytes, atomic_write_text

#: ArcFace 112x112 alignment template, (5, 2) float32 (x, y) pixels: left eye, right eye, nose tip,
#: left and right mouth corners (left = smaller x, i.e. the subject's right).
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)

_REF_SIZE = 112.0  # traits and poses are expressed in this canonical 112x112 frame
_MARGIN = 16.0  # canonical pixels drawn outside the frame so rotations never pull in a border
_SHIFT = 4  # OpenCV fixed-point bits for sub-pixel drawing
_FACE_CENTRE = (56.0, 64.0)  # rotation/scale centre of the pose transform, canonical pixels

# Stream tags keep the identity, image and pair random streams apart for the same numbers.
_TRAITS_STREAM = 1
_IMAGE_STREAM = 2
_PAIRS_STREAM = 3

_SKIN_TONES = np.array(
    [[255, 226, 200], [241, 196, 166], [226, 174, 136], [200, 140, 102], [164, 106, 74], [118, 76, 52], [84, 56, 42]],
    dtype=np.float64,
)
_HAIR_COLOURS = np.array(
    [[22, 18, 18], [52, 36, 28], [92, 62, 40], [140, 100, 62], [198, 160, 98], [228, 206, 156],
     [150, 66, 34], [150, 150, 150], [224, 224, 218]],
    dtype=np.float64,
)
# hair colour frequencies for the lightest and the darkest skin tone (interpolated in between)
_HAIR_WEIGHTS_LIGHT = np.array([0.16, 0.2, 0.16, 0.12, 0.13, 0.05, 0.08, 0.06, 0.04])
_HAIR_WEIGHTS_DARK = np.array([0.55, 0.28, 0.04, 0.0, 0.0, 0.0, 0.0, 0.09, 0.04])
_IRIS_WEIGHTS_LIGHT = np.array([0.15, 0.25, 0.15, 0.12, 0.2, 0.13])
_IRIS_WEIGHTS_DARK = np.array([0.6, 0.35, 0.05, 0.0, 0.0, 0.0])
_IRIS_COLOURS = np.array(
    [[58, 38, 24], [96, 60, 30], [124, 96, 52], [82, 112, 70], [70, 112, 164], [112, 126, 138]], dtype=np.float64
)
_HAIR_STYLES = ("bald", "short", "medium", "long", "bangs", "curly")


@dataclass(frozen=True)
class IdentityTraits:
    """Latent traits of one identity, in canonical 112x112 pixel units and RGB 0-255 colours."""

    face_half_width: float
    face_top: float  # y of the top of the skull
    chin_y: float
    jaw_taper: float  # 0 = round jaw, 0.5 = narrow pointed chin
    skin: tuple[float, float, float]
    texture: np.ndarray  # (6, 6) float32 low-frequency skin texture, multiplicative offsets
    eye_spacing: float  # half distance between eye centres
    eye_y: float
    eye_half_width: float
    eye_open: float  # eye height / eye width
    eye_tilt: float  # degrees, outer corner up when positive
    iris: tuple[float, float, float]
    iris_ratio: float
    brow_gap: float
    brow_thickness: float
    brow_arch: float
    brow_length: float
    brow_tilt: float
    nose_y: float
    nose_half_width: float
    nose_bridge: float  # darkness of the bridge shading, 0-1
    mouth_y: float
    mouth_half_width: float
    upper_lip: float
    lower_lip: float
    lips: tuple[float, float, float]
    ear_size: float
    hair_style: str
    hair: tuple[float, float, float]
    hairline_y: float
    hair_volume: float
    parting: float  # x offset of the parting, canonical pixels
    beard: float  # 0 none, else opacity of the beard
    moustache: bool
    glasses: int  # 0 none, 1 round, 2 rectangular
    glasses_colour: tuple[float, float, float]
    mole: tuple[float, float, float] | None  # (x, y, radius) or None
    freckles: np.ndarray  # (n, 2) canonical positions


@dataclass(frozen=True)
class ImageVariation:
    """Nuisance parameters of one image (pose, light, expression, camera)."""

    rotation_deg: float
    scale: float
    shift: tuple[float, float]
    yaw: float  # -1..1, positive turns the face towards the image's right
    background: np.ndarray  # (3, 3, 3) uint8 RGB colours, smoothly interpolated behind the head
    clothes: tuple[float, float, float]
    light_angle: float
    light_strength: float
    brightness: float
    contrast: float
    colour_cast: tuple[float, float, float]
    mouth_open: float
    smile: float
    blink: bool
    glasses_on: bool
    blur_sigma: float
    noise_sigma: float
    occlusion: int  # 0 none, 1 hand/object blob, 2 sunglasses, 3 scarf over the lower face
    occlusion_colour: tuple[float, float, float]
    occlusion_pos: tuple[float, float]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def _colour(c: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(round(min(255.0, max(0.0, v)))) for v in c)  # type: ignore[return-value]


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[float, float, float]:
    return tuple(float(x * (1 - t) + y * t) for x, y in zip(a, b))  # type: ignore[return-value]


def _scaled(c: Sequence[float], f: float) -> tuple[float, float, float]:
    return tuple(float(v * f) for v in c)  # type: ignore[return-value]


def draw_traits(seed: int, identity: int) -> IdentityTraits:
    """The traits of ``identity`` under ``seed``; independent of any other identity."""
    r = _rng(seed, _TRAITS_STREAM, identity)
    u = r.uniform
    skin_t = u(0, len(_SKIN_TONES) - 1)
    lo = int(skin_t)
    hi = min(lo + 1, len(_SKIN_TONES) - 1)
    skin = _SKIN_TONES[lo] * (1 - (skin_t - lo)) + _SKIN_TONES[hi] * (skin_t - lo)
    skin = np.clip(skin + r.normal(0, 7, 3), 0, 255)
    darkness = skin_t / (len(_SKIN_TONES) - 1)
    hair_p = _HAIR_WEIGHTS_LIGHT * (1 - darkness) + _HAIR_WEIGHTS_DARK * darkness
    iris_p = _IRIS_WEIGHTS_LIGHT * (1 - darkness) + _IRIS_WEIGHTS_DARK * darkness
    hair = _HAIR_COLOURS[r.choice(len(_HAIR_COLOURS), p=hair_p / hair_p.sum())] * u(0.8, 1.15)
    iris = _IRIS_COLOURS[r.choice(len(_IRIS_COLOURS), p=iris_p / iris_p.sum())] * u(0.8, 1.2)
    lips = np.array(_mix(skin, (170, 62, 72), u(0.35, 0.6))) * u(0.7, 0.92)
    style = _HAIR_STYLES[r.choice(len(_HAIR_STYLES), p=[0.08, 0.3, 0.2, 0.2, 0.12, 0.1])]
    mole = (u(30, 82), u(60, 100), u(0.9, 1.8)) if r.random() < 0.3 else None
    n_freckles = int(r.integers(8, 30)) if r.random() < 0.12 else 0
    freckles = np.stack([u(30, 82, n_freckles), u(56, 80, n_freckles)], axis=1).astype(np.float32)
    beard_draw = r.random()
    return IdentityTraits(
        face_half_width=u(34, 44),
        face_top=u(-4, 6),
        chin_y=u(104, 116),
        jaw_taper=u(0.1, 0.5),
        skin=tuple(float(v) for v in skin),  # type: ignore[arg-type]
        texture=r.normal(0, 0.05, (6, 6)).astype(np.float32),
        eye_spacing=u(15.5, 20.0),
        eye_y=u(49, 54.5),
        eye_half_width=u(4.8, 7.2),
        eye_open=u(0.32, 0.62),
        eye_tilt=u(-9, 9),
        iris=_colour(iris),
        iris_ratio=u(0.55, 0.8),
        brow_gap=u(6.5, 11.5),
        brow_thickness=u(1.4, 3.8),
        brow_arch=u(0.0, 4.0),
        brow_length=u(11, 19),
        brow_tilt=u(-10, 12),
        nose_y=u(68.5, 75.5),
        nose_half_width=u(4.5, 9.0),
        nose_bridge=u(0.2, 1.0),
        mouth_y=u(88.5, 96.5),
        mouth_half_width=u(10.5, 17.5),
        upper_lip=u(1.2, 3.6),
        lower_lip=u(1.8, 4.8),
        lips=_colour(lips),
        ear_size=u(8, 13),
        hair_style=style,
        hair=_colour(hair),
        hairline_y=u(14, 28),
        hair_volume=u(2, 10) if style != "curly" else u(10, 18),
        parting=u(-12, 12),
        beard=0.0 if beard_draw > 0.22 else (u(0.25, 0.45) if beard_draw < 0.08 else u(0.7, 0.95)),
        moustache=bool(r.random() < 0.15),
        glasses=int(r.choice(3, p=[0.78, 0.11, 0.11])),
        glasses_colour=_colour(r.choice([(20, 20, 20), (90, 60, 30), (160, 160, 170), (120, 20, 30)])),
        mole=mole,
        freckles=freckles,
    )


def draw_variation(seed: int, identity: int, index: int, difficulty: float = 1.0) -> ImageVariation:
    """The nuisance parameters of image ``index`` of ``identity``; ``difficulty`` scales their range.

    ``difficulty=0`` gives the same canonical image for every index (frontal, neutral, clean).
    """
    r = _rng(seed, _IMAGE_STREAM, identity, index)
    d = float(difficulty)
    u = r.uniform
    base = r.uniform(25, 230, 3)
    background = np.clip(base + r.normal(0, 25, (3, 3, 3)), 0, 255).astype(np.uint8)
    occlusion_roll = r.random()
    occlusion = 0
    if occlusion_roll < 0.1 * d:
        occlusion = 1 + int(r.integers(3))
    variation = ImageVariation(
        rotation_deg=float(np.clip(r.normal(0, 5.0), -12, 12)) * d,
        scale=float(math.exp(np.clip(r.normal(0, 0.05), -0.12, 0.12) * d)),
        shift=(float(np.clip(r.normal(0, 2.0), -5, 5)) * d, float(np.clip(r.normal(0, 2.0), -5, 5)) * d),
        yaw=u(-0.45, 0.45) * d,
        background=background,
        clothes=tuple(u(10, 240, 3)),  # type: ignore[arg-type]
        light_angle=u(0, 2 * math.pi),
        light_strength=u(0, 0.5) * d,
        brightness=float(math.exp(r.normal(0, 0.16) * d)),
        contrast=1.0 + u(-0.3, 0.15) * d,
        colour_cast=tuple(float(math.exp(v * d)) for v in r.normal(0, 0.06, 3)),  # type: ignore[arg-type]
        mouth_open=(u(0, 1) ** 2 if r.random() < 0.35 else 0.0) * min(d, 1.0),
        smile=u(-0.4, 1.0) * min(d, 1.0),
        blink=bool(r.random() < 0.05 * d),
        glasses_on=bool(r.random() >= 0.12 * min(d, 1.0)),
        blur_sigma=(u(0.2, 1.3) if r.random() < 0.5 else 0.0) * d,
        noise_sigma=u(1.0, 6.0) * d,
        occlusion=occlusion,
        occlusion_colour=tuple(u(10, 245, 3)),  # type: ignore[arg-type]
        occlusion_pos=(u(-1, 1), u(-1, 1)),
    )
    if d == 0:  # the canonical image: neutral face, plain grey background, no camera effects
        variation = ImageVariation(
            rotation_deg=0.0, scale=1.0, shift=(0.0, 0.0), yaw=0.0,
            background=np.full((3, 3, 3), 128, dtype=np.uint8),
            clothes=(70.0, 80.0, 110.0), light_angle=0.0, light_strength=0.0, brightness=1.0, contrast=1.0,
            colour_cast=(1.0, 1.0, 1.0), mouth_open=0.0, smile=0.3, blink=False, glasses_on=True,
            blur_sigma=0.0, noise_sigma=0.0, occlusion=0, occlusion_colour=(0.0, 0.0, 0.0), occlusion_pos=(0.0, 0.0),
        )
    return variation


class _Canvas:
    """A uint8 RGB drawing surface addressed in canonical 112x112 coordinates (sub-pixel, anti-aliased)."""

    def __init__(self, background: np.ndarray, margin: float, scale: float):
        self.image = background
        self.margin = margin
        self.k = scale * (1 << _SHIFT)

    def fixed(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) canonical float coordinates -> (N, 2) int32 fixed-point drawing coordinates."""
        return np.round((np.asarray(points, dtype=np.float64) + self.margin) * self.k).astype(np.int32)

    def length(self, value: float) -> int:
        return max(0, int(round(value * self.k)))

    def poly(self, points: np.ndarray, colour: Sequence[float], target: np.ndarray | None = None) -> None:
        img = self.image if target is None else target
        cv2.fillPoly(img, [self.fixed(points)], _colour(colour) if target is None else 255, cv2.LINE_AA, _SHIFT)

    def line(self, points: np.ndarray, colour: Sequence[float], thickness: float, closed: bool = False) -> None:
        t = max(1, int(round(thickness * self.k / (1 << _SHIFT))))
        cv2.polylines(self.image, [self.fixed(points)], closed, _colour(colour), t, cv2.LINE_AA, _SHIFT)

    def ellipse(self, centre: Sequence[float], axes: Sequence[float], angle: float, colour: Sequence[float],
                thickness: float = -1, target: np.ndarray | None = None) -> None:
        img = self.image if target is None else target
        c = tuple(int(v) for v in self.fixed(np.array([centre]))[0])
        ax = (self.length(axes[0]), self.length(axes[1]))
        t = -1 if thickness < 0 else max(1, int(round(thickness * self.k / (1 << _SHIFT))))
        cv2.ellipse(img, c, ax, float(angle), 0.0, 360.0, _colour(colour) if target is None else 255, t, cv2.LINE_AA,
                    _SHIFT)

    def mask(self) -> np.ndarray:
        return np.zeros(self.image.shape[:2], dtype=np.uint8)

    def blend(self, mask: np.ndarray, colour: Sequence[float] | np.ndarray, opacity: float = 1.0,
              gain: np.ndarray | None = None) -> None:
        """Paint ``colour`` (an RGB triple or an (H, W, 3) image, times the (H, W) float32 field ``gain``
        if given) through ``mask`` (uint8 0-255) at ``opacity``."""
        x, y, w, h = cv2.boundingRect(mask)
        if w == 0 or h == 0:
            return
        roi = (slice(y, y + h), slice(x, x + w))
        alpha = mask[roi].astype(np.float32)[..., None] * np.float32(opacity / 255.0)
        base = self.image[roi].astype(np.float32)
        layer = np.asarray(colour, dtype=np.float32)
        if layer.ndim == 3:  # a whole (H, W, 3) image
            layer = layer[roi]
        if gain is not None:
            layer = gain[roi][..., None] * layer
        self.image[roi] = np.clip(base + (layer - base) * alpha + 0.5, 0, 255).astype(np.uint8)


def _smooth_field(values: Callable[[np.ndarray, np.ndarray], np.ndarray], size: int, grid: int = 25,
                  texture: np.ndarray | None = None) -> np.ndarray:
    """A smooth (size, size) float32 field over the canvas: ``values(x, y)`` on a coarse grid of
    canonical coordinates (times ``1 + texture`` enlarged bicubically), then enlarged bilinearly."""
    c = (np.arange(grid, dtype=np.float32) + 0.5) / grid * (_REF_SIZE + 2 * _MARGIN) - _MARGIN
    xs, ys = np.meshgrid(c, c)
    field = values(xs, ys).astype(np.float32)
    if texture is not None:
        field *= 1.0 + cv2.resize(texture, (grid, grid), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, stop: float, n: int = 24) -> np.ndarray:
    t = np.linspace(math.radians(start), math.radians(stop), n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rotate(points: np.ndarray, centre: Sequence[float], degrees: float) -> np.ndarray:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    p = points - np.asarray(centre)
    return np.stack([p[:, 0] * c - p[:, 1] * s, p[:, 0] * s + p[:, 1] * c], axis=1) + np.asarray(centre)


class SyntheticFaces:
    """A reproducible synthetic identity set: ``num_identities`` identities x ``images_per_identity`` images.

    Identities are numbered globally: this set holds identities ``first_identity ...
    first_identity + num_identities - 1`` of ``seed``; a held-out set is another range of the same
    seed. ``faces[j]`` is ``(image, label)`` with ``image`` (H, W, 3) uint8 RGB and ``label`` the
    identity's position in this set (0-based), ``j = label * images_per_identity + index``.

    ``difficulty`` scales the per-image variation (pose, light, expression, blur, noise,
    occlusion); 1.0 is the calibrated default (see ``bench/synthetic.py``), 0.0 renders every image
    of an identity identically.
    """

    def __init__(self, num_identities: int, images_per_identity: int, image_size: tuple[int, int] = (112, 112),
                 seed: int = 0, difficulty: float = 1.0, first_identity: int = 0):
        if num_identities < 1 or images_per_identity < 1:
            raise ValueError(f"need at least one identity and one image per identity, got num_identities="
                             f"{num_identities}, images_per_identity={images_per_identity}")
        if len(image_size) != 2 or min(image_size) < 16:
            raise ValueError(f"image_size must be (height, width) with both >= 16, got {image_size!r}")
        if not 0.0 <= difficulty <= 3.0:
            raise ValueError(f"difficulty must be in [0, 3], got {difficulty!r}")
        if first_identity < 0 or seed < 0:
            raise ValueError(f"seed and first_identity must be >= 0, got seed={seed}, first_identity={first_identity}")
        self.num_identities = int(num_identities)
        self.images_per_identity = int(images_per_identity)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.seed = int(seed)
        self.difficulty = float(difficulty)
        self.first_identity = int(first_identity)

    def __repr__(self) -> str:
        return (f"SyntheticFaces(num_identities={self.num_identities}, images_per_identity="
                f"{self.images_per_identity}, image_size={self.image_size}, seed={self.seed}, "
                f"difficulty={self.difficulty}, first_identity={self.first_identity})")

    # --- indexing -------------------------------------------------------------------------------
    @property
    def identities(self) -> range:
        """Global identity numbers of this set."""
        return range(self.first_identity, self.first_identity + self.num_identities)

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def __getitem__(self, j: int) -> tuple[np.ndarray, int]:
        if not -len(self) <= j < len(self):
            raise IndexError(f"image {j} out of range for {len(self)} images")
        j %= len(self)
        label, index = divmod(j, self.images_per_identity)
        return self.render(self.first_identity + label, index), label

    def identity_name(self, identity: int) -> str:
        """Folder name of ``identity``: ``synth<seed>_<identity:06d>`` (sorts in identity order)."""
        return f"synth{self.seed}_{identity:06d}"

    # --- rendering ------------------------------------------------------------------------------
    def traits(self, identity: int) -> IdentityTraits:
        return draw_traits(self.seed, identity)

    def variation(self, identity: int, index: int) -> ImageVariation:
        return draw_variation(self.seed, identity, index, self.difficulty)

    def render(self, identity: int, index: int) -> np.ndarray:
        """Image ``index`` of ``identity``: (H, W, 3) uint8 RGB, H, W = ``image_size``."""
        return self.render_with_landmarks(identity, index)[0]

    def landmarks(self, identity: int, index: int) -> np.ndarray:
        """Where the 5 ArcFace points ended up in image ``index``: (5, 2) float32 (x, y) output pixels."""
        traits, var = self.traits(identity), self.variation(identity, index)
        return self._output_points(_landmarks(traits, var), var)

    def render_with_landmarks(self, identity: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image, landmarks)``: (H, W, 3) uint8 RGB and (5, 2) float32 output pixel coordinates."""
        if identity < 0 or index < 0:
            raise ValueError(f"identity and index must be >= 0, got identity={identity}, index={index}")
        traits, var = self.traits(identity), self.variation(identity, index)
        canvas = _draw_face(traits, var, self.image_size[0] / _REF_SIZE,
                            _rng(self.seed, _IMAGE_STREAM, identity, index if self.difficulty > 0 else 0, 1))
        image = self._camera(canvas, var, _rng(self.seed, _IMAGE_STREAM, identity, index, 2))
        return image, self._output_points(_landmarks(traits, var), var)

    def render_array(self, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Every image of the set: ``(images, labels)``, (N, H, W, 3) uint8 RGB and (N,) int64, in
        ``faces[j]`` order. ``workers > 1`` renders identity chunks in that many spawned processes."""
        h, w = self.image_size
        images = np.empty((len(self), h, w, 3), dtype=np.uint8)
        labels = np.repeat(np.arange(self.num_identities, dtype=np.int64), self.images_per_identity)
        chunks = np.array_split(np.asarray(self.identities), max(1, min(int(workers), self.num_identities)) * 4)
        chunks = [c for c in chunks if len(c)]
        if workers <= 1:
            parts: Iterable[np.ndarray] = (_render_identities(self, c) for c in chunks)
            pool = None
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the caller may hold torch/OpenMP threads that a forked child would inherit broken
            pool = ProcessPoolExecutor(int(workers), mp_context=multiprocessing.get_context("spawn"))
            parts = pool.map(_render_identities, [self] * len(chunks), chunks)
        try:
            start = 0
            for part in parts:
                images[start:start + len(part)] = part
                start += len(part)
        finally:
            if pool is not None:
                pool.shutdown()
        return images, labels

    def encode_jpeg(self, identity: int, index: int, quality: int = 95) -> bytes:
        """Image ``index`` of ``identity`` as JPEG bytes (OpenCV, baseline, 4:2:0 at ``quality``)."""
        bgr = cv2.cvtColor(self.render(identity, index), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        if not ok:  # pragma: no cover - OpenCV always encodes a uint8 image
            raise RuntimeError(f"JPEG encoding of identity {identity} image {index} failed")
        return buf.tobytes()

    def _pose_matrix(self, var: ImageVariation) -> np.ndarray:
        """2x3 affine map from canonical 112x112 coordinates to output pixel coordinates."""
        cx, cy = _FACE_CENTRE
        a = math.radians(var.rotation_deg)
        squeeze = 1.0 - 0.12 * abs(var.yaw)  # a turned head looks narrower
        sx, sy = var.scale * squeeze, var.scale
        rot = np.array([[math.cos(a) * sx, -math.sin(a) * sy], [math.sin(a) * sx, math.cos(a) * sy]])
        offset = np.array([cx + var.shift[0], cy + var.shift[1]]) - rot @ np.array([cx, cy])
        pose = np.hstack([rot, offset[:, None]])
        h, w = self.image_size
        k = h / _REF_SIZE  # output pixels per canonical pixel; a narrower crop keeps the face centred
        crop_x = (_REF_SIZE - w / k) / 2.0
        out = np.array([[k, 0.0, -crop_x * k], [0.0, k, 0.0]])
        return np.hstack([out[:, :2] @ pose[:, :2], out[:, :2] @ pose[:, 2:] + out[:, 2:]])

    def _output_points(self, points: np.ndarray, var: ImageVariation) -> np.ndarray:
        m = self._pose_matrix(var)
        return (points @ m[:, :2].T + m[:, 2]).astype(np.float32)

    def _camera(self, canvas: np.ndarray, var: ImageVariation, r: np.random.Generator) -> np.ndarray:
        """Pose warp, light, blur and noise: drawing canvas -> (H, W, 3) uint8 output image."""
        h, w = self.image_size
        m = self._pose_matrix(var)
        # canvas pixel = (canonical + margin) * k, with k = output pixels per canonical pixel
        k = h / _REF_SIZE
        to_canonical = np.array([[1 / k, 0, -_MARGIN], [0, 1 / k, -_MARGIN], [0, 0, 1]])
        warp = (np.vstack([m, [0, 0, 1]]) @ to_canonical)[:2]
        image = cv2.warpAffine(canvas, warp, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
        image = image.astype(np.float32)
        if var.light_strength > 0:
            ca, sa = math.cos(var.light_angle), math.sin(var.light_angle)
            light = cv2.resize(1.0 + var.light_strength * (np.array([[-ca - sa, ca - sa], [sa - ca, ca + sa]],
                                                                     dtype=np.float32) / math.sqrt(2)),
                               (w, h), interpolation=cv2.INTER_LINEAR)
            image *= light[..., None]
        mean = float(image.mean())
        gain = var.brightness * np.asarray(var.colour_cast, dtype=np.float32)
        colour = np.hstack([np.diag(gain * var.contrast), (gain * (mean * (1.0 - var.contrast)))[:, None]])
        image = cv2.transform(image, colour.astype(np.float32))
        if var.blur_sigma > 0.05:
            image = cv2.GaussianBlur(image, (0, 0), var.blur_sigma * h / _REF_SIZE)
        if var.noise_sigma > 0:  # zero-mean triangular noise (sum of two uniforms) of std noise_sigma
            u = r.random((2, h, w, 3), dtype=np.float32)
            image += (u[0] + u[1] - 1.0) * np.float32(var.noise_sigma * math.sqrt(6.0))
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _render_identities(faces: SyntheticFaces, identities: Sequence[int]) -> np.ndarray:
    """All images of ``identities``: (len(identities) * images_per_identity, H, W, 3) uint8."""
    return np.stack([faces.render(int(i), k) for i in identities for k in range(faces.images_per_identity)])


def _landmarks(t: IdentityTraits, v: ImageVariation) -> np.ndarray:
    """The 5 points in canonical coordinates before the pose transform, (5, 2) float64."""
    cx = 56.0
    yaw_eye, yaw_nose, yaw_mouth = 3.0 * v.yaw, 7.0 * v.yaw, 3.5 * v.yaw
    smile_lift = 2.2 * v.smile
    return np.array([
        [cx - t.eye_spacing + yaw_eye, t.eye_y],
        [cx + t.eye_spacing + yaw_eye, t.eye_y],
        [cx + yaw_nose, t.nose_y],
        [cx - t.mouth_half_width + yaw_mouth, t.mouth_y - smile_lift],
        [cx + t.mouth_half_width + yaw_mouth, t.mouth_y - smile_lift],
    ])


def _face_outline(t: IdentityTraits, yaw: float, n: int = 64) -> np.ndarray:
    """Closed face outline (skull top to chin), (n, 2) canonical coordinates."""
    cx = 56.0 + 1.5 * yaw
    cy = 58.0
    top = cy - t.face_top
    bottom = t.chin_y - cy
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    s, c = np.sin(a), np.cos(a)
    ry = np.where(s > 0, bottom, top)
    taper = np.where(s > 0, 1.0 - t.jaw_taper * s ** 3, 1.0)
    # a slightly squarer superellipse than an ellipse
    sx = np.sign(c) * np.abs(c) ** 0.85
    sy = np.sign(s) * np.abs(s) ** 0.95
    return np.stack([cx + t.face_half_width * taper * sx, cy + ry * sy], axis=1)


def _draw_face(t: IdentityTraits, v: ImageVariation, scale: float, r: np.random.Generator) -> np.ndarray:
    """Draw the face with its expression and yaw; (S, S, 3) uint8 RGB covering canonical
    [-margin, 112 + margin) at ``scale`` pixels per canonical pixel."""
    size = int(round((_REF_SIZE + 2 * _MARGIN) * scale))
    background = cv2.resize(v.background, (size, size), interpolation=cv2.INTER_LINEAR)
    cv = _Canvas(background, _MARGIN, scale)
    yaw = v.yaw
    cx = 56.0
    skin = t.skin
    dark_skin = _scaled(skin, 0.72)
    outline = _face_outline(t, yaw)
    face_w = t.face_half_width

    # clothes and neck
    cv.ellipse((cx, 150), (70, 36), 0, v.clothes)
    # hair behind the head
    if t.hair_style in ("medium", "long", "curly"):
        length = {"medium": 96.0, "long": 132.0, "curly": 100.0}[t.hair_style]
        vol = t.hair_volume
        back = np.concatenate([
            _arc(cx + yaw, 58.0, face_w + vol, 58.0 - t.face_top + vol, 180, 360),
            [[cx + face_w + vol * 1.2, length], [cx - face_w - vol * 1.2, length]],
        ])
        cv.poly(back, t.hair)
    skin_mask = cv.mask()
    neck_w = face_w * 0.55
    cv.poly(np.array([[cx - neck_w, 90], [cx + neck_w, 90], [cx + neck_w * 1.1, 140], [cx - neck_w * 1.1, 140]]),
            skin, skin_mask)
    ear_y = t.eye_y + 8
    for side in (-1, 1):
        ex = cx + side * (face_w - 1.5) + 2.0 * yaw
        cv.ellipse((ex, ear_y), (t.ear_size * 0.45, t.ear_size), side * 8, skin, target=skin_mask)
    cv.poly(outline, skin, skin_mask)
    # skin: colour x low-frequency texture x rounded shading, composited through the mask
    shade = _smooth_field(lambda x, y: 1.0 - 0.22 * np.clip(
        ((x - cx - 1.5 * yaw) / (face_w + 4)) ** 2 + ((y - 66) / (t.chin_y - 20)) ** 2, 0, 1.6) ** 2,
        cv.image.shape[0], texture=t.texture)
    cv.blend(skin_mask, skin, gain=shade)
    # neck shadow under the chin
    shadow = cv.mask()
    cv.ellipse((cx, t.chin_y + 2), (face_w * 0.55, 6), 0, (0, 0, 0), target=shadow)
    shadow &= ~_mask_of(cv, outline)
    cv.blend(shadow, dark_skin, 0.6)

    for fx, fy in t.freckles:
        cv.ellipse((fx + 2 * yaw, fy), (0.7, 0.7), 0, _scaled(skin, 0.75))
    if t.mole is not None:
        mx, my, mr = t.mole
        cv.ellipse((mx + 2.5 * yaw, my), (mr, mr), 0, _scaled(skin, 0.35))

    # beard first: mouth and nose are drawn over it
    if t.beard > 0:
        ear_y = t.eye_y + 8
        ys = outline[:, 1]
        jaw = outline[ys > ear_y]
        jaw = jaw[np.argsort(np.arctan2(jaw[:, 1] - 58.0, jaw[:, 0] - cx))]  # right side to left, via chin
        fw, mhw, my, ny = face_w, t.mouth_half_width, t.mouth_y, t.nose_y
        top = np.array([[-fw + 1, ear_y], [-fw * 0.8, ny + 1], [-mhw - 3, my - 5], [-4, ny + 5], [4, ny + 5],
                        [mhw + 3, my - 5], [fw * 0.8, ny + 1], [fw - 1, ear_y]]) + [cx + 2 * yaw, 0]
        m = cv.mask()
        cv.poly(np.concatenate([top, jaw]), (0, 0, 0), m)
        stubble = t.beard < 0.5
        cv.blend(m, _mix(t.hair, skin, 0.4) if stubble else t.hair, t.beard)

    # eyes
    lm = _landmarks(t, v)
    eye_hw = t.eye_half_width * (1.0 - 0.12 * abs(yaw))
    for side, (ex, ey) in zip((-1, 1), lm[:2]):
        tilt = -side * t.eye_tilt
        open_ = 0.08 if v.blink else t.eye_open
        upper = _arc(ex, ey + 0.4, eye_hw, eye_hw * open_ * 1.15, 180, 360, 16)
        lower = _arc(ex, ey + 0.4, eye_hw, eye_hw * open_ * 0.75, 0, 180, 16)
        almond = _rotate(np.concatenate([upper, lower]), (ex, ey), tilt)
        m = cv.mask()
        cv.poly(almond, (0, 0, 0), m)
        eye = cv.image.copy()
        look = 1.2 * yaw
        cv2.fillPoly(eye, [cv.fixed(almond)], _colour((236, 232, 226)), cv2.LINE_AA, _SHIFT)
        iris_r = eye_hw * t.iris_ratio * 0.62
        saved, cv.image = cv.image, eye
        cv.ellipse((ex + look, ey), (iris_r, iris_r), 0, t.iris)
        cv.ellipse((ex + look, ey), (iris_r * 0.45, iris_r * 0.45), 0, (12, 10, 10))
        cv.ellipse((ex + look + iris_r * 0.35, ey - iris_r * 0.35), (0.6, 0.6), 0, (250, 250, 250))
        cv.image = saved
        cv.blend(m, eye)
        cv.line(_rotate(upper, (ex, ey), tilt), (30, 22, 20), 1.0)
        crease = _rotate(_arc(ex, ey - 0.8, eye_hw * 1.05, eye_hw * open_ * 1.6, 200, 340, 10), (ex, ey), tilt)
        cv.line(crease, _scaled(skin, 0.78), 0.7)
        # brow
        bl = t.brow_length
        bx = ex + side * 1.5
        by = ey - t.brow_gap
        xs_b = np.linspace(-bl / 2, bl / 2, 9)
        brow = np.stack([bx + xs_b, by - t.brow_arch * (1 - (2 * xs_b / bl) ** 2)], axis=1)
        brow = _rotate(brow, (bx, by), -side * t.brow_tilt * (1.0 - 0.3 * v.smile))
        cv.line(brow, _mix(t.hair, (25, 20, 18), 0.35), t.brow_thickness)

    # glasses
    if t.glasses and v.glasses_on:
        for ex, ey in lm[:2]:
            if t.glasses == 1:
                cv.ellipse((ex, ey + 0.5), (9.5, 8.0), 0, t.glasses_colour, 1.1)
            else:
                box = np.array([[ex - 10, ey - 6.5], [ex + 10, ey - 6.5], [ex + 9, ey + 7], [ex - 9, ey + 7]])
                cv.line(box, t.glasses_colour, 1.1, closed=True)
        cv.line(np.array([[lm[0, 0] + 9.5, lm[0, 1] - 1], [lm[1, 0] - 9.5, lm[1, 1] - 1]]), t.glasses_colour, 1.1)
        for side, (ex, ey) in zip((-1, 1), lm[:2]):
            cv.line(np.array([[ex + side * 9.8, ey - 1], [cx + side * (face_w + 1), ey]]), t.glasses_colour, 1.0)

    # nose
    nx, ny = lm[2]
    nw = t.nose_half_width * (1.0 - 0.1 * abs(yaw))
    bridge_x = cx + 3 * yaw + (-1 if yaw >= 0 else 1) * 3.5
    bridge = np.array([[bridge_x, t.eye_y - 2], [bridge_x + 0.6 * (nx - bridge_x), ny - 8], [nx - 0.5 * nw, ny - 2]])
    cv.line(bridge, _scaled(skin, 1.0 - 0.18 * t.nose_bridge), 1.4)
    shadow = cv.mask()
    cv.ellipse((nx, ny + 2.2), (nw * 0.95, 2.6), 0, (0, 0, 0), target=shadow)
    side_x = nx - (3.0 if yaw >= 0 else -3.0)
    cv.ellipse((side_x, ny - 7), (2.2, 8), 0, (0, 0, 0), target=shadow)
    cv.blend(shadow, dark_skin, 0.45)
    cv.ellipse((nx, ny - 1.5), (nw * 0.55, 3.2), 0, _scaled(skin, 1.08))
    for side in (-1, 1):
        cv.ellipse((nx + side * nw * 0.45, ny + 0.6), (nw * 0.24, 1.2), side * 15, _scaled(skin, 0.32))
        ala = _arc(nx + side * nw * 0.72, ny - 0.5, nw * 0.35, 3.0, 90 - side * 90 - 60, 90 - side * 90 + 60, 8)
        cv.line(ala, _scaled(skin, 0.7), 0.8)

    # mouth
    ml, mr = lm[3], lm[4]
    mcx = (ml[0] + mr[0]) / 2
    base_y = t.mouth_y
    opening = 5.0 * v.mouth_open
    xs_m = np.linspace(ml[0], mr[0], 17)
    rel = (xs_m - mcx) / (mr[0] - mcx)
    corner_y = ml[1]
    mid_y = base_y + 0.6 * v.smile
    seam_top = corner_y + (mid_y - corner_y) * (1 - rel ** 2) - opening * 0.35 * (1 - rel ** 2)
    seam_bottom = corner_y + (mid_y - corner_y) * (1 - rel ** 2) + opening * (1 - rel ** 2)
    bow = 0.8 * np.exp(-((np.abs(rel) - 0.25) / 0.18) ** 2)
    upper_edge = seam_top - t.upper_lip * (1 - 0.7 * rel ** 2) - bow
    lower_edge = seam_bottom + t.lower_lip * (1 - 0.8 * rel ** 4)
    if opening > 0.5:
        inner = np.concatenate([np.stack([xs_m, seam_top], 1), np.stack([xs_m, seam_bottom], 1)[::-1]])
        cv.poly(inner, (45, 18, 22))
        teeth = np.concatenate([np.stack([xs_m, seam_top], 1),
                                np.stack([xs_m, seam_top + min(2.0, opening * 0.4) * (1 - rel ** 2)], 1)[::-1]])
        cv.poly(teeth, (232, 226, 214))
    upper_lip = np.concatenate([np.stack([xs_m, upper_edge], 1), np.stack([xs_m, seam_top], 1)[::-1]])
    lower_lip = np.concatenate([np.stack([xs_m, seam_bottom], 1), np.stack([xs_m, lower_edge], 1)[::-1]])
    cv.poly(upper_lip, _scaled(t.lips, 0.92))
    cv.poly(lower_lip, t.lips)
    cv.line(np.stack([xs_m, (seam_top + seam_bottom) / 2 if opening <= 0.5 else seam_top], 1), _scaled(t.lips, 0.55), 0.8)
    if t.moustache:
        tache = np.concatenate([np.stack([xs_m, upper_edge - 0.5], 1),
                                np.stack([xs_m * 1.0, upper_edge - 4.5 + 1.5 * rel ** 2], 1)[::-1]])
        cv.poly(tache, _mix(t.hair, (20, 16, 14), 0.2))

    # hair on top of the head
    _draw_hair(cv, t, outline, yaw, r)
    _draw_occlusion(cv, t, v, lm)
    return cv.image


def _mask_of(cv: _Canvas, polygon: np.ndarray) -> np.ndarray:
    m = cv.mask()
    cv.poly(polygon, (0, 0, 0), m)
    return m


def _draw_hair(cv: _Canvas, t: IdentityTraits, outline: np.ndarray, yaw: float, r: np.random.Generator) -> None:
    """Hair over the skull: a cap above the hairline with strands (or curls), or side tufts when bald."""
    cx = 56.0 + 1.5 * yaw
    fw = t.face_half_width
    vol = t.hair_volume
    if t.hair_style == "bald":  # a fringe of hair above the ears
        for side in (-1, 1):
            pts = outline[(outline[:, 1] > 34) & (outline[:, 1] < t.eye_y + 4) & ((outline[:, 0] - cx) * side > 0)]
            pts = pts[np.argsort(pts[:, 1])]
            inner = pts - [side * 2.5, 0.0]
            cv.poly(np.concatenate([pts + [side * 1.5, 0.0], inner[::-1]]), t.hair)
        return
    # hairline: a curve across the forehead, dipping at the parting; bangs come down lower and jagged
    xs = np.linspace(cx - fw - vol, cx + fw + vol, 25)
    rel = (xs - cx) / (fw + vol)
    hairline = t.hairline_y + 18 * rel ** 4 + 3.0 * np.exp(-((xs - cx - t.parting) / 6.0) ** 2)
    if t.hair_style == "bangs":
        hairline = t.hairline_y + 14 + 6 * rel ** 2 + 2.0 * (np.arange(25) % 2)
    hairline = np.minimum(hairline, 60.0)
    crown = _arc(cx, 58.0, fw + vol, 58.0 - t.face_top + vol, 0, -180, 25)
    cap = np.concatenate([np.stack([xs, hairline], 1), crown])
    mask = cv.mask()
    cv.poly(cap, (0, 0, 0), mask)
    # strands (or curls) drawn on a copy and shown only inside the cap
    saved, cv.image = cv.image, cv.image.copy()
    cv.poly(cap, t.hair)
    dark, light = _scaled(t.hair, 0.7), _mix(t.hair, (255, 255, 255), 0.15)
    curly = t.hair_style == "curly"
    for i in range(40 if curly else 16):
        x0 = cx + r.uniform(-fw - vol, fw + vol)
        y0 = r.uniform(t.face_top - vol, t.hairline_y + 4)
        if curly:
            cv.ellipse((x0, y0), (r.uniform(1.5, 3), r.uniform(1.5, 3)), 0, dark if i % 2 else light, 0.6)
        else:
            dx = (x0 - cx - t.parting) * 0.25
            cv.line(np.array([[x0, y0], [x0 + dx, y0 + r.uniform(6, 12)]]), dark if i % 2 else light, 0.6)
    hair_layer, cv.image = cv.image, saved
    cv.blend(mask, hair_layer)


def _draw_occlusion(cv: _Canvas, t: IdentityTraits, v: ImageVariation, lm: np.ndarray) -> None:
    if v.occlusion == 0:
        return
    ox, oy = v.occlusion_pos
    if v.occlusion == 1:  # a hand or object in front of part of the face
        centre = (56 + 30 * ox, 80 + 18 * oy)
        cv.ellipse(centre, (15, 11), 30 * ox, v.occlusion_colour)
    elif v.occlusion == 2:  # sunglasses
        for ex, ey in lm[:2]:
            cv.ellipse((ex, ey + 0.5), (10, 7.5), 0, (18, 18, 22))
        cv.line(lm[:2] - [[-8, 1], [8, 1]], (18, 18, 22), 1.4)
    else:  # scarf or mask over the lower face
        y = t.nose_y + 4 + 4 * oy
        cv.poly(np.array([[0, y], [112, y - 3 * ox], [112, 130], [0, 130]]), v.occlusion_colour)


# --- files ---------------------------------------------------------------------------------------------
def write_identity_folders(out_dir: str | os.PathLike, faces: SyntheticFaces, identities: Iterable[int] | None = None,
                           images_per_identity: int | None = None, jpeg_quality: int = 95) -> list[Path]:
    """Write ``out_dir/<identity_name>/<k>.jpg`` for each identity (default: all of ``faces``).

    Each JPEG is written atomically. Returns the written paths in (identity, k) order. The folder
    layout is what the detect/align and ``.lst`` stages take as raw input (one folder per identity).
    """
    out = Path(out_dir)
    ids = list(faces.identities if identities is None else identities)
    n = faces.images_per_identity if images_per_identity is None else int(images_per_identity)
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    paths = []
    for identity in ids:
        folder = out / faces.identity_name(identity)
        for k in range(n):
            path = folder / f"{k}.jpg"
            atomic_write_bytes(path, faces.encode_jpeg(identity, k, jpeg_quality))
            paths.append(path)
    return paths


def iter_jpeg_bytes(faces: SyntheticFaces, quality: int = 95) -> Iterator[tuple[int, bytes]]:
    """``(label, jpeg_bytes)`` for every image of ``faces`` in order (label = position of the identity)."""
    for label, identity in enumerate(faces.identities):
        for k in range(faces.images_per_identity):
            yield label, faces.encode_jpeg(identity, k, quality)


def _group_by_folder(image_paths: Iterable[str | os.PathLike] | Mapping[str, Sequence[str | os.PathLike]]
                     ) -> dict[str, list[str]]:
    if isinstance(image_paths, Mapping):
        return {str(k): [os.fspath(p) for p in v] for k, v in image_paths.items()}
    groups: dict[str, list[str]] = defaultdict(list)
    for p in image_paths:
        groups[Path(p).parent.name].append(os.fspath(p))
    return dict(groups)


def make_pairs(image_paths: Iterable[str | os.PathLike] | Mapping[str, Sequence[str | os.PathLike]],
               num_pairs: int = 600, folds: int = 10, seed: int = 0) -> list[tuple[str, str, bool]]:
    """A balanced verification pair list ``[(path_a, path_b, same), ...]``, LFW style.

    ``image_paths`` is a mapping identity -> image paths, or paths grouped by their parent folder.
    The list is ``folds`` contiguous blocks of ``num_pairs / folds`` pairs, each half "same" pairs
    then half "different" pairs, so contiguous k-fold splits (the verification protocol) see equal
    counts; with at least ``2 * folds`` identities each block uses its own identities. No pair repeats.
    """
    groups = _group_by_folder(image_paths)
    if num_pairs <= 0 or num_pairs % (2 * folds):
        raise ValueError(f"num_pairs must be a positive multiple of 2 * folds = {2 * folds}, got {num_pairs}")
    names = sorted(groups)
    if len(names) < 2:
        raise ValueError(f"need images of at least 2 identities for different pairs, got {len(names)}: {names}")
    r = _rng(seed, _PAIRS_STREAM)
    order = [names[i] for i in r.permutation(len(names))]
    shared = len(order) < 2 * folds  # too few identities to give each fold its own
    blocks = [order] * folds if shared else [order[f::folds] for f in range(folds)]
    half = num_pairs // folds // 2
    pairs: list[tuple[str, str, bool]] = []
    seen: set[tuple[str, str]] = set()

    def fresh(a: str, b: str) -> bool:
        key = (a, b) if a < b else (b, a)
        if a == b or key in seen:
            return False
        seen.add(key)
        return True

    for block in blocks:
        multi = [n for n in block if len(groups[n]) >= 2]
        if not multi:
            raise ValueError(f"identities {block[:5]}... have fewer than 2 images each; no same pairs possible")
        capacity = sum(len(groups[n]) * (len(groups[n]) - 1) // 2 for n in multi)
        if capacity < half * (folds if shared else 1):
            raise ValueError(f"only {capacity} distinct same pairs available, need {half} per fold")
        for same in (True, False):
            made = attempts = 0
            while made < half:
                attempts += 1
                if attempts > 1000 * half:
                    raise ValueError(f"could not draw {half} distinct {'same' if same else 'different'} pairs "
                                     f"per fold from {len(block)} identities; use fewer pairs")
                if same:
                    name = multi[r.integers(len(multi))]
                    i, j = r.choice(len(groups[name]), 2, replace=False)
                    a, b = groups[name][i], groups[name][j]
                else:
                    if len(block) < 2:
                        raise ValueError("need 2 identities per fold for different pairs")
                    n1, n2 = r.choice(len(block), 2, replace=False)
                    a = groups[block[n1]][r.integers(len(groups[block[n1]]))]
                    b = groups[block[n2]][r.integers(len(groups[block[n2]]))]
                if fresh(a, b):
                    pairs.append((a, b, same))
                    made += 1
    return pairs


def write_pairs_csv(path: str | os.PathLike,
                    image_paths: Iterable[str | os.PathLike] | Mapping[str, Sequence[str | os.PathLike]],
                    num_pairs: int = 600, folds: int = 10, seed: int = 0,
                    relative_to: str | os.PathLike | None = None) -> Path:
    """Write :func:`make_pairs` as CSV ``path_a,path_b,same`` (header line, ``same`` is 1 or 0).

    Paths are written relative to ``relative_to`` when given (POSIX separators), else as given.
    The write is atomic. Returns ``path``.
    """
    pairs = make_pairs(image_paths, num_pairs=num_pairs, folds=folds, seed=seed)

    def fmt(p: str) -> str:
        return Path(os.path.relpath(p, relative_to)).as_posix() if relative_to is not None else p

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path_a", "path_b", "same"])
    for a, b, same in pairs:
        writer.writerow([fmt(a), fmt(b), int(same)])
    atomic_write_text(path, buf.getvalue())
    return Path(path)

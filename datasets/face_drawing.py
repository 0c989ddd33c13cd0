"""Drawing of synthetic faces: identity traits, per-image variation, and the painter.

A face is drawn with OpenCV primitives (anti-aliased, sub-pixel) in a canonical 112x112 frame
that matches the ArcFace alignment template, on a canvas with a margin of :data:`CANVAS_MARGIN`
canonical pixels on every side so that a later pose warp never pulls in an empty border.
:class:`IdentityTraits` says what a person looks like, :class:`ImageVariation` what one photo of
them adds (pose, light, expression, camera); both are drawn from a numpy ``Generator`` that the
caller seeds (see :mod:`datasets.synthetic`, which also applies the pose warp and camera effects).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np

CANONICAL_SIZE = 112.0  #: traits and landmarks are in this canonical 112x112 pixel frame
CANVAS_MARGIN = 16.0  #: canonical pixels painted outside the frame on every side
_SHIFT = 4  # OpenCV fixed-point bits for sub-pixel drawing
_HEAD_CENTRE_Y = 58.0  # canonical y of the centre of the face ellipse

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
    clutter: np.ndarray  # (n, 8) background objects: x, y, half width, half height, angle, R, G, B
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
    occlusion: int  # 0 none, 1 hand/object blob, 2 sunglasses, 3 hat over the forehead, 4 scarf over the chin
    occlusion_colour: tuple[float, float, float]
    occlusion_pos: tuple[float, float]


def _colour(c: Sequence[float]) -> tuple[int, int, int]:
    """An RGB triple as the int tuple OpenCV draws with, rounded and clipped to 0-255."""
    r, g, b = c
    return (int(min(255.0, max(0.0, float(r))) + 0.5), int(min(255.0, max(0.0, float(g))) + 0.5),
            int(min(255.0, max(0.0, float(b))) + 0.5))


def _mix(a: Sequence[float], b: Sequence[float], t: float) -> tuple[float, float, float]:
    return tuple(float(x * (1 - t) + y * t) for x, y in zip(a, b))  # type: ignore[return-value]


def _scaled(c: Sequence[float], f: float) -> tuple[float, float, float]:
    return tuple(float(v * f) for v in c)  # type: ignore[return-value]


def draw_traits(r: np.random.Generator) -> IdentityTraits:
    """Draw one identity's traits from ``r`` (skin, hair and eye colours are correlated as in people)."""
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
    hair = hair * (1.0 + r.normal(0, 0.07, 3))  # a little hue jitter, relative so black stays black
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
        texture=r.normal(0, 0.07, (6, 6)).astype(np.float32),
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


def draw_variation(r: np.random.Generator, difficulty: float = 1.0) -> ImageVariation:
    """Draw one image's nuisance parameters from ``r``; ``difficulty`` scales their range.

    ``difficulty=0`` gives the canonical image: frontal, neutral, plain grey background, clean.
    """
    d = float(difficulty)
    u = r.uniform
    # every draw is made whatever the difficulty, so a lower difficulty is a milder version of the same image
    background = np.clip(u(25, 230, 3) + r.normal(0, 25, (3, 3, 3)), 0, 255).astype(np.uint8)
    clutter = np.column_stack([u(-16, 128, 4), u(-16, 128, 4), u(4, 30, 4), u(4, 30, 4), u(0, 180, 4),
                               u(10, 245, (4, 3))])[: int(r.integers(0, 5))]
    # occluder kinds: hand/object blob, sunglasses, hat, scarf (hats hide the hair, so they are rarer)
    occluded, occlusion_kind = r.random() < 0.03 * d, 1 + int(r.choice(4, p=[0.35, 0.3, 0.1, 0.25]))
    mouth_opens, mouth_open = r.random() < 0.35, u(0, 1) ** 2
    blurred, blur = r.random() < 0.4, u(0.15, 0.75)
    variation = ImageVariation(
        rotation_deg=float(np.clip(r.normal(0, 2.8), -10, 10)) * d,
        scale=float(math.exp(np.clip(r.normal(0, 0.04), -0.1, 0.1) * d)),
        shift=(float(np.clip(r.normal(0, 1.2), -4, 4)) * d, float(np.clip(r.normal(0, 1.2), -4, 4)) * d),
        yaw=u(-0.25, 0.25) * d,
        background=background,
        clutter=clutter,
        clothes=tuple(u(10, 240, 3)),  # type: ignore[arg-type]
        light_angle=u(0, 2 * math.pi),
        light_strength=u(0, 0.32) * d,
        brightness=float(math.exp(np.clip(r.normal(0, 0.065), -0.2, 0.16) * d)),
        contrast=1.0 + u(-0.12, 0.08) * d,
        colour_cast=tuple(float(math.exp(v * d)) for v in r.normal(0, 0.025, 3)),  # type: ignore[arg-type]
        mouth_open=mouth_open * mouth_opens * min(d, 1.0),
        smile=u(-0.4, 1.0) * min(d, 1.0),
        blink=bool(r.random() < 0.04 * d),
        glasses_on=bool(r.random() >= 0.08 * min(d, 1.0)),
        blur_sigma=blur * blurred * d,
        noise_sigma=u(1.0, 6.0) * d,
        occlusion=occlusion_kind if occluded else 0,
        occlusion_colour=tuple(u(10, 245, 3)),  # type: ignore[arg-type]
        occlusion_pos=(u(-1, 1), u(-1, 1)),
    )
    if d == 0:  # the canonical image: neutral face, plain grey background, no camera effects
        variation = ImageVariation(
            rotation_deg=0.0, scale=1.0, shift=(0.0, 0.0), yaw=0.0,
            background=np.full((3, 3, 3), 128, dtype=np.uint8), clutter=np.zeros((0, 8)),
            clothes=(70.0, 80.0, 110.0), light_angle=0.0, light_strength=0.0, brightness=1.0, contrast=1.0,
            colour_cast=(1.0, 1.0, 1.0), mouth_open=0.0, smile=0.3, blink=False, glasses_on=True,
            blur_sigma=0.0, noise_sigma=0.0, occlusion=0, occlusion_colour=(0.0, 0.0, 0.0), occlusion_pos=(0.0, 0.0),
        )
    return variation


class _Canvas:
    """A uint8 RGB drawing surface addressed in canonical 112x112 coordinates (sub-pixel, anti-aliased).

    Shapes take canonical float coordinates and lengths. With ``target`` (an (H, W) uint8 mask of
    the canvas size) a shape is filled with 255 there and ``colour`` is ignored.
    """

    def __init__(self, background: np.ndarray, margin: float, scale: float):
        self.image = background
        self.margin = margin
        self.k = scale * (1 << _SHIFT)

    def fixed(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) canonical float coordinates -> (N, 2) int32 fixed-point drawing coordinates."""
        return np.round((np.asarray(points, dtype=np.float64) + self.margin) * self.k).astype(np.int32)

    def length(self, value: float) -> int:
        """A canonical length in fixed-point drawing units."""
        return max(0, int(round(value * self.k)))

    def _pixels(self, thickness: float) -> int:
        return max(1, int(round(thickness * self.k / (1 << _SHIFT))))

    def poly(self, points: np.ndarray, colour: Sequence[float], target: np.ndarray | None = None) -> None:
        img = self.image if target is None else target
        cv2.fillPoly(img, [self.fixed(points)], _colour(colour) if target is None else 255, cv2.LINE_AA, _SHIFT)

    def line(self, points: np.ndarray, colour: Sequence[float], thickness: float, closed: bool = False) -> None:
        cv2.polylines(self.image, [self.fixed(points)], closed, _colour(colour), self._pixels(thickness),
                      cv2.LINE_AA, _SHIFT)

    def ellipse(self, centre: Sequence[float], axes: Sequence[float], angle: float, colour: Sequence[float],
                thickness: float = -1, target: np.ndarray | None = None) -> None:
        img = self.image if target is None else target
        c = (round((float(centre[0]) + self.margin) * self.k), round((float(centre[1]) + self.margin) * self.k))
        ax = (self.length(axes[0]), self.length(axes[1]))
        t = -1 if thickness < 0 else self._pixels(thickness)  # -1: filled
        cv2.ellipse(img, c, ax, float(angle), 0.0, 360.0, _colour(colour) if target is None else 255, t, cv2.LINE_AA,
                    _SHIFT)

    def mask(self, polygon: np.ndarray | None = None) -> np.ndarray:
        """An empty (H, W) uint8 mask, or one with ``polygon`` filled (anti-aliased, 255 inside)."""
        m = np.zeros(self.image.shape[:2], dtype=np.uint8)
        if polygon is not None:
            self.poly(polygon, (0, 0, 0), m)
        return m

    @contextlib.contextmanager
    def layer(self, mask: np.ndarray) -> Iterator[None]:
        """Draw on a copy inside the block; afterwards only what lies in ``mask`` is kept (clipping)."""
        saved = self.image
        self.image = saved.copy()
        try:
            yield
        finally:
            drawn, self.image = self.image, saved
        self.blend(mask, drawn)

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
    c = (np.arange(grid, dtype=np.float32) + 0.5) / grid * (CANONICAL_SIZE + 2 * CANVAS_MARGIN) - CANVAS_MARGIN
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


def face_landmarks(t: IdentityTraits, v: ImageVariation) -> np.ndarray:
    """The 5 ArcFace points as drawn, before any pose warp: (5, 2) float64 canonical (x, y).

    Order: left eye, right eye, nose tip, left and right mouth corner. Yaw moves the near-the-camera
    parts (nose most) sideways; a smile lifts the mouth corners.
    """
    cx = CANONICAL_SIZE / 2
    yaw_eye, yaw_nose, yaw_mouth = 3.0 * v.yaw, 7.0 * v.yaw, 3.5 * v.yaw
    smile_lift = 2.2 * v.smile
    return np.array([
        [cx - t.eye_spacing + yaw_eye, t.eye_y],
        [cx + t.eye_spacing + yaw_eye, t.eye_y],
        [cx + yaw_nose, t.nose_y],
        [cx - t.mouth_half_width + yaw_mouth, t.mouth_y - smile_lift],
        [cx + t.mouth_half_width + yaw_mouth, t.mouth_y - smile_lift],
    ])


def paint_face(t: IdentityTraits, v: ImageVariation, scale: float, r: np.random.Generator) -> np.ndarray:
    """Paint a face with its expression and yaw, before pose warp and camera effects.

    Returns (S, S, 3) uint8 RGB covering canonical ``[-CANVAS_MARGIN, 112 + CANVAS_MARGIN)`` at
    ``scale`` pixels per canonical pixel, S = round((112 + 2 * CANVAS_MARGIN) * scale). ``r`` draws
    the hair strands.
    """
    size = int(round((CANONICAL_SIZE + 2 * CANVAS_MARGIN) * scale))
    cv = _Canvas(cv2.resize(v.background, (size, size), interpolation=cv2.INTER_LINEAR), CANVAS_MARGIN, scale)
    for x, y, w, h, angle, *colour in v.clutter:  # background objects: round ones or tall boxes
        if w > 0.7 * h:
            cv.ellipse((x, y), (w, h), angle, colour)
        else:
            box = np.array([[x - w, y - h], [x + w, y - h], [x + w, y + h], [x - w, y + h]])
            cv.poly(_rotate(box, (x, y), angle), colour)
    outline = _face_outline(t, v.yaw)
    points = face_landmarks(t, v)
    _paint_head(cv, t, v, outline)
    _paint_beard(cv, t, v.yaw, outline)
    _paint_eyes(cv, t, v, points[:2])
    if t.glasses and v.glasses_on:
        _paint_glasses(cv, t, points[:2])
    _paint_nose(cv, t, v.yaw, points[2])
    _paint_mouth(cv, t, v, points[3:])
    _paint_hair(cv, t, outline, v.yaw, r)
    _paint_occlusion(cv, t, v, points[:2])
    return cv.image


def _face_outline(t: IdentityTraits, yaw: float, n: int = 64) -> np.ndarray:
    """Closed face outline (skull top to chin), (n, 2) canonical coordinates."""
    cx = CANONICAL_SIZE / 2 + 1.5 * yaw
    cy = _HEAD_CENTRE_Y
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    s, c = np.sin(a), np.cos(a)
    ry = np.where(s > 0, t.chin_y - cy, cy - t.face_top)
    taper = np.where(s > 0, 1.0 - t.jaw_taper * s ** 3, 1.0)
    # a slightly squarer superellipse than an ellipse
    sx = np.sign(c) * np.abs(c) ** 0.85
    sy = np.sign(s) * np.abs(s) ** 0.95
    return np.stack([cx + t.face_half_width * taper * sx, cy + ry * sy], axis=1)


def _paint_head(cv: _Canvas, t: IdentityTraits, v: ImageVariation, outline: np.ndarray) -> None:
    """Clothes, hair behind the head, neck, ears and the textured, shaded skin; moles and freckles."""
    cx, yaw, face_w, skin = CANONICAL_SIZE / 2, v.yaw, t.face_half_width, t.skin
    cv.ellipse((cx, 150), (70, 36), 0, v.clothes)
    if t.hair_style in ("medium", "long", "curly"):
        length = {"medium": 96.0, "long": 132.0, "curly": 100.0}[t.hair_style]
        vol = t.hair_volume
        back = np.concatenate([
            _arc(cx + yaw, _HEAD_CENTRE_Y, face_w + vol, _HEAD_CENTRE_Y - t.face_top + vol, 180, 360),
            [[cx + face_w + vol * 1.2, length], [cx - face_w - vol * 1.2, length]],
        ])
        cv.poly(back, t.hair)
    skin_mask = cv.mask()
    neck_w = face_w * 0.55
    cv.poly(np.array([[cx - neck_w, 90], [cx + neck_w, 90], [cx + neck_w * 1.1, 140], [cx - neck_w * 1.1, 140]]),
            skin, skin_mask)
    for side in (-1, 1):
        ex = cx + side * (face_w - 1.5) + 2.0 * yaw
        cv.ellipse((ex, t.eye_y + 8), (t.ear_size * 0.45, t.ear_size), side * 8, skin, target=skin_mask)
    cv.poly(outline, skin, skin_mask)
    # skin colour x low-frequency texture x rounded shading, composited through the mask
    shade = _smooth_field(lambda x, y: 1.0 - 0.22 * np.clip(
        ((x - cx - 1.5 * yaw) / (face_w + 4)) ** 2 + ((y - 66) / (t.chin_y - 20)) ** 2, 0, 1.6) ** 2,
        cv.image.shape[0], texture=t.texture)
    cv.blend(skin_mask, skin, gain=shade)
    neck_shadow = cv.mask()
    cv.ellipse((cx, t.chin_y + 2), (face_w * 0.55, 6), 0, (0, 0, 0), target=neck_shadow)
    neck_shadow &= ~cv.mask(outline)
    cv.blend(neck_shadow, _scaled(skin, 0.72), 0.6)
    for fx, fy in t.freckles:
        cv.ellipse((fx + 2 * yaw, fy), (0.7, 0.7), 0, _scaled(skin, 0.75))
    if t.mole is not None:
        mx, my, mr = t.mole
        cv.ellipse((mx + 2.5 * yaw, my), (mr, mr), 0, _scaled(skin, 0.35))


def _paint_beard(cv: _Canvas, t: IdentityTraits, yaw: float, outline: np.ndarray) -> None:
    """Beard or stubble over cheeks and jaw (painted before the mouth and nose, which cover it)."""
    if t.beard <= 0:
        return
    cx, ear_y = CANONICAL_SIZE / 2, t.eye_y + 8
    jaw = outline[outline[:, 1] > ear_y]
    jaw = jaw[np.argsort(np.arctan2(jaw[:, 1] - _HEAD_CENTRE_Y, jaw[:, 0] - cx))]  # right side to left, via chin
    fw, mhw, my, ny = t.face_half_width, t.mouth_half_width, t.mouth_y, t.nose_y
    top = np.array([[-fw + 1, ear_y], [-fw * 0.8, ny + 1], [-mhw - 3, my - 5], [-4, ny + 5], [4, ny + 5],
                    [mhw + 3, my - 5], [fw * 0.8, ny + 1], [fw - 1, ear_y]]) + [cx + 2 * yaw, 0]
    stubble = t.beard < 0.5
    cv.blend(cv.mask(np.concatenate([top, jaw])), _mix(t.hair, t.skin, 0.4) if stubble else t.hair, t.beard)


def _paint_eyes(cv: _Canvas, t: IdentityTraits, v: ImageVariation, centres: np.ndarray) -> None:
    """Almond eyes (sclera, iris, pupil, highlight, lid line, crease) and the brows above them."""
    eye_hw = t.eye_half_width * (1.0 - 0.12 * abs(v.yaw))
    look = 1.2 * v.yaw
    for side, (ex, ey) in zip((-1, 1), centres):
        tilt = -side * t.eye_tilt
        open_ = 0.08 if v.blink else t.eye_open
        upper = _arc(ex, ey + 0.4, eye_hw, eye_hw * open_ * 1.15, 180, 360, 16)
        lower = _arc(ex, ey + 0.4, eye_hw, eye_hw * open_ * 0.75, 0, 180, 16)
        almond = _rotate(np.concatenate([upper, lower]), (ex, ey), tilt)
        with cv.layer(cv.mask(almond)):  # the iris is clipped by the lids
            cv.poly(almond, (236, 232, 226))
            iris_r = eye_hw * t.iris_ratio * 0.62
            cv.ellipse((ex + look, ey), (iris_r, iris_r), 0, t.iris)
            cv.ellipse((ex + look, ey), (iris_r * 0.45, iris_r * 0.45), 0, (12, 10, 10))
            cv.ellipse((ex + look + iris_r * 0.35, ey - iris_r * 0.35), (0.6, 0.6), 0, (250, 250, 250))
        cv.line(_rotate(upper, (ex, ey), tilt), (30, 22, 20), 1.0)
        crease = _rotate(_arc(ex, ey - 0.8, eye_hw * 1.05, eye_hw * open_ * 1.6, 200, 340, 10), (ex, ey), tilt)
        cv.line(crease, _scaled(t.skin, 0.78), 0.7)
        bl = t.brow_length
        bx, by = ex + side * 1.5, ey - t.brow_gap
        xs = np.linspace(-bl / 2, bl / 2, 9)
        brow = np.stack([bx + xs, by - t.brow_arch * (1 - (2 * xs / bl) ** 2)], axis=1)
        brow = _rotate(brow, (bx, by), -side * t.brow_tilt * (1.0 - 0.3 * v.smile))
        cv.line(brow, _mix(t.hair, (25, 20, 18), 0.35), t.brow_thickness)


def _paint_glasses(cv: _Canvas, t: IdentityTraits, centres: np.ndarray) -> None:
    """Round or rectangular frames around the eyes, a bridge, and temples towards the ears."""
    colour = t.glasses_colour
    for ex, ey in centres:
        if t.glasses == 1:
            cv.ellipse((ex, ey + 0.5), (9.5, 8.0), 0, colour, 1.1)
        else:
            box = np.array([[ex - 10, ey - 6.5], [ex + 10, ey - 6.5], [ex + 9, ey + 7], [ex - 9, ey + 7]])
            cv.line(box, colour, 1.1, closed=True)
    (lx, ly), (rx, ry) = centres
    cv.line(np.array([[lx + 9.5, ly - 1], [rx - 9.5, ry - 1]]), colour, 1.1)
    for side, (ex, ey) in zip((-1, 1), centres):
        cv.line(np.array([[ex + side * 9.8, ey - 1], [CANONICAL_SIZE / 2 + side * (t.face_half_width + 1), ey]]),
                colour, 1.0)


def _paint_nose(cv: _Canvas, t: IdentityTraits, yaw: float, tip: np.ndarray) -> None:
    """Bridge line, side and under-nose shadows, a lit tip, nostrils and alae."""
    nx, ny = tip
    skin, cx = t.skin, CANONICAL_SIZE / 2
    nw = t.nose_half_width * (1.0 - 0.1 * abs(yaw))
    bridge_x = cx + 3 * yaw + (-1 if yaw >= 0 else 1) * 3.5
    bridge = np.array([[bridge_x, t.eye_y - 2], [bridge_x + 0.6 * (nx - bridge_x), ny - 8], [nx - 0.5 * nw, ny - 2]])
    cv.line(bridge, _scaled(skin, 1.0 - 0.18 * t.nose_bridge), 1.4)
    shadow = cv.mask()
    cv.ellipse((nx, ny + 2.2), (nw * 0.95, 2.6), 0, (0, 0, 0), target=shadow)
    cv.ellipse((nx - (3.0 if yaw >= 0 else -3.0), ny - 7), (2.2, 8), 0, (0, 0, 0), target=shadow)
    cv.blend(shadow, _scaled(skin, 0.72), 0.45)
    cv.ellipse((nx, ny - 1.5), (nw * 0.55, 3.2), 0, _scaled(skin, 1.08))
    for side in (-1, 1):
        cv.ellipse((nx + side * nw * 0.45, ny + 0.6), (nw * 0.24, 1.2), side * 15, _scaled(skin, 0.32))
        ala = _arc(nx + side * nw * 0.72, ny - 0.5, nw * 0.35, 3.0, 90 - side * 90 - 60, 90 - side * 90 + 60, 8)
        cv.line(ala, _scaled(skin, 0.7), 0.8)


def _band(xs: np.ndarray, top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    """Closed polygon between two curves sampled at the same ``xs``: (2n, 2)."""
    return np.concatenate([np.stack([xs, top], 1), np.stack([xs, bottom], 1)[::-1]])


def _paint_mouth(cv: _Canvas, t: IdentityTraits, v: ImageVariation, corners: np.ndarray) -> None:
    """Lips between the mouth corners (a smile curves them, an open mouth shows inside and teeth); moustache."""
    (lx, corner_y), (rx, _) = corners
    xs = np.linspace(lx, rx, 17)
    rel = (xs - (lx + rx) / 2) / ((rx - lx) / 2)  # -1 .. 1 across the mouth
    bulge = 1 - rel ** 2
    opening = 5.0 * v.mouth_open
    seam = corner_y + (t.mouth_y + 0.6 * v.smile - corner_y) * bulge
    seam_top, seam_bottom = seam - opening * 0.35 * bulge, seam + opening * bulge
    bow = 0.8 * np.exp(-((np.abs(rel) - 0.25) / 0.18) ** 2)  # Cupid's bow
    upper_edge = seam_top - t.upper_lip * (1 - 0.7 * rel ** 2) - bow
    lower_edge = seam_bottom + t.lower_lip * (1 - 0.8 * rel ** 4)
    if opening > 0.5:
        cv.poly(_band(xs, seam_top, seam_bottom), (45, 18, 22))
        cv.poly(_band(xs, seam_top, seam_top + min(2.0, opening * 0.4) * bulge), (232, 226, 214))
    cv.poly(_band(xs, upper_edge, seam_top), _scaled(t.lips, 0.92))
    cv.poly(_band(xs, seam_bottom, lower_edge), t.lips)
    cv.line(np.stack([xs, (seam_top + seam_bottom) / 2 if opening <= 0.5 else seam_top], 1),
            _scaled(t.lips, 0.55), 0.8)
    if t.moustache:
        cv.poly(_band(xs, upper_edge - 0.5, upper_edge - 4.5 + 1.5 * rel ** 2), _mix(t.hair, (20, 16, 14), 0.2))


def _paint_hair(cv: _Canvas, t: IdentityTraits, outline: np.ndarray, yaw: float, r: np.random.Generator) -> None:
    """Hair over the skull: a cap above the hairline with strands (or curls), or side tufts when bald."""
    cx = CANONICAL_SIZE / 2 + 1.5 * yaw
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
    crown = _arc(cx, _HEAD_CENTRE_Y, fw + vol, _HEAD_CENTRE_Y - t.face_top + vol, 0, -180, 25)
    cap = np.concatenate([np.stack([xs, hairline], 1), crown])
    dark, light = _scaled(t.hair, 0.7), _mix(t.hair, (255, 255, 255), 0.15)
    curly = t.hair_style == "curly"
    with cv.layer(cv.mask(cap)):  # strands (or curls) show only inside the cap
        cv.poly(cap, t.hair)
        for i in range(40 if curly else 16):
            x0 = cx + r.uniform(-fw - vol, fw + vol)
            y0 = r.uniform(t.face_top - vol, t.hairline_y + 4)
            if curly:
                cv.ellipse((x0, y0), (r.uniform(1.5, 3), r.uniform(1.5, 3)), 0, dark if i % 2 else light, 0.6)
            else:
                dx = (x0 - cx - t.parting) * 0.25
                cv.line(np.array([[x0, y0], [x0 + dx, y0 + r.uniform(6, 12)]]), dark if i % 2 else light, 0.6)


def _paint_occlusion(cv: _Canvas, t: IdentityTraits, v: ImageVariation, eyes: np.ndarray) -> None:
    """An object in front of the face: a hand-like blob, sunglasses, a hat or a scarf."""
    if v.occlusion == 0:
        return
    ox, oy = v.occlusion_pos
    if v.occlusion == 1:  # a hand or object in front of part of the face
        centre = (CANONICAL_SIZE / 2 + 30 * ox, 80 + 18 * oy)
        cv.ellipse(centre, (15, 11), 30 * ox, v.occlusion_colour)
    elif v.occlusion == 2:  # sunglasses
        for ex, ey in eyes:
            cv.ellipse((ex, ey + 0.5), (10, 7.5), 0, (18, 18, 22))
        cv.line(eyes - [[-8, 1], [8, 1]], (18, 18, 22), 1.4)
    elif v.occlusion == 3:  # a hat or cap pulled down over the forehead
        y = t.eye_y - t.brow_gap - 5 + 3 * oy
        cv.poly(np.concatenate([[[-10, y + 2 * ox], [122, y - 2 * ox]], _arc(56, y, 60, 50, 0, -180, 12)]),
                v.occlusion_colour)
    else:  # a scarf or collar over the chin
        y = t.mouth_y + 6 + 3 * oy
        cv.poly(np.array([[-10, y + 3 * ox], [122, y - 3 * ox], [122, 130], [-10, 130]]), v.occlusion_colour)

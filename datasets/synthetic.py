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
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import cv2
import numpy as np

from .atomic import atomic_write_bytes, atomic_write_text
from .face_align import TEMPLATE_112x112
from .face_codec import encode_jpeg
from .face_drawing import CANONICAL_SIZE, CANVAS_MARGIN, IdentityTraits, ImageVariation, draw_traits, \
    draw_variation, face_landmarks, paint_face

#: ArcFace 112x112 alignment template, (5, 2) float32 (x, y) pixels: left eye, right eye, nose tip,
#: left and right mouth corners (left = smaller x, i.e. the subject's right).
ARCFACE_TEMPLATE = TEMPLATE_112x112.astype(np.float32)

_FACE_CENTRE = (56.0, 64.0)  # rotation/scale centre of the pose transform, canonical pixels

# Stream tags keep the identity, image and pair random streams apart for the same numbers.
_TRAITS_STREAM = 1
_IMAGE_STREAM = 2
_PAIRS_STREAM = 3


def _rng(*key: int) -> np.random.Generator:
    """A PCG64 generator keyed by integers (same key, same stream, on every platform and run)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


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
        return draw_traits(_rng(self.seed, _TRAITS_STREAM, identity))

    def variation(self, identity: int, index: int) -> ImageVariation:
        return draw_variation(_rng(self.seed, _IMAGE_STREAM, identity, index), self.difficulty)

    def render(self, identity: int, index: int) -> np.ndarray:
        """Image ``index`` of ``identity``: (H, W, 3) uint8 RGB, H, W = ``image_size``."""
        return self.render_with_landmarks(identity, index)[0]

    def landmarks(self, identity: int, index: int) -> np.ndarray:
        """Where the 5 ArcFace points ended up in image ``index``: (5, 2) float32 (x, y) output pixels."""
        traits, var = self.traits(identity), self.variation(identity, index)
        return self._output_points(face_landmarks(traits, var), var)

    def render_with_landmarks(self, identity: int, index: int,
                              traits: IdentityTraits | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(image, landmarks)``: (H, W, 3) uint8 RGB and (5, 2) float32 output pixel coordinates.

        ``traits`` may pass ``self.traits(identity)`` when rendering many images of one identity.
        """
        if identity < 0 or index < 0:
            raise ValueError(f"identity and index must be >= 0, got identity={identity}, index={index}")
        traits = self.traits(identity) if traits is None else traits
        var = self.variation(identity, index)
        canvas = paint_face(traits, var, self.image_size[0] / CANONICAL_SIZE,
                            _rng(self.seed, _IMAGE_STREAM, identity, index if self.difficulty > 0 else 0, 1))
        image = self._camera(canvas, var, _rng(self.seed, _IMAGE_STREAM, identity, index, 2))
        return image, self._output_points(face_landmarks(traits, var), var)

    def render_array(self, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Every image of the set: ``(images, labels)``, (N, H, W, 3) uint8 RGB and (N,) int64, in
        ``faces[j]`` order (same pixels whatever ``workers`` is).

        ``workers > 1`` renders identity chunks in that many *spawned* processes (pays off from a
        few hundred images, see ``bench/synthetic.py``); as with any spawning
        code, a script that calls it needs the ``if __name__ == "__main__":`` guard.
        """
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
        return encode_jpeg(self.render(identity, index), quality)

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
        k = h / CANONICAL_SIZE  # output pixels per canonical pixel; a narrower crop keeps the face centred
        crop_x = (CANONICAL_SIZE - w / k) / 2.0
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
        k = h / CANONICAL_SIZE
        to_canonical = np.array([[1 / k, 0, -CANVAS_MARGIN], [0, 1 / k, -CANVAS_MARGIN], [0, 0, 1]])
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
            image = cv2.GaussianBlur(image, (0, 0), var.blur_sigma * h / CANONICAL_SIZE)
        if var.noise_sigma > 0:  # zero-mean triangular noise (sum of two uniforms) of std noise_sigma
            u = r.random((2, h, w, 3), dtype=np.float32)
            image += (u[0] + u[1] - 1.0) * np.float32(var.noise_sigma * math.sqrt(6.0))
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _render_identities(faces: SyntheticFaces, identities: Sequence[int]) -> np.ndarray:
    """All images of ``identities``: (len(identities) * images_per_identity, H, W, 3) uint8."""
    images = []
    for identity in identities:
        traits = faces.traits(int(identity))
        images += [faces.render_with_landmarks(int(identity), k, traits)[0] for k in range(faces.images_per_identity)]
    return np.stack(images)


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

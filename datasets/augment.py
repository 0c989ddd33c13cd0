"""Training-image augmentations of the loader, seeded per sample (InsightFace 2018 ``--color``, ``--cutoff``).

:class:`Augmenter` changes one decoded uint8 ``(H, W, 3)`` BGR image in the loader worker, before
the CHW copy of :class:`datasets.rec_dataset.RecFaceDataset` (the mirror stays on the device in the
trainer). Steps, in the order of the 2018 ``FaceImageIter.next``:

* ``rand_scale`` / ``rand_shift`` (new; the 2018 iterator had none): one similarity warp of the aligned
  crop, scale ``1 + U(-rand_scale, rand_scale)`` about the centre and a shift of
  ``U(-rand_shift, rand_shift)`` x width (height) pixels; borders are replicated.
* ``color`` (2018 ``--color``): 1 = colour jitter as ``mx.image.ColorJitterAug(b, c, s)`` with
  ``b = c = s = color_jitter`` (2018: 0.125): brightness ``x *= 1 + U(-b, b)``, contrast (blend with
  the image's mean grey) and saturation (blend with each pixel's grey), in random order;
  2 = also, with p = 0.5 before the jitter, a JPEG re-encoding at quality ``U{2..20}`` (2018's
  ``compress_aug``).
* ``rand_light`` (new): side lighting, the image multiplied by a linear ramp ``1 + g * d`` where ``d`` in
  [-1, 1] is the position along a random direction and ``g = U(-rand_light, rand_light)`` (one half
  of the face darker, the other brighter, as with a lamp to one side).
* ``cutoff`` (2018 ``--cutoff``): with p = 0.5 a ``cutoff x cutoff`` square (clipped at the borders;
  centre uniform over the image) is set to grey 128 (random erasing).

Randomness: every image draws from ``numpy.random.default_rng([seed, epoch, index])``, so the result
depends only on the run seed, the epoch and the dataset index: the same in any worker, with any
number of workers, and after a resume (no stream to restore). The epoch reaches the workers with the
index: :func:`tag_epochs` wraps the trainer's sampler so that it yields ``(index, epoch)``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

import cv2
import numpy as np
from torch.utils.data import Sampler

from .face_codec import decode_bgr, encode_jpeg

__all__ = ["Augmenter", "EpochTaggedSampler", "tag_epochs"]

# BT.601 grey weights in BGR order (ColorJitterAug's coefficients 0.299, 0.587, 0.114 are RGB)
_GREY_BGR = np.array([0.114, 0.587, 0.299], np.float32)


@dataclass(frozen=True)
class Augmenter:
    """Per-sample augmentation of uint8 BGR ``(H, W, 3)`` images; all zero = identity (see the module docstring).

    ``color``: 0 off, 1 jitter, 2 jitter + JPEG re-encoding; ``color_jitter``: jitter strength (fraction);
    ``cutoff``: erased square side in pixels (0 off); ``rand_scale``: relative scale range;
    ``rand_shift``: shift range as a fraction of the image size; ``seed``: the run seed.
    """

    color: int = 0
    color_jitter: float = 0.125
    cutoff: int = 0
    rand_scale: float = 0.0
    rand_shift: float = 0.0
    rand_light: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.color not in (0, 1, 2):
            raise ValueError(f"color must be 0 (off), 1 (jitter) or 2 (jitter + JPEG), got {self.color}")
        if not 0 <= self.color_jitter < 1:
            raise ValueError(f"color_jitter must lie in [0, 1), got {self.color_jitter}")
        if self.cutoff < 0:
            raise ValueError(f"cutoff must be >= 0 pixels, got {self.cutoff}")
        if not 0 <= self.rand_scale < 1 or not 0 <= self.rand_shift < 1 or not 0 <= self.rand_light <= 1:
            raise ValueError(f"rand_scale and rand_shift must lie in [0, 1) and rand_light in [0, 1], got "
                             f"{self.rand_scale}, {self.rand_shift}, {self.rand_light}")

    @property
    def active(self) -> bool:
        return bool(self.color or self.cutoff or self.rand_scale or self.rand_shift or self.rand_light)

    def describe(self) -> dict[str, Any]:
        """The options as a dict (for run records)."""
        return asdict(self)

    def rng(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def __call__(self, img: np.ndarray, index: int, epoch: int) -> np.ndarray:
        """Augmented copy of ``img`` (uint8 ``(H, W, 3)`` BGR) for dataset item ``index`` in ``epoch``."""
        if not self.active:
            return img
        rng = self.rng(index, epoch)
        source = img
        h, w = img.shape[:2]
        if self.rand_scale or self.rand_shift:
            scale = 1.0 + rng.uniform(-self.rand_scale, self.rand_scale)
            dx, dy = rng.uniform(-self.rand_shift, self.rand_shift, 2) * (w, h)
            cx, cy = (w - 1) / 2, (h - 1) / 2
            matrix = np.array([[scale, 0, cx - scale * cx + dx], [0, scale, cy - scale * cy + dy]], np.float32)
            img = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        if self.color:
            if self.color > 1 and rng.integers(2):
                quality = int(rng.integers(2, 21))
                img = decode_bgr(encode_jpeg(img[:, :, ::-1], quality), "augmentation")
            img = self._jitter(img, rng)
        if self.rand_light:
            img = self._light(img, rng)
        if self.cutoff and rng.integers(2):
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            half = self.cutoff // 2
            img = np.array(img, copy=True) if img is source or not img.flags.writeable else img
            img[max(0, cy - half):min(h, cy + half), max(0, cx - half):min(w, cx + half)] = 128
        return img

    def _light(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        gain = rng.uniform(-self.rand_light, self.rand_light)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32)
        ramp = 1.0 + np.float32(gain) * (np.float32(np.cos(angle)) * xs[None, :] + np.float32(np.sin(angle)) * ys[:, None])
        return np.clip(img * ramp[:, :, None] + 0.5, 0, 255).astype(np.uint8)

    def _jitter(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = img.astype(np.float32)
        s = self.color_jitter
        alphas = 1.0 + rng.uniform(-s, s, 3)
        for op in rng.permutation(3):
            alpha = np.float32(alphas[op])
            if op == 0:  # brightness
                x *= alpha
            elif op == 1:  # contrast: blend with the mean grey level
                grey = float((x @ _GREY_BGR).mean())
                x *= alpha
                x += (1.0 - alpha) * grey
            else:  # saturation: blend with each pixel's grey level
                grey = (x @ _GREY_BGR)[:, :, None]
                x *= alpha
                x += (1.0 - alpha) * grey
        return np.clip(x + 0.5, 0, 255).astype(np.uint8)


class EpochTaggedSampler(Sampler):
    """Yields ``(index, epoch)`` (or lists of them, for a batch sampler) for every item of ``sampler``.

    ``epoch`` is read from ``sampler.epoch`` when an iteration starts (after the trainer's ``set_epoch``);
    ``len`` is the wrapped sampler's. The wrapped sampler keeps its own state (resume positions)."""

    def __init__(self, sampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator:
        epoch = int(getattr(self.sampler, "epoch", 0))
        for item in self.sampler:
            if isinstance(item, (list, tuple)):
                yield [(int(i), epoch) for i in item]
            else:
                yield (int(item), epoch)


def tag_epochs(loader_args: dict[str, Any]) -> dict[str, Any]:
    """DataLoader keyword arguments with their ``sampler`` or ``batch_sampler`` wrapped in :class:`EpochTaggedSampler`."""
    out = dict(loader_args)
    for key in ("sampler", "batch_sampler"):
        if out.get(key) is not None:
            out[key] = EpochTaggedSampler(out[key])
    return out


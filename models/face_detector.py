"""Batched MTCNN face detection (facenet-pytorch) on photos of any size.

``FaceDetector.detect(images)`` takes a list of ``(H, W, 3) uint8`` RGB images of different sizes
and returns, per image, boxes, scores and five landmarks in that image's own pixel coordinates.
Inside, every image is downscaled (area filter) so that its longest side is at most ``max_side``
and zero-padded at the bottom and right up to a multiple of ``pad_multiple`` pixels. The padded
size depends on the image alone, so an image's detections do not depend on which other images
share its batch; images of equal padded size are stacked and MTCNN runs once per batch of up to
``batch_size`` of them. Padding does not move coordinates; detections whose centre falls in the
padding are dropped.

On the CPU, MTCNN runs with ``threads`` intra-op threads (default 1) whatever the calling thread's
torch setting (set for the call and restored; OpenMP thread counts are per calling thread, so
concurrent callers do not disturb each other): convolution kernels split their work, and some
their sums, by thread count, so with another count a landmark can move by ~1e-4 px. With
``batch_size=1`` an image's detections are then a function of the image alone on a given machine
and torch build.

``min_face_size`` is in pixels of the downscaled image: with ``max_side=640`` and
``min_face_size=20`` a face must span at least 1/32 of the photo's longest side.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
from facenet_pytorch import MTCNN


@dataclass(frozen=True)
class Detections:
    """Faces found in one image, highest score first.

    ``boxes`` ``(n, 4) float32`` x1, y1, x2, y2; ``scores`` ``(n,) float32`` in [0, 1];
    ``landmarks`` ``(n, 5, 2) float32`` (x, y) of left eye, right eye, nose, left and right mouth
    corner. Pixel coordinates of the image given to :meth:`FaceDetector.detect`.
    """

    boxes: np.ndarray
    scores: np.ndarray
    landmarks: np.ndarray

    @staticmethod
    def empty() -> "Detections":
        return Detections(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, 5, 2), np.float32))

    def __len__(self) -> int:
        return len(self.scores)


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available on this machine")
    return dev


class FaceDetector:
    """MTCNN (P-, R-, O-Net from the facenet-pytorch wheel, no download) with size bucketing."""

    def __init__(
        self,
        *,
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        factor: float = 0.709,
        max_side: int = 640,
        batch_size: int = 16,
        device: str | torch.device = "auto",
        pad_multiple: int = 32,
        threads: int | None = 1,
    ):
        if max_side < 0 or batch_size < 1 or pad_multiple < 1:
            raise ValueError(
                f"max_side ({max_side}) must be >= 0, batch_size ({batch_size}) and pad_multiple ({pad_multiple}) >= 1"
            )
        self.min_face_size = int(min_face_size)
        self.max_side = int(max_side)
        self.batch_size = int(batch_size)
        self.pad_multiple = int(pad_multiple)
        self.threads = None if threads is None else max(1, int(threads))
        self.device = resolve_device(device)
        self.mtcnn = MTCNN(
            min_face_size=self.min_face_size,
            thresholds=list(thresholds),
            factor=float(factor),
            keep_all=True,
            select_largest=False,
            post_process=False,
            device=self.device,
        ).eval()
        if self.device.type == "cpu":
            # NHWC weights make the convolutions return NHWC tensors, for which PyTorch's CPU
            # max-pool and PReLU kernels are vectorised: faster, same detections (within 1e-3 px).
            for net in (self.mtcnn.pnet, self.mtcnn.rnet, self.mtcnn.onet):
                net.to(memory_format=torch.channels_last)

    def detection_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is detected at (longest side <= ``max_side``)."""
        longest = max(height, width)
        if self.max_side == 0 or longest <= self.max_side:
            return height, width
        scale = self.max_side / longest
        return max(1, round(height * scale)), max(1, round(width * scale))

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        m = self.pad_multiple
        return math.ceil(height / m) * m, math.ceil(width / m) * m

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Detect faces in every image ``(H_i, W_i, 3) uint8`` RGB; one :class:`Detections` each."""
        small, sizes = [], []
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(f"image {i}: expected (H, W, 3) uint8 RGB, got {img.dtype} {img.shape}")
            h, w = img.shape[:2]
            dh, dw = self.detection_size(h, w)
            small.append(img if (dh, dw) == (h, w) else cv2.resize(img, (dw, dh), interpolation=cv2.INTER_AREA))
            sizes.append((h, w, dh, dw))

        buckets: dict[tuple[int, int], list[int]] = {}
        for i, (_, _, dh, dw) in enumerate(sizes):
            buckets.setdefault(self.padded_size(dh, dw), []).append(i)

        results: list[Detections] = [Detections.empty()] * len(images)
        for (ph, pw), members in sorted(buckets.items()):
            if min(ph, pw) < self.min_face_size:  # MTCNN's pyramid would be empty
                continue
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                stack = np.zeros((len(batch), ph, pw, 3), np.uint8)
                for j, i in enumerate(batch):
                    stack[j, : sizes[i][2], : sizes[i][3]] = small[i]
                for i, det in zip(batch, self._run(stack)):
                    results[i] = _to_original(det, *sizes[i])
        return results

    def _run(self, stack: np.ndarray) -> list[Detections]:
        before = torch.get_num_threads()
        pin = self.device.type == "cpu" and self.threads is not None and self.threads != before
        if pin:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                boxes, probs, points = self.mtcnn.detect(stack, landmarks=True)
        finally:
            if pin:
                torch.set_num_threads(before)
        out = []
        for b, p, pts in zip(boxes, probs, points):
            if b is None:
                out.append(Detections.empty())
                continue
            scores = np.asarray(p, dtype=np.float32).reshape(-1)
            order = np.argsort(-scores, kind="stable")
            out.append(
                Detections(
                    np.asarray(b, dtype=np.float32).reshape(-1, 4)[order],
                    scores[order],
                    np.asarray(pts, dtype=np.float32).reshape(-1, 5, 2)[order],
                )
            )
        return out


def _to_original(det: Detections, h: int, w: int, dh: int, dw: int) -> Detections:
    """Drop detections centred in the padding; map the rest from detection to original pixels."""
    if len(det) == 0:
        return det
    cx = (det.boxes[:, 0] + det.boxes[:, 2]) / 2
    cy = (det.boxes[:, 1] + det.boxes[:, 3]) / 2
    keep = (cx < dw) & (cy < dh)
    boxes, landmarks = det.boxes[keep].astype(np.float64), det.landmarks[keep].astype(np.float64)
    sx, sy = w / dw, h / dh
    if (sx, sy) != (1.0, 1.0):  # pixel-centre resampling map, as cv2.resize uses
        boxes = boxes * np.array([sx, sy, sx, sy]) + np.array([0.5 * sx - 0.5, 0.5 * sy - 0.5] * 2)
        landmarks = landmarks * np.array([sx, sy]) + np.array([0.5 * sx - 0.5, 0.5 * sy - 0.5])
    return Detections(boxes.astype(np.float32), det.scores[keep], landmarks.astype(np.float32))

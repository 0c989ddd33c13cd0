"""Input normalisation of face networks: uint8 pixels -> float32 ``(x - 127.5) * scale``.

* ``"arcface"``: ``(x - 127.5) / 127.5`` = arcface_torch's ``Normalize(mean=0.5, std=0.5)`` on
  ``x / 255``; the default of every network trained here.
* ``"mxnet"``: ``(x - 127.5) / 128`` (``* 0.0078125``), what InsightFace's 2018 MXNet networks compute
  inside their graph (``_minusscalar0`` / ``_mulscalar0``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # imported where used: option models import this module without numpy, torch or OpenCV
    import numpy as np
    import torch

__all__ = ["Normalization", "NORMALIZATIONS", "normalization_scale", "normalization_lut", "normalize_batch"]

Normalization = Literal["arcface", "mxnet"]
#: mode -> (mean, scale): normalised = (x - mean) * scale.
NORMALIZATIONS: dict[str, tuple[float, float]] = {"arcface": (127.5, 1.0 / 127.5), "mxnet": (127.5, 1.0 / 128.0)}


def normalization_scale(mode: str) -> float:
    """The scale of ``mode``; ``ValueError`` naming the modes for anything else."""
    try:
        return NORMALIZATIONS[mode][1]
    except (KeyError, TypeError):
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {mode!r}") from None


def normalization_lut(mode: str) -> np.ndarray:
    """float32 table ``x -> (x - 127.5) * scale`` for x in 0..255 (same float32 rounding as the formula)."""
    import numpy as np

    return (np.arange(256, dtype=np.float32) - np.float32(127.5)) * np.float32(normalization_scale(mode))


def normalize_batch(x: torch.Tensor, mode: Normalization | None) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` on any device -> float32 ``(x - 127.5) * scale``; ``None``: float32 as is.

    On the CPU it is one ``cv2.LUT`` pass (multi-threaded, float32 table lookup) instead of three
    elementwise torch passes; elsewhere it is ``x.float().sub_(127.5).mul_(scale)``.
    """
    if mode is None:
        return x.float()
    import torch

    if x.device.type == "cpu" and x.dtype == torch.uint8 and x.is_contiguous() and x.dim() >= 2 and x.numel():
        import cv2

        flat = x.numpy().reshape(-1, x.shape[-1])
        return torch.from_numpy(cv2.LUT(flat, normalization_lut(mode)).reshape(tuple(x.shape)))
    return x.float().sub_(127.5).mul_(normalization_scale(mode))

"""MTCNN's output network (ONet) as a recognition trunk that starts from the detector's real-face weights.

No face-recognition weights can be downloaded here, but the face detector's weights ship with
facenet-pytorch (``facenet_pytorch/data/onet.pt``): MTCNN's ONet (Zhang et al., 2016) was trained on
real faces to tell faces from non-faces and to place the box and the five landmarks. Its convolutions
are a small feature extractor trained on real faces, and starting from them is what lets a network
learn identities from a few hundred real photos (measured in ``bench/real_faces.py``; figures in the
README). :class:`ONetTrunk` is ONet's convolutional part, layer for layer (3x3 conv + PReLU + 3x3/2
max-pool twice, 3x3 conv + PReLU; ``depth`` 4 adds ONet's 2x2/2 max-pool and 2x2 conv + PReLU), with
the detector's layer names, so :func:`load_detector_weights` copies the state dict as it is.

Input ``(N, 3, H, W)`` RGB normalised as the rest of facepipe (``(x - 127.5) / 127.5``; MTCNN divides by
128, 0.4% apart, which fine-tuning absorbs), ONet's own size being 48x48; output
``(N, 64, h, w)`` (depth 3: 8x8 at 48x48) or ``(N, 128, h, w)`` (depth 4: 3x3 at 48x48).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

__all__ = ["ONetTrunk", "load_detector_weights", "detector_weights_path"]


class ONetTrunk(nn.Module):
    """ONet's convolutions up to ``conv3`` (``depth`` 3) or ``conv4`` (``depth`` 4); see the module docstring."""

    def __init__(self, depth: int = 3):
        super().__init__()
        if depth not in (3, 4):
            raise ValueError(f"ONet trunk depth must be 3 or 4 (conv3 or conv4), got {depth!r}")
        self.depth = depth
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        if depth == 4:
            self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
            self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        if self.depth == 4:
            x = self.prelu4(self.conv4(self.pool3(x)))
        return x


def detector_weights_path() -> Path:
    """facenet-pytorch's MTCNN ONet weights (``onet.pt``, a state dict), shipped inside the package."""
    import facenet_pytorch

    return Path(facenet_pytorch.__file__).resolve().parent / "data" / "onet.pt"


def load_detector_weights(trunk: ONetTrunk, path: str | Path | None = None) -> None:
    """Copy the detector's ``conv*``/``prelu*`` weights of ``trunk``'s depth into ``trunk`` (in place)."""
    path = Path(path) if path is not None else detector_weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: MTCNN's ONet weights are not there (facenet-pytorch installs them); "
                                f"network 'onet' starts from them") from None
    own = trunk.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{path}: not an MTCNN ONet state dict (no {', '.join(missing)})")
    trunk.load_state_dict({k: state[k] for k in own})

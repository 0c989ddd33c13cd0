"""MobileNet v1 trunk (InsightFace ``fmobilenet.py``, code ``m1``; ``m05`` = multiplier 0.5).

Thirteen depthwise-separable pairs (3x3 depthwise conv-BN-act, 1x1 conv-BN-act) after a 3x3 stem of
``32 * multiplier`` channels, ending at ``1024 * multiplier`` channels. The stem has stride 2 with
input 0 and stride 1 with input L (``version_input=1``), so a 112x112 face ends at 7x7 only with L
("LMobileNetE" of the README). The MXNet symbol froze every BN scale (``fix_gamma=True``); here the
BN scales are learned like in every other trunk.
Input ``(N, 3, H, W) float32``; output ``(N, 1024m, H/16, W/16)`` with L.
"""
from __future__ import annotations

from torch import nn

from models.layers import ConvBNAct

# (depthwise stride, pointwise width in units of the base width) for conv_2 .. conv_14.
_PAIRS = ((1, 2), (2, 4), (1, 4), (2, 8), (1, 8), (2, 16), (1, 16), (1, 16), (1, 16), (1, 16), (1, 16), (2, 32),
          (1, 32))


class MobileNetTrunk(nn.Module):
    """MobileNet v1 body; ``multiplier`` scales every width (base width ``int(32 * multiplier)``)."""

    def __init__(self, multiplier: float = 1.0, version_input: int = 1, act: str = "prelu"):
        super().__init__()
        base = int(32 * multiplier)
        if base < 1:
            raise ValueError(f"MobileNet multiplier {multiplier!r} leaves no channels (expected >= 1/32)")
        if version_input not in (0, 1):
            raise ValueError(f"version_input {version_input!r} is not supported (expected 0 or 1)")
        layers: list[nn.Module] = [ConvBNAct(3, base, 3, 2 if version_input == 0 else 1, act=act)]
        channels = base
        for stride, width in _PAIRS:
            layers.append(ConvBNAct(channels, channels, 3, stride, groups=channels, act=act))
            layers.append(ConvBNAct(channels, base * width, 1, act=act))
            channels = base * width
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, x):
        return self.layers(x)

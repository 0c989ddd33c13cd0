"""Inception-ResNet-v2 trunk (InsightFace ``finception_resnet_v2.py``, code ``i4``).

Follows the MXNet symbol as written, including its quirks: the stem's first max-pool is computed
but never used (so the 35x35 stage runs at 52x52 for a 112x112 L input), and block17's bottleneck
has 129 channels. ReLU everywhere, as in the source; BN eps 2e-5 here (the symbol used MXNet's 1e-3).

    stem (3x3/1 with L or 3x3/2 with input 0, all 'valid')   112 -> 106 -> max-pool/2 -> 52
    mixed 5b (320) + 10 x block35 (scale 0.17)               52x52
    reduction A (1088) + 20 x block17 (scale 0.1)            25x25
    reduction B (2080) + 9 x block8 (scale 0.2) + block8 (no act) + 1x1 conv 1536   12x12

Input ``(N, 3, H, W) float32``; output ``(N, 1536, 12, 12)`` for 112x112 with L.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import ConvBNAct

_ACT = "relu"


def _conv(cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
          padding: int | tuple[int, int] = 0, act: bool = True) -> ConvBNAct:
    return ConvBNAct(cin, cout, kernel, stride, act=_ACT if act else None, padding=padding)


class Concat(nn.Module):
    """Runs branches on the same input and concatenates them on the channel axis."""

    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class ScaledResidual(nn.Module):
    """``act(x + scale * project(concat(branches)(x)))``: the block35 / block17 / block8 pattern."""

    def __init__(self, channels: int, branches: list[nn.Module], mixed_channels: int, scale: float,
                 with_act: bool = True):
        super().__init__()
        self.mixed = Concat(*branches)
        self.project = _conv(mixed_channels, channels, 1, act=False)
        self.scale = scale
        self.act = nn.ReLU() if with_act else nn.Identity()

    def forward(self, x):
        return self.act(x + self.scale * self.project(self.mixed(x)))


def block35(scale: float) -> ScaledResidual:
    return ScaledResidual(320, [
        _conv(320, 32, 1),
        nn.Sequential(_conv(320, 32, 1), _conv(32, 32, 3, padding=1)),
        nn.Sequential(_conv(320, 32, 1), _conv(32, 48, 3, padding=1), _conv(48, 64, 3, padding=1)),
    ], 128, scale)


def block17(scale: float) -> ScaledResidual:
    # The (1,7)/(7,1) pads (1,2)/(2,1) are the source's; together they keep the 25x25 size.
    return ScaledResidual(1088, [
        _conv(1088, 192, 1),
        nn.Sequential(_conv(1088, 129, 1), _conv(129, 160, (1, 7), padding=(1, 2)),
                      _conv(160, 192, (7, 1), padding=(2, 1))),
    ], 384, scale)


def block8(scale: float, with_act: bool = True) -> ScaledResidual:
    return ScaledResidual(2080, [
        _conv(2080, 192, 1),
        nn.Sequential(_conv(2080, 192, 1), _conv(192, 224, (1, 3), padding=(0, 1)),
                      _conv(224, 256, (3, 1), padding=(1, 0))),
    ], 448, scale, with_act)


class InceptionResNetV2Trunk(nn.Module):
    """Inception-ResNet-v2 up to the 1536-channel 1x1 conv (see the module docstring for sizes)."""

    def __init__(self, version_input: int = 1):
        super().__init__()
        if version_input not in (0, 1):
            raise ValueError(f"version_input {version_input!r} is not supported (expected 0 or 1)")
        self.stem = nn.Sequential(
            _conv(3, 32, 3, 2 if version_input == 0 else 1),
            _conv(32, 32, 3),
            _conv(32, 64, 3, padding=1),
            _conv(64, 80, 1),
            _conv(80, 192, 3),
            nn.MaxPool2d(3, 2),
            Concat(
                _conv(192, 96, 1),
                nn.Sequential(_conv(192, 48, 1), _conv(48, 64, 5, padding=2)),
                nn.Sequential(_conv(192, 64, 1), _conv(64, 96, 3, padding=1), _conv(96, 96, 3, padding=1)),
                nn.Sequential(nn.AvgPool2d(3, 1, 1, count_include_pad=True), _conv(192, 64, 1)),
            ),
        )
        self.stage35 = nn.Sequential(*[block35(0.17) for _ in range(10)])
        self.reduction_a = Concat(
            _conv(320, 384, 3, 2),
            nn.Sequential(_conv(320, 256, 1), _conv(256, 256, 3, padding=1), _conv(256, 384, 3, 2)),
            nn.MaxPool2d(3, 2),
        )
        self.stage17 = nn.Sequential(*[block17(0.1) for _ in range(20)])
        self.reduction_b = Concat(
            nn.Sequential(_conv(1088, 256, 1), _conv(256, 384, 3, 2)),
            nn.Sequential(_conv(1088, 256, 1), _conv(256, 288, 3, 2)),
            nn.Sequential(_conv(1088, 256, 1), _conv(256, 288, 3, padding=1), _conv(288, 320, 3, 2)),
            nn.MaxPool2d(3, 2),
        )
        self.stage8 = nn.Sequential(*[block8(0.2) for _ in range(9)], block8(1.0, with_act=False))
        self.final = _conv(2080, 1536, 1)
        self.out_channels = 1536

    def forward(self, x):
        x = self.stage35(self.stem(x))
        x = self.stage17(self.reduction_a(x))
        x = self.stage8(self.reduction_b(x))
        return self.final(x)

"""DenseNet-BC trunks (InsightFace ``fdensenet.py``, codes ``d121``, ``d161``, ``d169``, ``d201``).

Dense units BN-ReLU-conv 1x1 (4 g) -> BN-ReLU-conv 3x3 (g), each concatenated to its input (growth
rate g = 32, 48 for d161), with Dropout(``dropout``, 0.2 in 2018, 0.0 in the 2019 config) after
each conv; transitions BN-ReLU-conv 1x1 -> 2x2/2 average pool with compression 0.5. Transition
widths follow the source's count, which starts from 2 g even where the L input block
(``downsampling_stem``, 64 filters at most) delivers fewer channels.
Input ``(N, 3, H, W) float32``; output ``(N, C, H/16, W/16)`` with input L.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import BNActConv
from models.resnet import downsampling_stem

# depth -> (units per dense block, growth rate)
DENSENET_CONFIGS: dict[int, tuple[tuple[int, int, int, int], int]] = {
    121: ((6, 12, 24, 16), 32),
    161: ((6, 12, 36, 24), 48),
    169: ((6, 12, 32, 32), 32),
    201: ((6, 12, 48, 32), 32),
}


class DenseUnit(nn.Module):
    """Bottleneck unit; returns ``cat([x, new])`` with ``growth`` new channels."""

    def __init__(self, in_channels: int, growth: int, dropout: float):
        super().__init__()
        self.body = nn.Sequential(BNActConv(in_channels, 4 * growth, 1), nn.Dropout(dropout),
                                  BNActConv(4 * growth, growth, 3), nn.Dropout(dropout))

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=1)


class DenseNetTrunk(nn.Module):
    """DenseNet of a depth in ``DENSENET_CONFIGS``."""

    def __init__(self, depth: int, version_input: int = 1, act: str = "prelu", dropout: float = 0.2):
        super().__init__()
        if depth not in DENSENET_CONFIGS:
            raise ValueError(f"DenseNet depth {depth} is not supported "
                             f"(expected one of {', '.join(map(str, DENSENET_CONFIGS))})")
        units, growth = DENSENET_CONFIGS[depth]
        self.stem, channels = downsampling_stem(version_input, 2 * growth, act)
        counted = 2 * growth  # the source's running channel count, which sets the transition widths
        layers: list[nn.Module] = []
        for i, count in enumerate(units):
            for _ in range(count):
                layers.append(DenseUnit(channels, growth, dropout))
                channels += growth
            if i < len(units) - 1:
                counted = (counted + count * growth) // 2
                layers += [BNActConv(channels, counted, 1), nn.Dropout(dropout), nn.AvgPool2d(2, 2)]
                channels = counted
        self.layers = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, x):
        return self.layers(self.stem(x))

"""MobileFaceNet trunk (InsightFace ``fmobilefacenet.py``, 2019 ``net_blocks``; arcface_torch ``mbf`` at scale 2).

Layout for 112x112 (``s`` = ``scale``, expansion widths fixed as in both sources):

    conv 3x3/2 -> 64s                                   56x56
    depthwise 3x3 (groups 64)     or  blocks[0] residual units (expansion 64s)
    unit /2 (expansion 128) -> 64s,   blocks[1] residual units (expansion 128)     28x28
    unit /2 (expansion 256) -> 128s,  blocks[2] residual units (expansion 256)     14x14
    unit /2 (expansion 512) -> 128s,  blocks[3] residual units (expansion 256)      7x7
    conv 1x1 -> 512

A unit is 1x1 conv-BN-act (expand) -> 3x3 depthwise conv-BN-act -> 1x1 conv-BN (project, linear);
stride-1 units add their input. ``y1`` = blocks (1, 4, 6, 2), ``y2`` = (2, 8, 16, 4), both scale 1 with
the GDC output; ``mbf`` = arcface_torch's MobileFaceNet (scale 2, the "0.45 GFLOPs" model).
Input ``(N, 3, H, W) float32``; output ``(N, 512, H/16, W/16)``.
"""
from __future__ import annotations

from torch import nn

from models.layers import ConvBNAct


class DepthwiseUnit(nn.Module):
    """Expand (1x1) -> depthwise 3x3 (``stride``) -> linear project (1x1); residual when ``residual``."""

    def __init__(self, in_channels: int, out_channels: int, expansion: int, stride: int, act: str,
                 residual: bool):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBNAct(in_channels, expansion, 1, act=act),
            ConvBNAct(expansion, expansion, 3, stride, groups=expansion, act=act),
            ConvBNAct(expansion, out_channels, 1, act=None),
        )

    def forward(self, x):
        out = self.layers(x)
        return out + x if self.residual else out


def _residual_stack(channels: int, expansion: int, count: int, act: str) -> nn.Sequential:
    return nn.Sequential(*[DepthwiseUnit(channels, channels, expansion, 1, act, residual=True) for _ in range(count)])


class MobileFaceNetTrunk(nn.Module):
    """MobileFaceNet up to the 512-channel 1x1 conv; ``blocks`` = units in the four residual stages."""

    def __init__(self, blocks: tuple[int, int, int, int] = (1, 4, 6, 2), scale: int = 1, act: str = "prelu",
                 first_expansion: int | None = None):
        """``first_expansion``: expansion width of the first residual stack when ``blocks[0] > 1``
        (InsightFace: ``64 * scale``; arcface_torch: 128 at every scale)."""
        super().__init__()
        if len(blocks) != 4 or any(int(b) < 1 for b in blocks):
            raise ValueError(f"MobileFaceNet blocks {blocks!r} must be four positive unit counts, e.g. (1, 4, 6, 2)")
        c1, c2 = 64 * scale, 128 * scale
        first = ConvBNAct(c1, c1, 3, 1, groups=64, act=act) if blocks[0] == 1 \
            else _residual_stack(c1, first_expansion or c1, blocks[0], act)
        self.layers = nn.Sequential(
            ConvBNAct(3, c1, 3, 2, act=act),
            first,
            DepthwiseUnit(c1, c1, 128, 2, act, residual=False),
            _residual_stack(c1, 128, blocks[1], act),
            DepthwiseUnit(c1, c2, 256, 2, act, residual=False),
            _residual_stack(c2, 256, blocks[2], act),
            DepthwiseUnit(c2, c2, 512, 2, act, residual=False),
            _residual_stack(c2, 256, blocks[3], act),
            ConvBNAct(c2, 512, 1, act=act),
        )
        self.out_channels = 512

    def forward(self, x):
        return self.layers(x)

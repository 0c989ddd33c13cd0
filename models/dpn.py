"""Dual Path Network trunks (InsightFace ``fdpn.py``, codes ``p68``, ``p92``, ``p107``, ``p131``).

Every block keeps a residual path (``bw`` channels, summed) and a densely connected path (grows by
``inc`` channels a block, concatenated); the running state is the concatenation ``[residual | dense]``.
A block is BN-ReLU-conv 1x1 (R) -> BN-ReLU-grouped conv 3x3 (R, G groups, stride) -> BN-ReLU-conv 1x1
(bw + inc); the first block of a stage projects the input with a BN-ReLU-conv 1x1 to bw + 2 inc.
Stage widths bw = 256/512/1024/2048 for every depth (as in the InsightFace symbol) and R = k_R * bw / 256.
The input block is ``symbol_utils.get_head`` (``downsampling_stem``) with 128 filters.
Input ``(N, 3, H, W) float32``; output ``(N, 2048 + (k5 + 2) inc5, H/16, W/16)`` with input L.
"""
from __future__ import annotations

import torch
from torch import nn

from models.layers import BNActConv
from models.resnet import downsampling_stem

# depth -> (k_R, groups, blocks per stage, dense increment per stage)
DPN_CONFIGS: dict[int, tuple[int, int, tuple[int, ...], tuple[int, ...]]] = {
    68: (128, 32, (3, 4, 12, 3), (16, 32, 32, 64)),
    92: (96, 32, (3, 4, 20, 3), (16, 32, 24, 128)),
    107: (200, 50, (4, 8, 20, 3), (20, 64, 64, 128)),
    131: (160, 40, (4, 8, 28, 3), (16, 32, 32, 128)),
}


class DualPathBlock(nn.Module):
    """One DPN block on the state ``[residual (bw) | dense]``; ``project`` for the first block of a stage."""

    def __init__(self, in_channels: int, width: int, bw: int, inc: int, groups: int, stride: int, project: bool):
        super().__init__()
        self.bw = bw
        self.project = BNActConv(in_channels, bw + 2 * inc, 1, stride) if project else None
        self.body = nn.Sequential(
            BNActConv(in_channels, width, 1),
            BNActConv(width, width, 3, stride, groups=groups),
            BNActConv(width, bw + inc, 1),
        )

    def forward(self, x):
        paths = self.project(x) if self.project is not None else x
        out = self.body(x)
        residual = paths[:, : self.bw] + out[:, : self.bw]
        return torch.cat([residual, paths[:, self.bw:], out[:, self.bw:]], dim=1)


class DPNTrunk(nn.Module):
    """DPN of a depth in ``DPN_CONFIGS``; ``out_channels`` = 2048 + dense channels of the last stage."""

    def __init__(self, depth: int, version_input: int = 1, act: str = "prelu"):
        super().__init__()
        if depth not in DPN_CONFIGS:
            raise ValueError(f"DPN depth {depth} is not supported (expected one of {', '.join(map(str, DPN_CONFIGS))})")
        k_r, groups, blocks, incs = DPN_CONFIGS[depth]
        self.stem, channels = downsampling_stem(version_input, 128, act)
        stages = []
        for i, (count, inc) in enumerate(zip(blocks, incs)):
            bw = 256 << i
            width = k_r * bw // 256
            stage = [DualPathBlock(channels, width, bw, inc, groups, 1 if i == 0 else 2, project=True)]
            channels = bw + 3 * inc
            for _ in range(count - 1):
                stage.append(DualPathBlock(channels, width, bw, inc, groups, 1, project=False))
                channels += inc
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.out_channels = channels

    def forward(self, x):
        return self.stages(self.stem(x))

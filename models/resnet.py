"""ResNet trunks of InsightFace's ``fresnet.py``: residual units v1 / v2 / v3 (IR), SE, inputs 0 and L.

``LResNet100E-IR`` = ``ResNetTrunk(100, version_input=1, version_unit=3)`` + embedding option E.
Depths < 101 use basic units with filters 64/128/256/512 (r100 is *not* ResNet-101); depths >= 101 use
bottleneck units with filters 256/512/1024/2048. Every stage starts with a projection unit (1x1 conv).

Units (``bn`` BatchNorm, ``act`` PReLU/ReLU, ``*`` marks the strided conv):

* v1 (original): conv-bn-act-conv-bn (+ shortcut) -> act. Input 0 strides the first conv, input L the last.
* v2 (pre-activation): bn-act, then conv*-bn-act-conv; the projection shortcut reads the pre-activated input.
* v3 (IR): bn-conv-bn-act-conv*-bn (+ shortcut), no activation after the sum.

arcface_torch's ``iresnet18/34/50/100/200`` are v3 (IR) units with basic (two 3x3 conv) units at every depth,
input L, and their own unit table (``ARCFACE_TORCH_UNITS``: iresnet200 is (6, 26, 60, 6), not fresnet's
bottleneck r200); their BN eps 1e-5 is set by ``get_backbone(variant="arcface_torch")``.

Input ``(N, 3, H, W) float32``; output ``(N, C, H/16, W/16)`` with input L (stem 3x3/1),
``(N, C, H/32, W/32)`` (rounded up) with input 0 (stem 7x7/2 + 3x3/2 max-pool).
"""
from __future__ import annotations

from torch import nn

from models.layers import SqueezeExcite, activation, batch_norm2d, conv2d

RESNET_UNITS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 49: (3, 4, 14, 3), 50: (3, 4, 14, 3), 74: (3, 6, 24, 3),
    90: (3, 8, 30, 3), 100: (3, 13, 30, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3), 200: (3, 24, 36, 3),
    269: (3, 30, 48, 8),
}
UNIT_VERSIONS = (1, 2, 3)
# arcface_torch backbones/iresnet.py: iresnetN -> units per stage (IBasicBlock at every depth).
ARCFACE_TORCH_UNITS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6),
}

# Unit bodies as op lists: "bn", "act", or (kernel, width, strided) for a conv; width "mid" is out/4 in a
# bottleneck and out otherwise. Keys: (version_unit, bottleneck, stride_on_first_conv).
_BODY = {
    (1, False, True): [(3, "out", True), "bn", "act", (3, "out", False), "bn"],
    (1, False, False): [(3, "out", False), "bn", "act", (3, "out", True), "bn"],
    (1, True, True): [(1, "mid", True), "bn", "act", (3, "mid", False), "bn", "act", (1, "out", False), "bn"],
    (1, True, False): [(1, "mid", False), "bn", "act", (3, "mid", False), "bn", "act", (1, "out", True), "bn"],
    (2, False, False): [(3, "out", True), "bn", "act", (3, "out", False)],
    (2, True, False): [(1, "mid", False), "bn", "act", (3, "mid", True), "bn", "act", (1, "out", False)],
    (3, False, False): ["bn", (3, "out", False), "bn", "act", (3, "out", True), "bn"],
    (3, True, False): ["bn", (1, "mid", False), "bn", "act", (3, "mid", False), "bn", "act", (1, "out", True), "bn"],
}


class ResidualUnit(nn.Module):
    """One residual unit: ``post_act(se(body(preact(x))) + shortcut(x))``; see the module docstring."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, version_unit: int = 3,
                 bottleneck: bool = False, version_input: int = 1, version_se: int = 0, act: str = "prelu",
                 projection: bool = True):
        super().__init__()
        if version_unit not in UNIT_VERSIONS:
            raise ValueError(f"version_unit {version_unit!r} is not supported (expected one of 1, 2, 3)")
        mid = out_channels // 4 if bottleneck else out_channels
        width = {"mid": mid, "out": out_channels}
        ops = _BODY[(version_unit, bottleneck, version_unit == 1 and version_input == 0)]
        # v2: BN-act runs before the body and feeds the projection shortcut too.
        self.preact = nn.Sequential(batch_norm2d(in_channels), activation(act, in_channels)) \
            if version_unit == 2 else nn.Identity()
        layers: list[nn.Module] = []
        channels = in_channels
        for op in ops:
            if op == "bn":
                layers.append(batch_norm2d(channels))
            elif op == "act":
                layers.append(activation(act, channels))
            else:
                kernel, w, strided = op
                layers.append(conv2d(channels, width[w], kernel, stride if strided else 1))
                channels = width[w]
        self.body = nn.Sequential(*layers)
        self.se = SqueezeExcite(out_channels, act) if version_se else nn.Identity()
        self.shortcut_from_preact = version_unit == 2
        if projection:
            sc: list[nn.Module] = [conv2d(in_channels, out_channels, 1, stride)]
            if version_unit != 2:
                sc.append(batch_norm2d(out_channels))
            self.shortcut: nn.Module | None = nn.Sequential(*sc)
        else:
            if stride != 1 or in_channels != out_channels:
                raise ValueError("an identity shortcut needs stride 1 and equal channel counts")
            self.shortcut = None
        self.post_act = activation(act, out_channels) if version_unit == 1 else nn.Identity()

    def forward(self, x):
        pre = self.preact(x)
        out = self.se(self.body(pre))
        if self.shortcut is None:
            out = out + x
        else:
            out = out + self.shortcut(pre if self.shortcut_from_preact else x)
        return self.post_act(out)


def resnet_stem(version_input: int, channels: int, act: str) -> nn.Sequential:
    """Input 0: 7x7/2 conv + BN + act + 3x3/2 max-pool; input 1 (L): 3x3/1 conv + BN + act."""
    if version_input == 0:
        return nn.Sequential(conv2d(3, channels, 7, 2), batch_norm2d(channels), activation(act, channels),
                             nn.MaxPool2d(3, 2, 1))
    if version_input == 1:
        return nn.Sequential(conv2d(3, channels, 3, 1), batch_norm2d(channels), activation(act, channels))
    raise ValueError(f"version_input {version_input!r} is not supported (expected 0 or 1)")


class ResNetTrunk(nn.Module):
    """fresnet trunk of a given depth (keys of ``RESNET_UNITS``); ``out_channels`` is 512 or 2048.

    ``units``: units per stage instead of the fresnet table's (then basic units unless ``bottleneck``),
    e.g. ``ARCFACE_TORCH_UNITS[200]``.
    """

    def __init__(self, depth: int, *, version_unit: int = 3, version_input: int = 1, version_se: int = 0,
                 act: str = "prelu", units: tuple[int, int, int, int] | None = None, bottleneck: bool | None = None):
        super().__init__()
        if units is None and depth not in RESNET_UNITS:
            raise ValueError(f"ResNet depth {depth} is not in the fresnet table "
                             f"(expected one of {', '.join(map(str, RESNET_UNITS))})")
        table = tuple(units) if units is not None else RESNET_UNITS[depth]
        if bottleneck is None:
            bottleneck = units is None and depth >= 101
        filters = (64, 256, 512, 1024, 2048) if bottleneck else (64, 64, 128, 256, 512)
        self.stem = resnet_stem(version_input, filters[0], act)
        stages = []
        channels = filters[0]
        for i, count in enumerate(table):
            stride = 1 if (i == 0 and version_input == 0) else 2
            unit_kw = dict(version_unit=version_unit, bottleneck=bottleneck, version_input=version_input,
                           version_se=version_se, act=act)
            units = [ResidualUnit(channels, filters[i + 1], stride, **unit_kw)]
            units += [ResidualUnit(filters[i + 1], filters[i + 1], 1, projection=False, **unit_kw)
                      for _ in range(count - 1)]
            stages.append(nn.Sequential(*units))
            channels = filters[i + 1]
        self.stages = nn.Sequential(*stages)
        self.out_channels = channels

    def forward(self, x):
        return self.stages(self.stem(x))


def downsampling_stem(version_input: int, channels: int, act: str) -> tuple[nn.Sequential, int]:
    """The shared input block of DPN and DenseNet (``symbol_utils.get_head``) and its output channel count.

    Input 0: as ``resnet_stem(0)`` (output H/4). Input L: 3x3/1 conv to ``min(channels, 64)`` + BN + act,
    then one IR unit with stride 2 (output H/2), so four more stride-2 stages end at 7x7 for 112x112.
    """
    if version_input == 0:
        return resnet_stem(0, channels, act), channels
    width = min(channels, 64)
    stem = resnet_stem(version_input, width, act)
    stem.append(ResidualUnit(width, width, 2, version_unit=3, act=act))
    return stem, width

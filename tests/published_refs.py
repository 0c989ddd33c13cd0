"""Small independent restatements of arcface_torch's published networks, from its structure as published
(``recognition/arcface_torch/backbones/iresnet.py`` and ``mobilefacenet.py``), used as references by the
import tests: same module names (so ``state_dict()`` has arcface_torch's keys), same layer order, torch's
default BN eps (1e-5). ``fc_scale`` (arcface_torch: 7 * 7 for 112x112) is a parameter so that tests can
use small inputs.
"""
from __future__ import annotations

import torch
from torch import nn


class IBasicBlock(nn.Module):
    """bn1 -> conv1 (3x3) -> bn2 -> prelu -> conv2 (3x3, stride) -> bn3, plus identity or downsample(x)."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    """conv1-bn1-prelu, layer1..4 (stride 2 each, downsample conv1x1+BN), bn2-flatten-dropout-fc-features."""

    def __init__(self, layers, num_features=512, fc_scale=7 * 7, fp16=False):
        super().__init__()
        self.fp16 = fp16
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-05)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        self.bn2 = nn.BatchNorm2d(512, eps=1e-05)
        self.dropout = nn.Dropout(p=0.0, inplace=True)
        self.fc = nn.Linear(512 * fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

    def _make_layer(self, planes, blocks):
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, 2, bias=False), nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x.float() if self.fp16 else x))


class ConvBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c), nn.PReLU(out_c))

    def forward(self, x):
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, in_c, out_c, kernel=1, stride=1, padding=0, groups=1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c))

    def forward(self, x):
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, in_c, out_c, residual=False, stride=2, groups=1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(in_c, groups), ConvBlock(groups, groups, 3, stride, 1, groups=groups),
                                    LinearBlock(groups, out_c))

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    def __init__(self, c, num_block, groups):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, 1, groups) for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embedding_size, kernel=7):
        super().__init__()
        self.layers = nn.Sequential(LinearBlock(512, 512, kernel, groups=512), nn.Flatten(),
                                    nn.Linear(512, embedding_size, bias=False), nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """arcface_torch's ``get_mbf`` (blocks (1, 4, 6, 2), scale 2) and ``get_mbf_large`` ((2, 8, 12, 4), scale 4)."""

    def __init__(self, num_features=512, blocks=(1, 4, 6, 2), scale=2, gdc_kernel=7):
        super().__init__()
        s = scale
        self.layers = nn.ModuleList([ConvBlock(3, 64 * s, 3, 2, 1)])
        self.layers.append(ConvBlock(64 * s, 64 * s, 3, 1, 1, groups=64) if blocks[0] == 1
                           else Residual(64 * s, blocks[0], 128))
        self.layers.extend([
            DepthWise(64 * s, 64 * s, groups=128), Residual(64 * s, blocks[1], 128),
            DepthWise(64 * s, 128 * s, groups=256), Residual(128 * s, blocks[2], 256),
            DepthWise(128 * s, 128 * s, groups=512), Residual(128 * s, blocks[3], 256),
        ])
        self.conv_sep = ConvBlock(128 * s, 512)
        self.features = GDC(num_features, gdc_kernel)

    def forward(self, x):
        for f in self.layers:
            x = f(x)
        return self.features(self.conv_sep(x))


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BN statistics of moderate scale (so that every tensor and each BN eps matters, and
    activations stay finite through the depth); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) * 0.2 + 0.05)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)
            elif t.dim() == 1:  # BN scales and PReLU slopes
                t.copy_(torch.rand(t.shape, generator=gen) * 0.2 + 0.1)
            else:
                t.copy_(torch.randn(t.shape, generator=gen) / t[0].numel() ** 0.5)
    return module.eval()

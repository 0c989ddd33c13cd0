"""Building blocks shared by every backbone: BN with MXNet settings, activations, conv-BN-act, SE.

InsightFace's MXNet symbols use ``BatchNorm(eps=2e-5, momentum=0.9)``; MXNet's momentum is the weight
of the *old* running value, PyTorch's the weight of the *new* one, so 0.9 there is 0.1 here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

BN_EPS = 2e-5
BN_MOMENTUM = 0.1
ACTIVATIONS = ("prelu", "relu")


def batch_norm2d(channels: int) -> nn.BatchNorm2d:
    """``BatchNorm2d`` with InsightFace's eps 2e-5 and momentum 0.1 (MXNet 0.9)."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class FixedGammaBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` on ``(N, C)`` whose scale is fixed at 1 (MXNet ``fix_gamma=True``).

    Only the shift ``bias`` is learned; ``weight`` is a buffer of ones (so it keeps the state-dict
    key of an ordinary BatchNorm1d but cannot be trained or decayed by accident).
    """

    def __init__(self, num_features: int):
        super().__init__(num_features, eps=BN_EPS, momentum=BN_MOMENTUM, affine=True)
        del self.weight
        self.register_buffer("weight", torch.ones(num_features))


def activation(kind: str, channels: int) -> nn.Module:
    """``prelu`` (one slope per channel, init 0.25 as MXNet) or ``relu``."""
    if kind == "prelu":
        return nn.PReLU(channels)
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"activation {kind!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")


def conv2d(in_channels: int, out_channels: int, kernel: int | tuple[int, int], stride: int = 1,
           groups: int = 1, padding: int | tuple[int, int] | None = None) -> nn.Conv2d:
    """Bias-free convolution (a BN always follows); ``padding`` defaults to 'same' for odd kernels."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if padding is None:
        padding = (kh // 2, kw // 2)
    return nn.Conv2d(in_channels, out_channels, (kh, kw), stride=stride, padding=padding, groups=groups, bias=False)


class ConvBNAct(nn.Sequential):
    """Conv -> BN -> activation (``act=None``: no activation, a 'linear' block)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int] = 1, stride: int = 1,
                 groups: int = 1, act: str | None = "prelu", padding: int | tuple[int, int] | None = None):
        layers: list[nn.Module] = [conv2d(in_channels, out_channels, kernel, stride, groups, padding),
                                   batch_norm2d(out_channels)]
        if act is not None:
            layers.append(activation(act, out_channels))
        super().__init__(*layers)


class BNActConv(nn.Sequential):
    """BN -> activation -> conv, the pre-activation order of DPN and DenseNet."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 act: str = "relu"):
        super().__init__(batch_norm2d(in_channels), activation(act, in_channels),
                         conv2d(in_channels, out_channels, kernel, stride, groups))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as in fresnet: avg-pool -> 1x1 conv (C/16) -> act -> 1x1 conv (C) -> sigmoid -> scale."""

    def __init__(self, channels: int, act: str = "prelu", reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            activation(act, hidden),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


def init_weights(module: nn.Module) -> None:
    """arcface_torch-style init: kaiming-normal (fan_out, relu) convs, BN scale 1 / shift 0, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if isinstance(m.weight, nn.Parameter):
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def output_shape(module: nn.Module, input_shape: Sequence[int]) -> torch.Size:
    """Shape of ``module(x)`` for ``x`` of ``input_shape``, found on the meta device (no compute, no memory)."""
    state = {name: t.to("meta") for name, t in [*module.named_parameters(), *module.named_buffers()]}
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = torch.func.functional_call(module, state, (torch.empty(*input_shape, device="meta"),))
    finally:
        module.train(was_training)
    return out.shape

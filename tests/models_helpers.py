"""Helpers shared by the models tests (not a test module)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, image_size=(112, 112), batch: int = 2, seed: int = 0) -> nn.Module:
    """Set every BN's running statistics from one random batch, then switch to eval mode.

    A freshly initialised deep network in eval mode has running mean 0 / variance 1 everywhere, so its
    activations grow through the residual sums; calibrated BNs keep eval outputs of order 1, which makes
    absolute tolerances (ONNX, channels_last) meaningful.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one batch gives its exact statistics
    model.train()
    gen = torch.Generator().manual_seed(seed)
    model(torch.randn(batch, 3, *image_size, generator=gen))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()

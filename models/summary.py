"""Model size and compute: parameters, fp32 size, multiply-accumulates (MACs) and FLOPs of one forward pass.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; BN,
activations and pooling are not counted, they add well under 1 % for these networks). Note the
naming: *face-recognition papers and arcface_torch report MACs and call them "FLOPs"* —
arcface_torch's "r50 6.3 GFLOPs", "r100 12.1 GFLOPs" and "mobilefacenet 0.45 G" are GMACs
(ptflops). Here ``macs`` are MACs and ``gflops = 2 * macs / 1e9``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def summarize(model: nn.Module, image_size: Sequence[int] = (112, 112)) -> dict:
    """``{"params", "size_mb", "macs", "gflops"}`` for one ``(1, 3, H, W)`` image.

    ``params``: trainable and frozen parameters (buffers excluded); ``size_mb``: ``params * 4 bytes / 2**20``
    (MiB in float32); ``macs``: multiply-accumulates of one forward pass; ``gflops``: ``2 * macs / 1e9``.
    The model is run once in eval mode on the device of its parameters, without gradients.
    """
    h, w = (int(v) for v in image_size)
    params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, h, w, device=device))
    finally:
        model.train(was_training)
    flops = counter.get_total_flops()
    return {"params": params, "size_mb": params * 4 / 2**20, "macs": flops // 2, "gflops": flops / 1e9}

"""Torch networks of facepipe: backbones, embedding outputs, margin heads, triplet losses, Partial FC.

A training step (single process or one rank of torchrun; wrap only the backbone in DDP)::

    backbone = get_backbone("r100")                  # (N, 3, 112, 112) normalised -> (N, 512)
    head = get_margin("arcface")                     # or 4, "cosface", "combined", "adaface", ...
    pfc = PartialFC(head, backbone.emb_size, num_classes, sample_rate=0.2)
    loss = pfc(backbone(images), labels)             # same value on every rank
    loss.backward(); optimizer.step(); head.step()   # step(): SphereFace's annealing

Imports torch only (never datasets, tasks, flows or prefect).
"""
from __future__ import annotations

from models.backbone import Backbone, get_backbone, network_codes
from models.margins import MarginHead, get_margin
from models.partial_fc import PartialFC, gather_shards, memory_per_rank, shard_bounds, shard_rows
from models.summary import summarize
from models.triplet import TripletLoss, semi_hard_triplets, triplet_layout_loss

__all__ = [
    "Backbone", "get_backbone", "network_codes", "MarginHead", "get_margin", "PartialFC", "gather_shards",
    "memory_per_rank", "shard_bounds", "shard_rows", "summarize", "TripletLoss", "semi_hard_triplets",
    "triplet_layout_loss",
]

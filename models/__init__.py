"""Torch networks of facepipe: backbones, embedding outputs, margin heads, triplet losses, Partial FC.

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

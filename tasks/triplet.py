"""Triplet fine-tuning (InsightFace loss type 12 / ``train_triplet.py``; formats-spec section 7).

A run with ``loss: triplet`` fine-tunes a trained embedding network (``pretrained``) with FaceNet's
semi-hard triplets, mined online in each batch (:class:`models.TripletLoss`): batches hold
``per_batch_size / images_per_identity`` identities x ``images_per_identity`` images
(:class:`datasets.samplers.IdentityBalancedSampler`, 5 images per identity as in 2018), and every
anchor/positive pair gets a random negative with ``d(a,p) < d(a,n) < d(a,p) + alpha`` (squared
distances of L2-normalised embeddings). There is no classifier.

Seed defaults (``configs/m1-triplet.yaml``): lr 0.005, momentum 0, wd 5e-4, per-batch-size 150 per
GPU, alpha 0.3. Difference from 2018: mining runs on the training batch itself instead of a separate
3600-image "bag" embedded in inference mode, so no extra forward passes are needed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Sampler

from datasets.samplers import IdentityBalancedSampler
from models.triplet import TripletLoss
from tasks.objectives import Objective, step_generator
from tasks.train_config import TrainConfig

__all__ = ["TripletObjective", "TRIPLET_DEFAULTS"]

#: The seed's fine-tuning recipe (README 2018: lr 0.005, momentum 0, per-batch-size 150, alpha 0.3).
TRIPLET_DEFAULTS = {"lr": 0.005, "mom": 0.0, "wd": 5e-4, "per_batch_size": 150, "triplet_alpha": 0.3,
                    "images_per_identity": 5}


class TripletObjective(Objective):
    """Online semi-hard triplet loss over identity-balanced batches; one sampler unit = one batch."""

    name = "triplet"
    units_per_step = 1

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.seed = cfg.seed
        self.criterion = TripletLoss(alpha=cfg.triplet_alpha, max_ap=cfg.triplet_max_ap)
        self.generator = torch.Generator()
        self.rank = 0

    def make_sampler(self, dataset, seed: int, rank: int, world_size: int) -> Sampler:
        self.rank = rank
        return IdentityBalancedSampler(dataset.labels, self.cfg.per_batch_size // self.cfg.images_per_identity,
                                       self.cfg.images_per_identity, seed=seed, rank=rank, world_size=world_size)

    def loader_args(self, sampler: Sampler, per_batch_size: int) -> dict[str, Any]:
        return {"batch_sampler": sampler}

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        if self.generator.device != embeddings.device:  # the negatives are drawn where the distances are
            self.generator = torch.Generator(device=embeddings.device)
        generator = step_generator(self.generator, self.seed, step, self.rank, stream=3)
        return self.criterion(embeddings, labels.to(embeddings.device), generator=generator)

    def step_metrics(self) -> dict[str, float]:
        return {"triplets": float(self.criterion.last_triplet_count)}

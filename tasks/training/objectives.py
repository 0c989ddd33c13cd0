"""Training objectives: what a step's loss is, how its batches are drawn, and what state it keeps.

* :class:`ClassifierObjective`: margin-softmax losses (loss types 0-5 and the newer heads) through
  :class:`models.PartialFC`: the class centres are sharded over ranks and, with ``sample_rate < 1``,
  sampled per step; batches come from :class:`datasets.samplers.ShuffleSampler`.
* :class:`TripletObjective`: FaceNet's semi-hard triplets (InsightFace loss type 12 /
  ``train_triplet.py``; formats-spec section 7) in identity-balanced batches; see its docstring.

Randomness that must survive a resume without replaying the run (Partial FC's centre sampling, the
triplet negative choice, the mirror mask) is drawn from generators re-seeded every step from
``(seed, step, rank)``; see :func:`step_generator`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Sampler

from datasets.samplers import IdentityBalancedSampler, ShuffleSampler
from models.margins import get_margin
from models.partial_fc import PartialFC
from models.triplet import TripletLoss
from tasks.training.config import TrainConfig

__all__ = ["Objective", "ClassifierObjective", "TripletObjective", "TRIPLET_DEFAULTS", "make_objective", "step_seed",
           "step_generator"]


def step_seed(seed: int, step: int, rank: int, stream: int) -> int:
    """A 63-bit seed for random stream ``stream`` of ``step`` on ``rank`` (independent of run history)."""
    return int(np.random.SeedSequence([seed, stream, step, rank]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def step_generator(generator: torch.Generator, seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    """``generator`` re-seeded with :func:`step_seed`."""
    generator.manual_seed(step_seed(seed, step, rank, stream))
    return generator


class Objective:
    """Interface of a training objective (see the module docstring)."""

    name = "objective"
    #: sampler position units handed out per step on one rank (images, or batches for batch samplers)
    units_per_step = 1
    #: parameters trained besides the backbone, and which of them are sharded (param -> number of rows)
    module: nn.Module | None = None
    sharded: dict[nn.Parameter, int] = {}

    def make_sampler(self, dataset, seed: int, rank: int, world_size: int) -> Sampler:
        raise NotImplementedError

    def loader_args(self, sampler: Sampler, per_batch_size: int) -> dict[str, Any]:
        raise NotImplementedError

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self) -> None:
        """Advance per-step state (SphereFace's annealing)."""

    def param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        return []

    def head_state(self) -> dict[str, Any] | None:
        """Full (gathered) head state for a checkpoint; collective on every rank."""
        return None

    def load_head_state(self, state: dict[str, Any] | None, source: str) -> bool:
        """Load a checkpoint's head; False when it does not fit (the head then starts fresh)."""
        return False

    def step_metrics(self) -> dict[str, float]:
        return {}


class ClassifierObjective(Objective):
    """Margin softmax over ``num_classes`` identities with a (sharded, sampled) Partial FC classifier."""

    units_per_step = 0  # set to per_batch_size

    def __init__(self, cfg: TrainConfig, emb_size: int, num_classes: int, device: torch.device):
        self.name = cfg.loss
        self.seed = cfg.seed
        self.margin = get_margin(cfg.loss, num_classes=num_classes, **cfg.margin_args())
        self.generator = torch.Generator(device=device)
        self.pfc = PartialFC(self.margin, emb_size, num_classes, sample_rate=cfg.sample_rate,
                             generator=self.generator, bias=False if cfg.fc7_no_bias else None).to(device)
        self.module = self.pfc
        self.sharded = {self.pfc.weight: num_classes}
        if self.pfc.bias is not None:
            self.sharded[self.pfc.bias] = num_classes
        self.units_per_step = cfg.per_batch_size
        self.num_classes = num_classes

    def make_sampler(self, dataset, seed: int, rank: int, world_size: int) -> Sampler:
        return ShuffleSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)

    def loader_args(self, sampler: Sampler, per_batch_size: int) -> dict[str, Any]:
        return {"sampler": sampler, "batch_size": per_batch_size, "drop_last": True}

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        step_generator(self.generator, self.seed, step, self.pfc.rank, stream=2)
        return self.pfc(embeddings, labels)

    def after_step(self) -> None:
        self.margin.step()

    def param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        groups = [{"params": [self.pfc.weight], "lr": cfg.lr * cfg.fc7_lr_mult, "weight_decay": cfg.wd * cfg.fc7_wd_mult,
                   "name": "classifier"}]  # 2018 fc7_weight lr_mult / wd_mult
        if self.pfc.bias is not None:  # 2018 softmax: fc7 bias with lr x2 and no weight decay
            groups.append({"params": [self.pfc.bias], "lr": 2 * cfg.lr, "weight_decay": 0.0, "name": "classifier_bias"})
        return groups

    def head_state(self) -> dict[str, Any]:
        weight = self.pfc.full_weight().cpu()
        bias = self.pfc.full_bias()
        return {"weight": weight, "bias": None if bias is None else bias.cpu(),
                "margin": {k: v.detach().cpu() for k, v in self.margin.state_dict().items()},
                "loss": self.name}

    def load_head_state(self, state: dict[str, Any] | None, source: str) -> bool:
        if not state or state.get("weight") is None:
            return False
        weight = state["weight"]
        if tuple(weight.shape) != (self.num_classes, self.pfc.emb_size):
            return False
        bias = state.get("bias")
        if (bias is None) != (self.pfc.bias is None):
            return False
        device = self.pfc.weight.device
        self.pfc.load_full_weight(weight.to(device), None if bias is None else bias.to(device))
        if state.get("loss") == self.name and state.get("margin"):
            self.margin.load_state_dict({k: v.to(device) for k, v in state["margin"].items()})
        return True


#: The seed's fine-tuning recipe (README 2018: lr 0.005, momentum 0, per-batch-size 150, alpha 0.3).
TRIPLET_DEFAULTS = {"lr": 0.005, "mom": 0.0, "wd": 5e-4, "per_batch_size": 150, "triplet_alpha": 0.3,
                    "images_per_identity": 5}


class TripletObjective(Objective):
    """Online semi-hard triplet loss over identity-balanced batches; one sampler unit = one batch.

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


def make_objective(cfg: TrainConfig, emb_size: int, num_classes: int, device: torch.device) -> Objective:
    """The objective of ``cfg.loss``."""
    if cfg.is_triplet:
        return TripletObjective(cfg)
    return ClassifierObjective(cfg, emb_size, num_classes, device)

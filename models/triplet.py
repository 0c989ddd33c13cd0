"""Triplet losses for fine-tuning (InsightFace loss type 12 / ``train_triplet.py``, FaceNet semi-hard mining).

Distances are *squared* Euclidean distances between L2-normalised embeddings (``2 - 2 cos``).

* ``semi_hard_triplets`` / ``TripletLoss``: online mining inside an identity-balanced batch. For every
  anchor/positive pair (a before p, same identity), the candidate negatives are the other identities'
  embeddings with ``d(a,p) < d(a,n) < d(a,p) + alpha``; one is drawn at random, pairs without a candidate
  are dropped. ``max_ap > 0`` also drops pairs with ``d(a,p) > max_ap`` (``triplet_max_ap``).
* ``triplet_layout_loss``: a batch already arranged as ``[anchors | positives | negatives]``, each N/3 long.

Both return ``mean(max(0, d(a,p) - d(a,n) + alpha))``; ``angular=True`` uses ``arccos(a.p) - arccos(a.n)``
instead (2018 type 13 / 2019 ``atriplet``, margin 0.35 there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ALPHA = 0.3


def _pair_terms(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, angular: bool):
    if angular:
        eps = 1e-6
        ap = torch.acos((anchor * positive).sum(1).clamp(-1 + eps, 1 - eps))
        an = torch.acos((anchor * negative).sum(1).clamp(-1 + eps, 1 - eps))
        return ap, an
    return (anchor - positive).pow(2).sum(1), (anchor - negative).pow(2).sum(1)


def triplet_layout_loss(embeddings: torch.Tensor, alpha: float = ALPHA, angular: bool = False) -> torch.Tensor:
    """Loss of a batch ``(3T, D)`` laid out as ``[anchors (T) | positives (T) | negatives (T)]``; embeddings
    are L2-normalised here. Returns a 0-d float32 tensor."""
    if embeddings.dim() != 2 or embeddings.shape[0] % 3:
        raise ValueError(f"triplet layout needs a (3T, D) batch [anchors|positives|negatives], "
                         f"got shape {tuple(embeddings.shape)} (batch size must be divisible by 3)")
    e = F.normalize(embeddings.float(), dim=1)
    a, p, n = e.chunk(3)
    ap, an = _pair_terms(a, p, n, angular)
    return (ap - an + alpha).clamp_min(0).mean()


@torch.no_grad()
def semi_hard_triplets(embeddings: torch.Tensor, labels: torch.Tensor, alpha: float = ALPHA, max_ap: float = 0.0,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FaceNet semi-hard selection in a batch ``(N, D)`` with identity ``labels (N,)``.

    Returns index tensors ``(anchors, positives, negatives)``, each ``(T,) int64``, in pair order.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"semi-hard mining needs embeddings (N, D) and labels (N,), "
                         f"got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    e = F.normalize(embeddings.float(), dim=1)
    dist = (2.0 - 2.0 * e @ e.T).clamp_min(0)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    n = labels.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=e.device).triu(1)
    pairs = (same & upper).nonzero()
    if max_ap > 0:
        pairs = pairs[dist[pairs[:, 0], pairs[:, 1]] <= max_ap]
    a, p = pairs[:, 0], pairs[:, 1]
    d_ap = dist[a, p].unsqueeze(1)
    d_an = dist[a]
    candidates = (~same[a]) & (d_an > d_ap) & (d_an < d_ap + alpha)
    keep = candidates.any(1)
    a, p, candidates = a[keep], p[keep], candidates[keep]
    # One random candidate per pair: the largest random key among the allowed columns.
    keys = torch.rand(candidates.shape, generator=generator, device=e.device if generator is None else generator.device)
    neg = torch.where(candidates, keys, torch.full_like(keys, -1.0)).argmax(1)
    return a, p, neg


class TripletLoss(nn.Module):
    """Online semi-hard triplet loss: ``forward(embeddings (N, D), labels (N,)) -> 0-d float32``.

    The batch should hold several images per identity (identity-balanced, e.g. 5 per identity). If no
    semi-hard triplet exists the loss is 0 (still connected to the graph). ``last_triplet_count`` records
    how many triplets the last call used.
    """

    def __init__(self, alpha: float = ALPHA, max_ap: float = 0.0, angular: bool = False):
        super().__init__()
        self.alpha, self.max_ap, self.angular = float(alpha), float(max_ap), bool(angular)
        self.last_triplet_count = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        a, p, n = semi_hard_triplets(embeddings, labels, self.alpha, self.max_ap, generator)
        self.last_triplet_count = int(a.numel())
        e = F.normalize(embeddings.float(), dim=1)
        if a.numel() == 0:
            return e.sum() * 0.0
        ap, an = _pair_terms(e[a], e[p], e[n], self.angular)
        return (ap - an + self.alpha).clamp_min(0).mean()

"""Triplet losses: semi-hard mining against a brute-force loop, the [anchors|positives|negatives] layout loss."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.triplet import TripletLoss, semi_hard_triplets, triplet_layout_loss


def _batch(identities=6, per_identity=5, dim=16, seed=0):
    """Identity-balanced batch: noisy copies of one random centre per identity."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(identities, dim, generator=g)
    labels = torch.arange(identities).repeat_interleave(per_identity)
    emb = centres[labels] + 0.9 * torch.randn(len(labels), dim, generator=g)
    return emb, labels


def _brute_force(emb, labels, alpha, max_ap=0.0):
    e = F.normalize(emb, dim=1)
    d = lambda i, j: float(((e[i] - e[j]) ** 2).sum())  # noqa: E731
    pairs = {}
    n = len(labels)
    for a in range(n):
        for p in range(a + 1, n):
            if labels[a] != labels[p]:
                continue
            ap = d(a, p)
            if max_ap > 0 and ap > max_ap:
                continue
            cands = {j for j in range(n) if labels[j] != labels[a] and ap < d(a, j) < ap + alpha}
            if cands:
                pairs[(a, p)] = cands
    return pairs


@pytest.mark.parametrize("alpha, max_ap", [(0.3, 0.0), (0.5, 1.2)])
def test_semi_hard_selection_matches_brute_force(alpha, max_ap):
    emb, labels = _batch()
    expected = _brute_force(emb, labels, alpha, max_ap)
    assert expected, "the synthetic batch should contain semi-hard triplets"
    a, p, n = semi_hard_triplets(emb, labels, alpha, max_ap, generator=torch.Generator().manual_seed(1))
    got = list(zip(a.tolist(), p.tolist(), n.tolist()))
    assert {(x, y) for x, y, _ in got} == set(expected)
    for x, y, z in got:
        assert z in expected[(x, y)]


def test_negative_choice_is_random_among_candidates():
    emb, labels = _batch(seed=2)
    expected = _brute_force(emb, labels, 0.3)
    pair = max(expected, key=lambda k: len(expected[k]))
    seen = set()
    for seed in range(40):
        a, p, n = semi_hard_triplets(emb, labels, 0.3, generator=torch.Generator().manual_seed(seed))
        row = [(x, y) for x, y in zip(a.tolist(), p.tolist())].index(pair)
        seen.add(int(n[row]))
    assert len(seen) > 1 and seen <= expected[pair]


def test_triplet_loss_value_and_gradient():
    emb, labels = _batch(seed=3)
    emb.requires_grad_()
    loss_fn = TripletLoss(alpha=0.3)
    gen = torch.Generator().manual_seed(0)
    loss = loss_fn(emb, labels, generator=gen)
    a, p, n = semi_hard_triplets(emb, labels, 0.3, generator=torch.Generator().manual_seed(0))
    e = F.normalize(emb.detach(), dim=1)
    manual = ((e[a] - e[p]).pow(2).sum(1) - (e[a] - e[n]).pow(2).sum(1) + 0.3).clamp_min(0).mean()
    assert loss_fn.last_triplet_count == len(a) > 0
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)
    loss.backward()
    assert emb.grad.abs().sum() > 0 and torch.isfinite(emb.grad).all()


def test_no_semi_hard_triplet_gives_zero_connected_loss():
    labels = torch.tensor([0, 0, 1, 1])
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    loss = TripletLoss()(emb, labels)
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None


def test_layout_loss_and_its_errors():
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(12, 8, generator=g)
    e = F.normalize(emb, dim=1)
    a, p, n = e[:4], e[4:8], e[8:]
    expected = ((a - p).pow(2).sum(1) - (a - n).pow(2).sum(1) + 0.3).clamp_min(0).mean()
    assert triplet_layout_loss(emb).item() == pytest.approx(expected.item(), rel=1e-6)
    angular = (torch.acos((a * p).sum(1)) - torch.acos((a * n).sum(1)) + 0.35).clamp_min(0).mean()
    assert triplet_layout_loss(emb, 0.35, angular=True).item() == pytest.approx(angular.item(), rel=1e-5)
    with pytest.raises(ValueError, match="divisible by 3"):
        triplet_layout_loss(torch.randn(10, 8))
    assert 0 <= triplet_layout_loss(emb.to(torch.bfloat16)).item() < 4 + math.ulp(4.0)

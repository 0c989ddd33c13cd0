"""Margin heads against the formulas of the 2018/2019 InsightFace scripts and the CurricularFace/AdaFace papers,
written out element by element here; gradcheck in float64; float32 under autocast; finite at cos = +-1."""
from __future__ import annotations

import math

import pytest
import torch

from models.margins import (AdaFace, ArcFace, CombinedMargin, CosFace, CurricularFace, Softmax, SphereFace,
                            get_margin)

HEAD_NAMES = ["softmax", "sphereface", "cosface", "arcface", "combined", "nsoftmax", "curricularface", "adaface"]


def _case(n=6, c=9, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cos = (torch.rand(n, c, generator=g, dtype=dtype) * 2 - 1) * 0.98
    labels = torch.randint(0, c, (n,), generator=g)
    labels[2] = -1
    norms = torch.rand(n, generator=g, dtype=dtype) * 30 + 5
    return cos, labels, norms


def _elementwise(cos, labels, target_fn, scale):
    """Expected output: ``scale * cos`` with ``target_fn(cos_y)`` in each labelled target cell."""
    out = cos.clone()
    for i, y in enumerate(labels.tolist()):
        if y >= 0:
            out[i, y] = target_fn(float(cos[i, y]))
    return out * scale


def test_softmax_is_identity_on_plain_logits():
    logits = torch.randn(4, 7) * 10
    head = get_margin(0)
    assert isinstance(head, Softmax) and head.normalized is False
    assert torch.equal(head(logits, torch.tensor([0, 1, -1, 6])), logits)


def test_cosface():
    cos, labels, _ = _case()
    out = get_margin("cosface")(cos, labels)
    torch.testing.assert_close(out, _elementwise(cos, labels, lambda c: c - 0.35, 64.0))


@pytest.mark.parametrize("easy", [False, True])
def test_arcface_2018_with_linear_continuation(easy):
    cos, labels, _ = _case()
    cos[0, labels[0]] = -0.95  # theta + m > pi: the 2018 fallback cos - m sin m
    cos[1, labels[1]] = -0.2   # negative cosine: easy margin leaves it alone
    m = 0.5

    def target(c):
        theta = math.acos(c)
        if easy:
            return math.cos(theta + m) if c > 0 else c
        return math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)

    out = get_margin("arcface", easy_margin=easy)(cos, labels)
    torch.testing.assert_close(out, _elementwise(cos, labels, target, 64.0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name, m1, m2, m3", [("combined", 1.0, 0.3, 0.2), ("nsoftmax", 1.0, 0.0, 0.0)])
def test_combined_presets(name, m1, m2, m3):
    cos, labels, _ = _case()
    out = get_margin(name)(cos, labels)
    expected = _elementwise(cos, labels, lambda c: math.cos(m1 * math.acos(c) + m2) - m3, 64.0)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


def test_combined_insightface_option_names():
    head = get_margin(5, margin_a=0.9, margin_m=0.4, margin_b=0.15, margin_s=30)
    assert (head.s, head.m1, head.m2, head.m3) == (30.0, 0.9, 0.4, 0.15)
    cos, labels, _ = _case()
    expected = _elementwise(cos, labels, lambda c: math.cos(0.9 * math.acos(c) + 0.4) - 0.15, 30.0)
    torch.testing.assert_close(head(cos, labels), expected, rtol=1e-5, atol=1e-4)


def test_sphereface_lsoftmax_target_and_beta_schedule():
    head = get_margin("sphereface")
    cos, labels, norms = _case()
    for t, beta in [(0, 1000.0), (1, 1000.0 / 1.12), (10, 1000.0 / 2.2), (10_000, 5.0)]:
        head.iteration.fill_(t)
        assert head.beta().item() == pytest.approx(beta, rel=1e-6)

        def target(c, beta=beta):
            theta = math.acos(c)
            k = math.floor(4 * theta / math.pi)
            psi = (-1) ** k * math.cos(4 * theta) - 2 * k
            return (psi + beta * c) / (1 + beta)

        expected = _elementwise(cos, labels, target, 1.0) * norms.unsqueeze(1)
        torch.testing.assert_close(head(cos, labels, norms), expected, rtol=1e-5, atol=1e-4)
    head.iteration.zero_()
    head.step()
    assert int(head.iteration) == 1


def test_sphereface_large_dataset_rule_and_freeze():
    head = get_margin(1, num_classes=85742)
    assert (head.beta_freeze, head.gamma) == (5000, 0.06)
    head.iteration.fill_(5000)
    assert head.beta().item() == 1000.0
    head.iteration.fill_(5010)
    assert head.beta().item() == pytest.approx(1000.0 / (1 + 0.06 * 10))
    assert get_margin(1, num_classes=1000).beta_freeze == 0


def test_sphereface_needs_norms():
    cos, labels, _ = _case()
    with pytest.raises(ValueError, match="needs the embedding norms"):
        SphereFace()(cos, labels)


def _curricular_reference(cos, labels, t, m=0.5, s=64.0, momentum=0.01):
    """CurricularFace as published (HuangYG123/CurricularFace head/metrics.py), rows with a target only."""
    out = cos.clone()
    rows = [i for i, y in enumerate(labels.tolist()) if y >= 0]
    targets = torch.tensor([float(cos[i, labels[i]]) for i in rows])
    t = momentum * targets.mean().item() + (1 - momentum) * t
    for i in rows:
        y = int(labels[i])
        c = float(cos[i, y])
        ctm = math.cos(math.acos(c) + m)
        final = ctm if c > math.cos(math.pi - m) else c - math.sin(math.pi - m) * m
        for j in range(cos.shape[1]):
            if j != y and float(cos[i, j]) > ctm:
                out[i, j] = cos[i, j] * (t + cos[i, j])
        out[i, y] = final
    return out * s, t


def test_curricularface_reweights_hard_negatives_and_tracks_t():
    cos, labels, _ = _case(n=8, c=5, seed=3)
    head = CurricularFace().train()
    t = 0.0
    for _ in range(3):
        expected, t = _curricular_reference(cos, labels, t)
        torch.testing.assert_close(head(cos, labels), expected, rtol=1e-5, atol=1e-4)
        assert head.t.item() == pytest.approx(t, rel=1e-5)
    head.eval()
    head(cos, labels)
    assert head.t.item() == pytest.approx(t, rel=1e-5)  # frozen in eval mode
    torch.testing.assert_close(head(cos, labels)[2], cos[2] * 64.0)  # no target here: row untouched


def test_curricularface_with_target_logit_reweights_rows_without_local_target():
    cos, labels, _ = _case(n=4, c=6, seed=5)
    full = CurricularFace().train()
    expected = full(cos, labels.clamp_min(0))
    shard = CurricularFace().train()
    local = labels.clamp_min(0).clone()
    target_logit = cos.gather(1, local.unsqueeze(1)).squeeze(1)
    local[0] = -1  # row 0's target lives in another shard
    got = shard(cos, local, target_logit=target_logit)
    keep = torch.ones_like(cos, dtype=torch.bool)
    keep[0, labels.clamp_min(0)[0]] = False
    torch.testing.assert_close(got[keep], expected[keep])


def test_adaface_matches_reference_and_updates_statistics():
    cos, labels, norms = _case(n=8, c=5, seed=4)
    head = AdaFace().train()
    out = head(cos, labels, norms)
    mean = 0.01 * norms.mean().item() + 0.99 * 20.0
    std = 0.01 * norms.std().item() + 0.99 * 100.0
    assert head.batch_mean.item() == pytest.approx(mean, rel=1e-5)
    assert head.batch_std.item() == pytest.approx(std, rel=1e-5)
    clamped = cos.clamp(-1 + 1e-3, 1 - 1e-3)
    expected = clamped.clone()
    for i, y in enumerate(labels.tolist()):
        if y < 0:
            continue
        g = max(-1.0, min(1.0, (float(norms[i]) - mean) / (std + 1e-3) * 0.333))
        theta = min(max(math.acos(float(clamped[i, y])) - 0.4 * g, 1e-3), math.pi - 1e-3)
        expected[i, y] = math.cos(theta) - (0.4 + 0.4 * g)
    torch.testing.assert_close(out, expected * 64.0, rtol=1e-5, atol=1e-4)
    head.eval()
    head(cos, labels, norms)
    assert head.batch_mean.item() == pytest.approx(mean, rel=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_rows_without_target_are_only_scaled(name):
    cos, labels, norms = _case()
    head = get_margin(name)
    out = head(cos, labels, norms)
    row = out[2] / cos[2] if name != "adaface" else out[2] / cos[2].clamp(-1 + 1e-3, 1 - 1e-3)
    assert torch.allclose(row, row[0].expand_as(row), rtol=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_gradcheck_float64(name):
    cos, labels, norms = _case(n=4, c=5, seed=1, dtype=torch.float64)
    cos[0, labels[0]] = -0.9  # exercise the ArcFace fallback branch
    cos = cos.requires_grad_()
    # SphereFace's logits are ||x|| cos: the norms are differentiable inputs. AdaFace uses them as a
    # detached quality signal (as the original does), the others ignore them.
    norms = norms.requires_grad_(name == "sphereface")
    head = get_margin(name, s=2.0) if name not in ("softmax", "sphereface") else get_margin(name)
    head.eval()  # running statistics frozen so that repeated evaluations agree
    if name == "sphereface":
        head.iteration.fill_(20)
    assert torch.autograd.gradcheck(lambda c, n: head(c, labels, n), (cos, norms), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_float32_under_bf16_autocast(name):
    cos, labels, norms = _case()
    head = get_margin(name).eval()
    reference = head(cos, labels, norms)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(cos.to(torch.bfloat16), labels, norms.to(torch.bfloat16))
    assert out.dtype == torch.float32
    # inputs were rounded to bf16 (8 bits of mantissa); the margin itself ran in float32
    assert torch.allclose(out, reference, rtol=0.03, atol=0.05 * reference.abs().max().item())


@pytest.mark.parametrize("name", HEAD_NAMES)
def test_finite_at_plus_and_minus_one(name):
    cos = torch.tensor([[1.0, -1.0, 0.2], [-1.0, 1.0, 0.0], [1.0, 1.0, -1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 2])
    norms = torch.tensor([10.0, 20.0, 30.0], requires_grad=True)
    out = get_margin(name).train()(cos, labels, norms)
    (out * torch.arange(1.0, 10.0).view(3, 3)).sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(cos.grad).all()
    assert (norms.grad is not None) == (name == "sphereface")
    assert norms.grad is None or torch.isfinite(norms.grad).all()


def test_get_margin_names_numbers_and_errors():
    assert isinstance(get_margin("amsoftmax"), CosFace)
    assert isinstance(get_margin("4"), ArcFace) and isinstance(get_margin(2), CosFace)
    assert isinstance(get_margin("AdaFace"), AdaFace)
    nsoftmax = get_margin("nsoftmax")
    assert isinstance(nsoftmax, CombinedMargin) and (nsoftmax.m1, nsoftmax.m2, nsoftmax.m3) == (1, 0, 0)
    assert get_margin(4, margin_m=0.45, margin_s=32).m == 0.45
    with pytest.raises(ValueError, match="loss type 3 is not supported"):
        get_margin(3)
    with pytest.raises(ValueError, match="'focal' is not a known margin head"):
        get_margin("focal")
    with pytest.raises(TypeError, match=r"unexpected options \['margin_b'\]|unexpected options \['m3'\]"):
        get_margin("arcface", margin_b=0.1)
    with pytest.raises(ValueError, match=r"\[0, pi/2\)"):
        ArcFace(m=2.0)


def test_bad_inputs_are_named():
    head = get_margin("arcface")
    with pytest.raises(ValueError, match="label 9 is out of range"):
        head(torch.zeros(2, 9), torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="labels must be int64"):
        head(torch.zeros(2, 9), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"logits must be \(N, C\)"):
        head(torch.zeros(9), torch.tensor([0]))

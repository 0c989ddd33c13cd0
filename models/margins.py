"""Margin heads: ``(logits (N, C), labels (N,) int64) -> scaled logits (N, C) float32`` for softmax cross-entropy.

The contract is arcface_torch's ``CombinedMarginLoss``: ``logits`` are cosines between L2-normalised
embeddings and L2-normalised class centres (``normalized = True``), or plain FC logits for ``Softmax``
(``normalized = False``). ``labels == -1`` marks rows whose target class is not in this shard (Partial FC);
their target is left alone. Heads with ``needs_norms`` also take the embedding norms ``(N,)``;
``CurricularFace`` may take every row's target cosine ``target_logit (N,)`` (Partial FC passes it, so that
rows whose target lives on another rank are re-weighted exactly as without sharding).

Margins and cosines are computed in float32 even under bf16/fp16 autocast (float64 input stays float64),
with cosines clamped away from +-1 wherever a square root or arccos would have an infinite slope.
Heads with per-step state: ``SphereFace`` (call ``step()`` after each optimiser step), and
``CurricularFace`` / ``AdaFace`` (running statistics as buffers, updated in training mode only).
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

COS_EPS = 1e-7


class MarginHead(nn.Module):
    """Base class; subclasses implement ``margin(logits, labels, norms, target_logit)``."""

    needs_norms = False
    needs_target_logit = False
    normalized = True

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, norms: torch.Tensor | None = None,
                target_logit: torch.Tensor | None = None) -> torch.Tensor:
        _check_inputs(type(self).__name__, logits, labels, norms, self.needs_norms)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = _full_precision(logits)
            if norms is not None:
                norms = _full_precision(norms).reshape(-1)
            if target_logit is not None:
                target_logit = _full_precision(target_logit).reshape(-1)
            return self.margin(logits, labels, norms, target_logit)

    def margin(self, logits, labels, norms, target_logit):  # pragma: no cover - abstract
        raise NotImplementedError

    def step(self) -> None:
        """Advance per-training-step state (no-op unless the head anneals)."""


def _full_precision(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_inputs(name: str, logits, labels, norms, needs_norms: bool) -> None:
    """Shapes and dtypes always; label values only for CPU tensors (no host sync per step on a GPU)."""
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be (N, C), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1] or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: labels must be int64 of shape ({logits.shape[0]},), "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if labels.device.type == "cpu" and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < -1 or hi >= logits.shape[1]:
            bad = lo if lo < -1 else hi
            raise ValueError(f"{name}: label {bad} is out of range (expected -1 or 0..{logits.shape[1] - 1})")
    if needs_norms:
        if norms is None:
            raise ValueError(f"{name} needs the embedding norms: call head(logits, labels, norms)")
        if norms.numel() != logits.shape[0]:
            raise ValueError(f"{name}: norms must have one value per row ({logits.shape[0]}), "
                             f"got shape {tuple(norms.shape)}")


def _replace_target(logits: torch.Tensor, labels: torch.Tensor, new_target) -> torch.Tensor:
    """``logits`` with ``logits[i, labels[i]] = new_target(that value)`` for rows with ``labels[i] >= 0``."""
    valid = labels >= 0
    index = labels.clamp_min(0).long().unsqueeze(1)
    target = logits.gather(1, index).squeeze(1)
    value = torch.where(valid, new_target(target), target)
    return logits.scatter(1, index, value.unsqueeze(1))


def _clamped(cos: torch.Tensor) -> torch.Tensor:
    return cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)


class Softmax(MarginHead):
    """Loss 0: plain softmax. Identity on plain FC logits (the classifier is an FC *with bias*, W not normalised)."""

    normalized = False

    def margin(self, logits, labels, norms, target_logit):
        return logits


class SphereFace(MarginHead):
    """Loss 1: multiplicative angular margin (2018 ``LSoftmax`` op, m = 4). Needs ``norms`` = ||x||.

    Class centres are normalised, features are not: non-target logits are ``||x|| cos θ``; the target is
    ``||x|| (ψ(θ) + β cos θ) / (1 + β)`` with ``ψ = (-1)^k cos(mθ) - 2k``, ``k = floor(mθ/π)``.
    ``β = base`` for the first ``beta_freeze`` steps, then ``max(beta_min, base (1 + γ t)^-power)``,
    ``t`` = steps after the freeze; call ``step()`` once per training step. The 2018 script used
    ``beta_freeze=5000, gamma=0.06`` when there are more than 20000 classes (``get_margin`` does so
    when given ``num_classes``).
    """

    needs_norms = True

    def __init__(self, m: int = 4, base: float = 1000.0, gamma: float = 0.12, power: float = 1.0,
                 beta_min: float = 5.0, beta_freeze: int = 0):
        super().__init__()
        if int(m) != m or m < 1:
            raise ValueError(f"SphereFace margin m must be a positive integer, got {m!r}")
        self.m, self.base, self.gamma, self.power = int(m), float(base), float(gamma), float(power)
        self.beta_min, self.beta_freeze = float(beta_min), int(beta_freeze)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.int64))

    def beta(self) -> torch.Tensor:
        """The blend weight β for the current step (0-d float32 tensor)."""
        moved = (self.iteration - self.beta_freeze).clamp_min(0).float()
        annealed = (self.base * (1.0 + self.gamma * moved) ** -self.power).clamp_min(self.beta_min)
        return torch.where(self.iteration <= self.beta_freeze, torch.full_like(annealed, self.base), annealed)

    def step(self) -> None:
        self.iteration += 1

    def _cos_m_theta(self, c: torch.Tensor) -> torch.Tensor:
        """cos(m θ) as the Chebyshev polynomial T_m(cos θ): smooth, no arccos in the gradient."""
        prev, cur = torch.ones_like(c), c
        for _ in range(self.m - 1):
            prev, cur = cur, 2 * c * cur - prev
        return cur

    def margin(self, logits, labels, norms, target_logit):
        beta = self.beta().to(logits.dtype)
        cos = logits.clamp(-1.0, 1.0)

        def psi(c):
            with torch.no_grad():
                k = torch.floor(self.m * torch.acos(_clamped(c)) / math.pi).clamp(0, self.m - 1)
            sign = 1.0 - 2.0 * torch.remainder(k, 2)
            return (sign * self._cos_m_theta(c) - 2.0 * k + beta * c) / (1.0 + beta)

        return _replace_target(cos, labels, psi) * norms.unsqueeze(1)


class CosFace(MarginHead):
    """Loss 2 (CosFace / AM-softmax): target ``s (cos θ - m)``, others ``s cos θ``."""

    def __init__(self, s: float = 64.0, m: float = 0.35):
        super().__init__()
        self.s, self.m = float(s), float(m)

    def margin(self, logits, labels, norms, target_logit):
        return _replace_target(logits, labels, lambda c: c - self.m) * self.s


class ArcFace(MarginHead):
    """Loss 4 (2018): target ``s cos(θ + m)`` where θ + m < π, else the linear continuation ``s (cos θ - m sin m)``.

    ``easy_margin``: apply ``cos(θ + m)`` only where ``cos θ > 0`` and leave the target unchanged elsewhere.
    """

    def __init__(self, s: float = 64.0, m: float = 0.5, easy_margin: bool = False):
        super().__init__()
        if not 0.0 <= m < math.pi / 2:
            raise ValueError(f"ArcFace margin m must be in [0, pi/2), got {m!r}")
        self.s, self.m, self.easy_margin = float(s), float(m), bool(easy_margin)
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold = math.cos(math.pi - m)
        self.fallback = math.sin(math.pi - m) * m

    def cos_theta_plus_m(self, c: torch.Tensor) -> torch.Tensor:
        cc = _clamped(c)
        return cc * self.cos_m - torch.sqrt(1.0 - cc * cc) * self.sin_m

    def _target(self, c: torch.Tensor) -> torch.Tensor:
        if self.easy_margin:
            return torch.where(c > 0, self.cos_theta_plus_m(c), c)
        return torch.where(c > self.threshold, self.cos_theta_plus_m(c), c - self.fallback)

    def margin(self, logits, labels, norms, target_logit):
        return _replace_target(logits, labels, self._target) * self.s


class CombinedMargin(MarginHead):
    """Loss 5 / 2019 ``margin_softmax``: target ``s (cos(m1 θ + m2) - m3)`` (no θ + m > π handling, as in 2019).

    Presets (2019 config, s = 64): arcface (1, 0.5, 0), cosface (1, 0, 0.35), combined (1, 0.3, 0.2),
    nsoftmax (1, 0, 0) = normalised softmax.
    """

    def __init__(self, s: float = 64.0, m1: float = 1.0, m2: float = 0.3, m3: float = 0.2):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)

    def _target(self, c: torch.Tensor) -> torch.Tensor:
        if self.m1 == 1.0 and self.m2 == 0.0:
            return c - self.m3
        return torch.cos(self.m1 * torch.acos(_clamped(c)) + self.m2) - self.m3

    def margin(self, logits, labels, norms, target_logit):
        return _replace_target(logits, labels, self._target) * self.s


class CurricularFace(MarginHead):
    """CurricularFace (Huang et al. 2020): ArcFace target; negatives harder than ``cos(θ_y + m)`` become
    ``cos θ_j (t + cos θ_j)``, with ``t`` a running mean (buffer) of target cosines, momentum 0.01.

    Optional ``target_logit (N,)``: every row's target cosine even where ``labels == -1`` (Partial FC).
    """

    needs_target_logit = True

    def __init__(self, s: float = 64.0, m: float = 0.5, momentum: float = 0.01):
        super().__init__()
        self.s, self.momentum = float(s), float(momentum)
        self.arc = ArcFace(1.0, m)
        self.register_buffer("t", torch.zeros(()))

    def margin(self, logits, labels, norms, target_logit):
        valid = labels >= 0
        index = labels.clamp_min(0).long().unsqueeze(1)
        target = logits.gather(1, index).squeeze(1)
        with torch.no_grad():
            if target_logit is None:
                target_logit, known = target, valid
            else:
                known = torch.ones_like(valid)
            threshold = self.arc.cos_theta_plus_m(target_logit)
            if self.training and bool(known.any()):
                batch_mean = target_logit[known].mean()
                self.t.mul_(1.0 - self.momentum).add_(self.momentum * batch_mean.to(self.t.dtype))
            is_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, index, valid.unsqueeze(1))
            hard = (logits > threshold.unsqueeze(1)) & known.unsqueeze(1) & ~is_target
        t = self.t.to(logits.dtype)
        logits = torch.where(hard, logits * (t + logits), logits)
        value = torch.where(valid, self.arc._target(target), logits.gather(1, index).squeeze(1))
        return logits.scatter(1, index, value.unsqueeze(1)) * self.s


class AdaFace(MarginHead):
    """AdaFace (Kim et al. 2022): margin adapted to image quality via the feature norm. Needs ``norms``.

    ``g = clip(h (||x|| - μ) / (σ + 1e-3), -1, 1)`` with running mean μ / std σ of the batch norms
    (buffers, momentum ``t_alpha``); target ``s (cos(clip(θ - m g, eps, π - eps)) - (m + m g))``.
    All cosines are clamped to ±(1 - 1e-3) as in the original.
    """

    needs_norms = True

    def __init__(self, s: float = 64.0, m: float = 0.4, h: float = 0.333, t_alpha: float = 0.01):
        super().__init__()
        self.s, self.m, self.h, self.t_alpha, self.eps = float(s), float(m), float(h), float(t_alpha), 1e-3
        self.register_buffer("batch_mean", torch.full((), 20.0))
        self.register_buffer("batch_std", torch.full((), 100.0))

    def margin(self, logits, labels, norms, target_logit):
        logits = logits.clamp(-1 + self.eps, 1 - self.eps)
        safe = norms.detach().clamp(0.001, 100)
        if self.training:
            with torch.no_grad():
                std = safe.std() if safe.numel() > 1 else torch.zeros((), dtype=safe.dtype, device=safe.device)
                a = self.t_alpha
                self.batch_mean.mul_(1 - a).add_(a * safe.mean().to(self.batch_mean.dtype))
                self.batch_std.mul_(1 - a).add_(a * std.to(self.batch_std.dtype))
        mean, std = self.batch_mean.to(safe.dtype), self.batch_std.to(safe.dtype)
        scaler = ((safe - mean) / (std + self.eps) * self.h).clamp(-1, 1)
        g_angular, g_additive = -self.m * scaler, self.m + self.m * scaler
        valid = labels >= 0
        index = labels.clamp_min(0).long().unsqueeze(1)
        target = logits.gather(1, index).squeeze(1)
        theta = torch.acos(target).add(g_angular).clamp(self.eps, math.pi - self.eps)
        value = torch.where(valid, torch.cos(theta) - g_additive, target)
        return logits.scatter(1, index, value.unsqueeze(1)) * self.s


HEADS: dict[str, tuple[type[MarginHead], dict]] = {
    "softmax": (Softmax, {}),
    "sphereface": (SphereFace, {}),
    "cosface": (CosFace, {}),
    "amsoftmax": (CosFace, {}),
    "arcface": (ArcFace, {}),
    "combined": (CombinedMargin, {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
    "margin_softmax": (CombinedMargin, {"m1": 1.0, "m2": 0.3, "m3": 0.2}),
    "nsoftmax": (CombinedMargin, {"m1": 1.0, "m2": 0.0, "m3": 0.0}),
    "curricularface": (CurricularFace, {}),
    "adaface": (AdaFace, {}),
}
LOSS_TYPES = {0: "softmax", 1: "sphereface", 2: "cosface", 4: "arcface", 5: "combined"}
# InsightFace option names -> keyword of the head class (per class where they differ).
_ALIASES = {
    "margin_s": "s", "loss_s": "s", "margin_m": "m", "loss_m1": "m1", "loss_m2": "m2", "loss_m3": "m3",
    "margin_a": "m1", "margin_b": "m3", "margin": "m", "beta": "base",
}


def _head(loss: str | int) -> tuple[str, type[MarginHead], dict]:
    """``(name, head class, preset options)`` of a loss name or 2018 loss-type number."""
    key = str(loss).strip().lower()
    if key.lstrip("-").isdigit():
        number = int(key)
        if number not in LOSS_TYPES:
            raise ValueError(f"loss type {loss!r} is not supported (expected one of "
                             f"{', '.join(f'{n}={name}' for n, name in LOSS_TYPES.items())})")
        key = LOSS_TYPES[number]
    if key not in HEADS:
        raise ValueError(f"loss {loss!r} is not a known margin head (expected one of {', '.join(HEADS)} "
                         f"or a loss-type number {sorted(LOSS_TYPES)})")
    cls, preset = HEADS[key]
    return key, cls, preset


def head_options(loss: str | int, *, strict: bool = True, **options) -> dict:
    """Options in InsightFace's names (``margin_s``, ``margin_m``, ``margin_a``/``margin_b``,
    ``loss_m1``..``loss_m3``, ``easy_margin``, ``beta``, ...) or the head's own (``s``, ``m``, ...) ->
    keyword arguments of the head of ``loss``; the one place where these names are mapped. For the
    combined head ``margin_m`` is the additive angle ``m2`` (2019 ``config.py``). ``None`` values are
    dropped; an option the head does not take raises ``TypeError`` (``strict``) or is dropped."""
    key, cls, _ = _head(loss)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    out = {}
    for name, value in options.items():
        if value is None:
            continue
        target = "m2" if (name == "margin_m" and cls is CombinedMargin) else _ALIASES.get(name, name)
        if target in accepted:
            out[target] = value
        elif strict:
            raise TypeError(f"get_margin({key!r}) got unexpected options [{name!r}] "
                            f"(accepted: {', '.join(accepted) or 'none'})")
    return out


def get_margin(loss: str | int, **kw) -> MarginHead:
    """Build a margin head by name or 2018 loss-type number (0 softmax, 1 sphereface, 2 cosface, 4 arcface,
    5 combined). Keyword options: see :func:`head_options`. ``num_classes`` (SphereFace only) applies the
    2018 rule: > 20000 classes -> ``beta_freeze=5000, gamma=0.06``.
    """
    _, cls, preset = _head(loss)
    num_classes = kw.pop("num_classes", None)
    options = {**preset, **head_options(loss, **kw)}
    if cls is SphereFace and num_classes is not None and int(num_classes) > 20000:
        options.setdefault("beta_freeze", 5000)
        options.setdefault("gamma", 0.06)
    return cls(**options)

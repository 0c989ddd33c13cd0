"""A whitened trunk branch: the trunk's last feature map, PCA-whitened on the training images, appended
to the trained embedding.

On a small data set the trained embedding keeps what separates the few training identities; the
trunk's feature map holds more, and whitening it on the training images (the step that makes
eigenfaces work, Turk & Pentland 1991, applied to learned features instead of pixels) turns that into
a second, complementary embedding of unseen people. Whitening the trained embedding itself does not
help; whitening the trunk's features next to it does (measured in ``bench/real_faces.py``, figures
in the README). The whitening is fit in closed form after training, from the training images only.

* :func:`mirror_features`: normalised ``(N, 3, H, W)`` -> ``(N, C*h*ceil(w/2))`` float32: the trunk's
  feature map of each image plus that of its mirror (mirrored back into place), made left-right
  symmetric (its left half kept), so that an image and its mirror give the same vector. Computed in
  float32 with autocast off, in the fit and in the embedding alike.
* :func:`fit_whitening`: ``(N, D)`` features -> :class:`Whitening` (``mean`` ``(D,)``, ``proj`` ``(D, k)``
  float32): the principal components whose singular value is above ``rel_tol`` of the largest (at
  most ``N - 1``), each divided by its standard deviation on the fit set. The features are float32:
  directions below ``rel_tol`` (default 1e-4) of the largest are rounding noise, which whitening would
  blow up to unit size, and so are directions whose spread is below 1e-4 of the features' RMS.
* :class:`WhitenedTrunkEmbedding`: a :class:`models.backbone.Backbone` and a :class:`Whitening`:
  ``(N, 3, H, W) -> (N, E + k)``, ``[unit(head(x) + head(mirror x)) | unit(whitened mirror features)] / sqrt(2)``:
  unit-norm and mirror-invariant (the flip test gives the same embedding, only twice the work). Its raw
  norm is always 1, so norm-based quality scores (IJB's ``norm_score``) say nothing for such a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Whitening", "fit_whitening", "mirror_features", "WhitenedTrunkEmbedding"]


@dataclass(frozen=True)
class Whitening:
    """``mean`` ``(D,)`` and ``proj`` ``(D, k)`` float32: ``whitened = (features - mean) @ proj``."""

    mean: torch.Tensor
    proj: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.proj.shape[1])

    def state(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean.detach().cpu().contiguous(), "proj": self.proj.detach().cpu().contiguous()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "Whitening":
        mean, proj = state["mean"], state["proj"]
        if mean.dim() != 1 or proj.dim() != 2 or proj.shape[0] != mean.shape[0]:
            raise ValueError(f"whitening: mean {tuple(mean.shape)} and proj {tuple(proj.shape)} do not fit "
                             f"(expected (D,) and (D, k))")
        return cls(mean.float(), proj.float())


def _symmetric(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Feature maps ``a`` ``(N, C, h, w)`` of images and ``b`` of their mirrors -> ``(N, C*h*ceil(w/2))``
    float32: the left-right symmetric map, of which the left half (middle column included) is kept."""
    both = a.float() + b.float().flip(3)  # the mirror's feature map, mirrored back into place
    symmetric = both + both.flip(3)
    return symmetric[..., : (symmetric.shape[3] + 1) // 2].flatten(1)


def mirror_features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` normalised images -> ``(N, C*h*ceil(w/2))`` float32 mirror-symmetric trunk features,
    computed in float32 (autocast off: the whitening magnifies rounding in its small directions)."""
    with torch.autocast(x.device.type, enabled=False):
        return _symmetric(trunk(x.float()), trunk(x.float().flip(3)))


def fit_whitening(features: torch.Tensor, rel_tol: float = 1e-4) -> Whitening:
    """PCA whitening of ``features`` ``(N, D)`` (computed in float64); see the module docstring."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"fit_whitening needs (N, D) features with N >= 2, got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError("fit_whitening: the features hold NaN or infinite values")
    x = features.double()
    mean = x.mean(0)
    _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
    std = s / math.sqrt(x.shape[0] - 1)
    rms = x.square().mean().sqrt()
    keep = (s > rel_tol * s[0]) & (std > 1e-4 * rms)  # well above float32 rounding of the features themselves
    keep[min(len(s), x.shape[0] - 1):] = False  # centring removes one dimension
    k = int(keep.sum())
    if k == 0:
        raise ValueError("fit_whitening: the features do not vary beyond float32 rounding "
                         "(every image gives the same vector)")
    std = std[:k]
    return Whitening(mean.float(), (vt[:k].T / std).float())


class WhitenedTrunkEmbedding(nn.Module):
    """``backbone``'s embedding and its whitened mirror features; see the module docstring.

    Keeps ``network``, ``image_size`` and ``variant`` of the backbone; ``emb_size`` is ``E + k``."""

    def __init__(self, backbone: nn.Module, whitening: Whitening):
        super().__init__()
        self.backbone = backbone
        self.network = backbone.network
        self.image_size = backbone.image_size
        self.variant = getattr(backbone, "variant", None)
        self.register_buffer("whiten_mean", whitening.mean.clone())
        self.register_buffer("whiten_proj", whitening.proj.clone())
        self.emb_size = backbone.emb_size + whitening.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():
            self.backbone._check_input(x)
        trunk, head = self.backbone.trunk, self.backbone.head
        with torch.autocast(x.device.type, enabled=False):  # float32 throughout, as the fit (mirror_features)
            x = x.float()
            a, b = trunk(x), trunk(x.flip(3))
            embedding = head(a) + head(b)
            whitened = (_symmetric(a, b) - self.whiten_mean) @ self.whiten_proj
        return torch.cat([F.normalize(embedding.float(), dim=1), F.normalize(whitened, dim=1)], 1) / math.sqrt(2.0)

"""MegaFace Challenge 1 evaluation (formats-spec 6.3-6.4): noise removal, rank-N identification, TAR@FAR.

* :func:`remove_noises` is InsightFace's ``remove_noises.py``: every feature gets one extra dimension;
  noisy FaceScrub probes are replaced by their identity's centre, noisy distractors get 100.0 in the
  extra dimension so that by Euclidean distance they can never outrank a match.
* :func:`identification` is the devkit protocol as FaceX-Zoo re-implements it: for every probe
  identity and every image ``g`` of it, ``g`` joins the distractors as the gallery and every other
  image ``p`` of that identity is a query; its rank is ``1 + #{distractors closer to p than g}``
  (ties count for the match). CMC(r) = fraction of ordered ``(g, p)`` pairs with rank <= r.
* :func:`verification_tar_at_far`: genuine = probe pairs of one identity, impostor = every
  probe-distractor pair; TAR at the largest FAR <= the target (the devkit's FuseResults is closed
  source; this definition is inferred, spec 6.4 and section 10).

Scores are computed in chunks of distractors with torch (CUDA when present), so memory stays bounded
for 1,000,000 distractors; for rank <= R only the R best distractor scores per probe are kept.
Euclidean ranking uses ``2 p.x - |x|^2`` (= ``|p|^2 - |p - x|^2``: the same order as the distance).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import PurePosixPath
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from tasks.runtime import logger
from tasks.evaluation.config import DEFAULT_RANKS, DEFAULT_SIZES  # re-exported
from tasks.evaluation.pairs import TarAtFar, tar_at_far

Metric = Literal["euclidean", "cosine"]
NOISY_DISTRACTOR_VALUE = 100.0
"""Extra-dimension value of a neutralised distractor (InsightFace remove_noises)."""
_MAX_TOP_IMPOSTORS = 50_000_000


def _probe_key(name: str) -> str:
    return PurePosixPath(name).name


def _distractor_key(name: str) -> str:
    return "/".join(PurePosixPath(name).parts[-3:])


def _match_noise(names: Sequence[str], noise: set[str], key, what: str, strict: bool) -> np.ndarray:
    """Boolean mask of ``names`` listed in ``noise`` (by full name or by ``key(name)``)."""
    keys = [key(n) for n in names]
    noisy = np.fromiter((n in noise or k in noise for n, k in zip(names, keys)), dtype=bool, count=len(names))
    unknown = sorted(set(noise) - set(names) - set(keys))
    if unknown:
        message = (
            f"{len(unknown)} of {len(noise)} {what} noise-list entries name no {what} image, e.g. "
            f"{', '.join(repr(u) for u in unknown[:5])}"
        )
        if strict:
            raise ValueError(message + " (pass strict=False when the features cover only part of the list)")
        logger().warning("%s; they are ignored", message)
    return noisy


def noisy_probes(probe_names: Sequence[str], noise: set[str], *, strict: bool = True) -> np.ndarray:
    """Boolean ``(P,)`` mask of the probes that ``noise`` lists, by file name or full name.
    ``strict``: an entry that names no probe raises ``ValueError`` naming a few (else a warning)."""
    return _match_noise(probe_names, set(noise), _probe_key, "probe", strict)


def noisy_distractors(distractor_names: Sequence[str], noise: set[str], *, strict: bool = True) -> np.ndarray:
    """Boolean ``(M,)`` mask of the distractors that ``noise`` lists, by their last three path parts
    or full name. ``strict`` as in :func:`noisy_probes`."""
    return _match_noise(distractor_names, set(noise), _distractor_key, "distractor", strict)


def remove_noises(
    probe_feats: np.ndarray,
    probe_names: Sequence[str],
    probe_identities: Sequence[str],
    distractor_feats: np.ndarray,
    distractor_names: Sequence[str],
    probe_noise: set[str],
    distractor_noise: set[str],
    seed: int = 0,
    *,
    strict: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """InsightFace noise removal: ``(P, D)`` probes and ``(M, D)`` distractors -> ``(P, D+1)``, ``(M, D+1)`` float32.

    Probes match ``probe_noise`` by file name (``Aaron_Eckhart_136.png``) or full name; distractors match
    ``distractor_noise`` by their last three path parts (``375/37531198@N00/4174611825_0.jpg``) or full
    name. Clean features get 0.0 in the extra dimension. A noisy probe becomes the sum of its identity's
    clean (D+1)-dim features plus uniform(-0.001, 0.001) noise on the first D values (``seed``), then
    L2-normalised. A noisy distractor keeps its values and gets 100.0 in the extra dimension.
    ``strict``: noise-list entries that match no image raise ``ValueError`` (listing a few); with
    ``strict=False`` they are logged and ignored, which is what the official lists need when only the
    3,530 devkit probes (not all of FaceScrub) were embedded.
    """
    probes = np.asarray(probe_feats)
    distractors = np.asarray(distractor_feats)
    if probes.ndim != 2 or distractors.ndim != 2 or probes.shape[1] != distractors.shape[1]:
        raise ValueError(f"probe features {probes.shape} and distractor features {distractors.shape} must be (N, D) with one D")
    if len(probe_names) != probes.shape[0] or len(probe_identities) != probes.shape[0]:
        raise ValueError(f"{probes.shape[0]} probe features, {len(probe_names)} names, {len(probe_identities)} identities")
    if len(distractor_names) != distractors.shape[0]:
        raise ValueError(f"{distractors.shape[0]} distractor features but {len(distractor_names)} names")
    dim = probes.shape[1]
    noisy_probe = noisy_probes(probe_names, probe_noise, strict=strict)
    noisy_distractor = noisy_distractors(distractor_names, distractor_noise, strict=strict)

    probe_out = np.zeros((probes.shape[0], dim + 1), np.float32)
    probe_out[:, :dim] = probes
    identities = np.asarray([str(i) for i in probe_identities])
    rng = np.random.default_rng(seed)
    for index in np.flatnonzero(noisy_probe):
        same = (identities == identities[index]) & ~noisy_probe
        if not same.any():
            raise ValueError(
                f"probe {probe_names[index]!r} is listed as noise but identity {str(identities[index])!r} "
                f"has no clean image to replace it with"
            )
        centre = probe_out[same].astype(np.float64).sum(axis=0)
        centre[:dim] += rng.uniform(-0.001, 0.001, dim)
        probe_out[index] = centre / np.linalg.norm(centre)

    distractor_out = np.empty((distractors.shape[0], dim + 1), np.float32)
    distractor_out[:, :dim] = distractors
    distractor_out[:, dim] = 0.0
    distractor_out[noisy_distractor, dim] = NOISY_DISTRACTOR_VALUE
    logger().info(
        "remove_noises: %d of %d probes replaced by their identity centre, %d of %d distractors neutralised",
        int(noisy_probe.sum()), probes.shape[0], int(noisy_distractor.sum()), distractors.shape[0],
    )
    return probe_out, distractor_out


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _finite_features(feats: np.ndarray, what: str, offset: int = 0) -> None:
    finite = np.isfinite(feats).all(axis=1)
    if not finite.all():
        raise ValueError(f"{what} feature {offset + int(np.flatnonzero(~finite)[0])} is not finite")


class _Scorer:
    """Similarity of probes to other features, higher = closer, on one device.

    ``euclidean``: ``2 p.x - |x|^2`` (ranking, per probe) or ``-|p - x|^2`` (``symmetric``, for
    thresholds shared by all pairs); ``cosine``: ``p.x``.
    """

    def __init__(self, probes: np.ndarray, metric: Metric, device: torch.device):
        if metric not in ("euclidean", "cosine"):
            raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
        self.metric, self.device = metric, device
        self.probes = self.to_device(probes)
        self.probe_sq = (self.probes * self.probes).sum(1)

    def to_device(self, feats: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def scores(self, rows: slice, others: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
        q = self.probes[rows]
        if self.metric == "cosine":
            return q @ others.T
        other_sq = (others * others).sum(1)
        s = torch.addmm(other_sq.neg().unsqueeze(0), q, others.T, alpha=2)
        return s - self.probe_sq[rows, None] if symmetric else s


def _chunk_size(chunk: int | None, n_rows: int, device: torch.device) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        return int(chunk)
    budget = (1 << 28) if device.type == "cuda" else (1 << 25)  # score elements per chunk
    return max(256, budget // max(n_rows, 1))


def _distractor_scores(
    scorer: _Scorer, distractors: np.ndarray, stops: Sequence[int], chunk: int, symmetric: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(stop, scores (P, c))`` for consecutive distractor chunks, split at every value in ``stops``."""
    bounds = sorted({0, *stops})
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            block = distractors[start:stop]
            _finite_features(block, "distractor", start)
            yield stop, scorer.scores(slice(None), scorer.to_device(block), symmetric)


@dataclasses.dataclass(frozen=True)
class IdentificationResult:
    """CMC per gallery size: ``cmc[size][i]`` = fraction of (gallery, query) pairs with rank <= ``ranks[i]``."""

    sizes: tuple[int, ...]
    ranks: tuple[int, ...]
    cmc: dict[int, np.ndarray]
    n_probes: int
    n_identities: int
    n_pairs: int
    metric: str
    notes: tuple[str, ...] = ()

    def rank1(self) -> dict[int, float]:
        """Rank-1 identification rate per distractor count (requires rank 1 in ``ranks``)."""
        if 1 not in self.ranks:
            raise ValueError(f"rank 1 was not computed (ranks {self.ranks})")
        return {size: float(rates[self.ranks.index(1)]) for size, rates in self.cmc.items()}

    def to_rows(self) -> list[dict]:
        """One row per size: ``{"distractors": N, "rank_1": ..., "rank_5": ..., "pairs": ...}``."""
        return [
            {"distractors": size, **{f"rank_{r}": float(v) for r, v in zip(self.ranks, rates)}, "pairs": self.n_pairs}
            for size, rates in self.cmc.items()
        ]


def _probe_codes(probe_feats: np.ndarray, probe_ids: Sequence, distractor_feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probes = np.asarray(probe_feats)
    distractors = np.asarray(distractor_feats)
    if probes.ndim != 2 or distractors.ndim != 2 or probes.shape[1] != distractors.shape[1]:
        raise ValueError(f"probe features {probes.shape} and distractor features {distractors.shape} must be (N, D) with one D")
    if len(probe_ids) != probes.shape[0]:
        raise ValueError(f"{probes.shape[0]} probe features but {len(probe_ids)} probe identities")
    _finite_features(probes, "probe")
    _, codes = np.unique(np.asarray([str(i) for i in probe_ids]), return_inverse=True)
    return probes, codes


def _probe_row_blocks(n: int, device: torch.device) -> Iterator[slice]:
    rows = max(1, ((1 << 26) if device.type == "cuda" else (1 << 24)) // max(n, 1))
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def identification(
    probe_feats: np.ndarray,
    probe_ids: Sequence,
    distractor_feats: np.ndarray,
    sizes: Sequence[int] = DEFAULT_SIZES,
    ranks: Sequence[int] = DEFAULT_RANKS,
    *,
    metric: Metric = "euclidean",
    device: str | torch.device = "auto",
    chunk: int | None = None,
) -> IdentificationResult:
    """MegaFace identification CMC of ``probe_feats`` ``(P, D)`` (identities ``probe_ids``) against the
    first N rows of ``distractor_feats`` ``(M, D)`` for each N in ``sizes`` (sizes > M are skipped with
    a note). ``metric="euclidean"`` is the devkit's and honours :func:`remove_noises`; ``"cosine"``
    (dot product of normalised features) does not neutralise noisy distractors: drop them first.
    ``chunk``: distractors scored at a time (default: about 128 MB of scores on CPU, 1 GB on CUDA).
    """
    probes, codes = _probe_codes(probe_feats, probe_ids, distractor_feats)
    distractors = np.asarray(distractor_feats)
    ranks = tuple(sorted({int(r) for r in ranks}))
    if not ranks or ranks[0] < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    notes = [f"{s:,} distractors skipped: only {distractors.shape[0]:,} given" for s in sizes if s > distractors.shape[0]]
    sizes = tuple(sorted({int(s) for s in sizes if 0 < s <= distractors.shape[0]}))
    dev = _device(device)
    scorer = _Scorer(probes, metric, dev)
    k = ranks[-1]

    top = torch.full((probes.shape[0], k), -math.inf, device=dev)
    top_at: dict[int, torch.Tensor] = {}
    for stop, scores in _distractor_scores(scorer, distractors, sizes, _chunk_size(chunk, probes.shape[0], dev)):
        best = torch.topk(scores, min(k, scores.shape[1]), dim=1).values
        top = torch.topk(torch.cat([top, best], dim=1), k, dim=1).values
        if stop in sizes:
            top_at[stop] = top

    codes_t = torch.from_numpy(codes).to(dev)
    successes = {size: torch.zeros(len(ranks), dtype=torch.int64, device=dev) for size in sizes}
    n_pairs = 0
    for rows in _probe_row_blocks(probes.shape[0], dev):
        genuine = scorer.scores(rows, scorer.probes)  # (rows, P): query = row probe, gallery = column
        mask = codes_t[rows, None] == codes_t[None, :]
        mask[torch.arange(mask.shape[0], device=dev), torch.arange(rows.start, rows.stop, device=dev)] = False
        n_pairs += int(mask.sum())
        for size in sizes:
            for i, r in enumerate(ranks):
                threshold = top_at[size][rows, r - 1]
                successes[size][i] += ((genuine >= threshold[:, None]) & mask).sum()
    if n_pairs == 0:
        raise ValueError("no probe identity has two or more images: identification needs gallery/query pairs")
    cmc = {size: successes[size].double().cpu().numpy() / n_pairs for size in sizes}
    return IdentificationResult(
        sizes=sizes, ranks=ranks, cmc=cmc, n_probes=int(probes.shape[0]), n_identities=int(codes.max() + 1),
        n_pairs=n_pairs, metric=metric, notes=tuple(notes),
    )


def verification_tar_at_far(
    probe_feats: np.ndarray,
    probe_ids: Sequence,
    distractor_feats: np.ndarray,
    far: float = 1e-6,
    *,
    metric: Metric = "euclidean",
    device: str | torch.device = "auto",
    chunk: int | None = None,
) -> TarAtFar | None:
    """MegaFace verification: TAR at the largest FAR <= ``far``.

    Genuine pairs: every unordered pair of probe images of one identity. Impostor pairs: every
    (probe, distractor) pair, P x M of them (3,530 x 1,000,000 = 3.5e9 in the challenge). Scores:
    ``-|p - x|^2`` (euclidean) or ``p.x`` (cosine). Only the ``floor(far * P * M) + 1`` highest
    impostor scores are kept while streaming over distractor chunks. Returns None when
    ``far < 1 / (P * M)`` (too few impostor pairs to measure it). See :func:`verification_roc`.
    """
    m = np.asarray(distractor_feats).shape[0] if np.ndim(distractor_feats) == 2 else 0
    return verification_roc(probe_feats, probe_ids, distractor_feats, (far,), (m,) if m else None,
                            metric=metric, device=device, chunk=chunk)[m][float(far)]


def verification_roc(
    probe_feats: np.ndarray,
    probe_ids: Sequence,
    distractor_feats: np.ndarray,
    fars: Sequence[float] = (1e-6,),
    sizes: Sequence[int] | None = None,
    *,
    metric: Metric = "euclidean",
    device: str | torch.device = "auto",
    chunk: int | None = None,
) -> dict[int, dict[float, TarAtFar | None]]:
    """TAR at several FARs against the first N distractors for each N in ``sizes`` (default: all
    M), from one pass over the distractors: ``{N: {far: TarAtFar or None}}``.

    Pairs and scores as :func:`verification_tar_at_far`. The pass keeps the
    ``floor(max(fars) * P * max(sizes)) + 1`` highest impostor scores seen so far and takes a copy at
    each size, which holds every score a smaller size or FAR needs. A FAR below ``1 / (P * N)``
    gives None (logged); sizes above M are left out. Raises ``ValueError`` when the scores to keep
    exceed 50 million (use smaller FARs).
    """
    probes, codes = _probe_codes(probe_feats, probe_ids, distractor_feats)
    distractors = np.asarray(distractor_feats)
    n_probes, m = probes.shape[0], distractors.shape[0]
    sizes = tuple(sorted({int(s) for s in (sizes if sizes is not None else (m,)) if 0 < int(s) <= m}))
    fars = tuple(sorted({float(f) for f in fars}))
    if not fars or fars[0] <= 0:
        raise ValueError(f"FAR targets must be positive, got {fars}")
    out: dict[int, dict[float, TarAtFar | None]] = {size: dict.fromkeys(fars) for size in sizes}
    if not sizes or n_probes == 0:
        logger().warning("TAR@FAR needs probes and distractors, got %d and %d", n_probes, m)
        return out or {m: dict.fromkeys(fars)}
    n_most = n_probes * sizes[-1]
    measurable = [f for f in fars if f * n_most >= 1 - 1e-9]
    for f in fars:
        if f not in measurable:
            logger().warning("TAR@FAR=%g needs >= %d impostor pairs, got %d", f, math.ceil(1 / f), n_most)
    if not measurable:
        return out
    keep = int(math.floor(measurable[-1] * n_most * (1 + 1e-12))) + 1
    if keep > _MAX_TOP_IMPOSTORS:
        raise ValueError(f"FAR {measurable[-1]:g} of {n_most:,} impostor pairs keeps {keep:,} scores; use a smaller FAR")
    dev = _device(device)
    scorer = _Scorer(probes, metric, dev)

    top = torch.empty(0, device=dev)
    top_at: dict[int, torch.Tensor] = {}
    size = _chunk_size(chunk, n_probes, dev)
    for stop, scores in _distractor_scores(scorer, distractors, sizes, size, symmetric=True):
        flat = scores.reshape(-1)
        if top.numel() == keep:  # only scores above the current keep-th best can change the kept values
            flat = flat[flat > top[-1]]
        merged = torch.cat([top, flat])
        top = torch.topk(merged, keep).values if merged.numel() > keep else torch.sort(merged, descending=True).values
        if stop in out:
            top_at[stop] = top

    codes_t = torch.from_numpy(codes).to(dev)
    genuine = []
    for rows in _probe_row_blocks(n_probes, dev):
        scores = scorer.scores(rows, scorer.probes, symmetric=True)
        cols = torch.arange(n_probes, device=dev)
        mask = (codes_t[rows, None] == codes_t[None, :]) & (cols[None, :] > torch.arange(rows.start, rows.stop, device=dev)[:, None])
        genuine.append(scores[mask].cpu())
    genuine_scores = torch.cat(genuine).double().numpy()
    if genuine_scores.size == 0:
        raise ValueError("no probe identity has two or more images: no genuine pairs")
    for n, kept in top_at.items():
        impostors = kept.double().cpu().numpy()
        for f in fars:
            out[n][f] = tar_at_far(genuine_scores, impostors, f, n_impostors=n_probes * n)
    return out

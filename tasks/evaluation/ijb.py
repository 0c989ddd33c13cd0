"""IJB-B / IJB-C metrics from image features, the computation of arcface_torch's ``eval_ijbc.py``
(1:1 verification) and InsightFace's ``ijb_1n.py`` (1:N identification), vectorised.

Steps, on ``raw`` ``(N, 2D)`` float32 image features ``[embedding | embedding of the mirrored image]``
(the layout ``eval_ijbc.py`` keeps; ``(N, D)`` without the flip test):

1. :func:`image_features`: ``flip`` sums the two halves; unless ``norm_score`` each row is
   L2-normalised (``norm_score=True``, the script's default, keeps the feature norm as a quality
   weight); ``detector_score`` multiplies each row by the image's detector score. float32, as there.
2. :func:`pool_templates`: per template, the mean of the images of each media (video or photo), then the
   sum over its medias, then L2 normalisation (a zero template stays zero). The float32 sums run in
   the script's order (images in file order within a media, medias in ascending id), so they are
   the script's bit for bit; normalisation in float64.
3. :func:`pair_scores`: cosine of the two templates of each pair, in batches of pairs, summed as
   the script sums them (``np.sum(a * b, -1)``): another summation order moves scores by an ulp,
   which splits or merges exactly tied scores and so changes the ROC's points.
4. :func:`roc_curve`: scikit-learn's ``roc_curve(labels, scores)`` with its default
   ``drop_intermediate=True``, restated (see there); :func:`tar_at_far`: the script's pick of the
   point whose FPR is *nearest* the target (``argmin |fpr - far|``, which can be above the target),
   ties to the larger FPR, then to the larger TPR; :func:`roc_auc`: trapezoidal area.
5. :func:`identification`: probes against the union of the two galleries: CMC (rank-k = mated
   gallery template among the k highest scores) and TPIR at FPIR ``f`` as ``ijb_1n.py`` defines it:
   the threshold is the ``ceil(Q * f)``-th highest of all ``Q * (G - 1)`` non-mated scores and TPIR
   the fraction of the ``Q`` probes whose mated score is above it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

__all__ = ["FAR_TARGETS", "FPIR_TARGETS", "RANKS", "image_features", "pool_templates", "pair_scores",
           "roc_curve", "tar_at_far", "roc_auc", "IdentificationResult", "identification"]

#: FARs of the table, written as ``eval_ijbc.py`` writes them (``10 ** -6`` ... ``10 ** -1``).
FAR_TARGETS: tuple[float, ...] = tuple(10 ** -k for k in range(6, 0, -1))
FPIR_TARGETS: tuple[float, ...] = (0.01, 0.1)
RANKS: tuple[int, ...] = (1, 5, 10)
_PAIR_BATCH = 1024  # pairs per step: two (1024, D) float64 gathers stay in cache (2x faster than 4096)
_PROBE_BATCH = 4096


def image_features(raw: np.ndarray, scores: np.ndarray | None = None, *, flip: bool = True, norm_score: bool = True,
                   detector_score: bool = True) -> np.ndarray:
    """``(N, D)`` float32 image features from ``raw`` ``(N, 2D)`` (``(N, D)`` when ``flip`` is false and
    the file holds one half) and detector ``scores`` ``(N,)`` (see step 1 of the module docstring)."""
    raw = np.asarray(raw, dtype=np.float32)
    if raw.ndim != 2:
        raise ValueError(f"image features must be (N, D), got shape {raw.shape}")
    if flip:
        if raw.shape[1] % 2:
            raise ValueError(f"flip test needs (N, 2D) features [image | mirror], got {raw.shape}")
        half = raw.shape[1] // 2
        feats = raw[:, :half] + raw[:, half:]
    else:
        feats = raw.copy()
    if not norm_score:
        feats = feats / np.sqrt(np.sum(feats ** 2, -1, keepdims=True))
    if detector_score:
        if scores is None or len(scores) != len(feats):
            raise ValueError(f"detector scores: need {len(feats)}, got {None if scores is None else len(scores)}")
        feats = feats * np.asarray(scores, dtype=np.float32)[:, np.newaxis]
    return feats


def _group_sums(rows: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sum of each group of consecutive ``rows`` (group ``g``: ``starts[g]``, ``counts[g]`` rows), added
    one row after the other in row order, as ``np.sum(axis=0)`` adds (``np.add.reduceat`` adds in
    another order), vectorised over the groups: step ``k`` adds row ``k`` of every group longer than ``k``."""
    by_size = np.argsort(-counts, kind="stable")
    sizes = counts[by_size]
    acc = rows[starts[by_size]].copy()
    for k in range(1, int(sizes[0]) if len(sizes) else 0):
        active = int(np.searchsorted(-sizes, -k, side="left"))  # groups with more than k rows come first
        acc[:active] += rows[starts[by_size[:active]] + k]
    out = np.empty_like(acc)
    out[by_size] = acc
    return out


def pool_templates(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Template features from image features ``(N, D)`` and each image's template and media id ``(N,)``.

    Returns ``(template ids (T,) ascending, features (T, D) float64, L2-normalised)``.
    """
    feats = np.asarray(feats)
    templates, medias = np.asarray(templates, np.int64), np.asarray(medias, np.int64)
    if not (len(feats) == len(templates) == len(medias)):
        raise ValueError(f"{len(feats)} features, {len(templates)} template ids, {len(medias)} media ids")
    order = np.lexsort((medias, templates))  # stable: file order within one (template, media)
    t_sorted, m_sorted = templates[order], medias[order]
    starts = np.flatnonzero(np.r_[True, (t_sorted[1:] != t_sorted[:-1]) | (m_sorted[1:] != m_sorted[:-1])])
    counts = np.diff(np.r_[starts, len(order)])
    media_mean = _group_sums(feats[order], starts, counts) / counts.astype(feats.dtype)[:, np.newaxis]
    media_template = t_sorted[starts]
    t_starts = np.flatnonzero(np.r_[True, media_template[1:] != media_template[:-1]])
    pooled = _group_sums(media_mean, t_starts, np.diff(np.r_[t_starts, len(starts)])).astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", pooled, pooled))
    norms[norms == 0] = 1.0  # as sklearn.preprocessing.normalize: a zero row stays zero
    return media_template[t_starts], pooled / norms[:, np.newaxis]


def pair_scores(template_ids: np.ndarray, template_feats: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                batch: int = _PAIR_BATCH) -> np.ndarray:
    """Cosine similarity ``(P,)`` float64 of the template pairs ``t1[p]``, ``t2[p]`` (ids in ``template_ids``,
    ascending, as :func:`pool_templates` returns them); ``KeyError`` naming an unknown template."""
    template_ids = np.asarray(template_ids)
    idx = []
    for column in (np.asarray(t1), np.asarray(t2)):
        pos = np.searchsorted(template_ids, column).clip(0, len(template_ids) - 1)
        bad = template_ids[pos] != column
        if bad.any():
            raise KeyError(f"template {int(column[np.flatnonzero(bad)[0]])} has no features")
        idx.append(pos)
    out = np.empty(len(idx[0]), np.float64)
    for lo in range(0, len(out), batch):
        a = template_feats[idx[0][lo:lo + batch]]
        b = template_feats[idx[1][lo:lo + batch]]
        out[lo:lo + batch] = np.sum(a * b, -1)  # the script's expression: its exact ties stay ties
    return out


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` as ``sklearn.metrics.roc_curve(labels, scores)`` (positive label 1,
    no weights, ``drop_intermediate=True``) returns them.

    The rule: sort scores descending; one point per distinct score (true and false positives among
    the pairs scoring at least it); with more than two points, drop each point whose neighbours on
    both sides lie at equal steps in both counts (zero second difference of false and of true
    positive counts: a point inside a straight run of equal steps; first and last are kept); then
    prepend ``(0, 0)`` with threshold ``inf``; rates are counts over the last point's counts.
    """
    labels = np.asarray(labels).reshape(-1) == 1
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels for {scores.size} scores")
    if not labels.any() or labels.all():
        raise ValueError(f"ROC needs genuine and impostor pairs ({int(labels.sum())} genuine of {labels.size})")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = last + 1 - tps
    thresholds = s[last]
    if len(fps) > 2:
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, thresholds]
    return fps / fps[-1], tps / tps[-1], thresholds


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float] = FAR_TARGETS) -> dict[float, float]:
    """``{far: TAR}``: the TPR of the ROC point whose FPR is nearest ``far`` (``eval_ijbc.py``'s
    ``min(zip(abs(fpr - far), index))`` over the curve reversed, i.e. among equally near points the
    last of :func:`roc_curve`'s order: the larger FPR, then the larger TPR)."""
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    out = {}
    for far in fars:
        dist = np.abs(fpr - far)[::-1]
        out[float(far)] = float(tpr[len(tpr) - 1 - int(np.argmin(dist))])
    return out


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC (trapezoids, ``sklearn.metrics.auc``)."""
    return float(np.trapezoid(np.asarray(tpr, np.float64), np.asarray(fpr, np.float64)))


@dataclasses.dataclass(frozen=True)
class IdentificationResult:
    """1:N results: ``cmc[k]`` (fraction of probes whose mated gallery template ranks within the top
    ``k``), ``tpir[fpir]`` (``None`` when ``ceil(Q * fpir)`` exceeds the non-mated scores), their
    thresholds, and the counts."""

    cmc: dict[int, float]
    tpir: dict[float, float | None]
    thresholds: dict[float, float | None]
    probes: int
    gallery: int


def identification(probe_feats: np.ndarray, probe_subjects: np.ndarray, gallery_feats: np.ndarray,
                   gallery_subjects: np.ndarray, ranks: Sequence[int] = RANKS,
                   fpirs: Sequence[float] = FPIR_TARGETS, batch: int = _PROBE_BATCH) -> IdentificationResult:
    """Closed-set search of every probe template (L2-normalised ``(Q, D)``) among the gallery templates
    ``(G, D)`` by cosine similarity (see step 5 of the module docstring). Each probe subject must have
    exactly one gallery template (``ValueError`` naming the subject otherwise). A mated score tied with
    non-mated ones ranks first among them."""
    probe_subjects, gallery_subjects = np.asarray(probe_subjects), np.asarray(gallery_subjects)
    order = np.argsort(gallery_subjects, kind="stable")
    gs = gallery_subjects[order]
    if not len(gs) or not len(probe_subjects):
        raise ValueError(f"identification needs probes and a gallery ({len(probe_subjects)} probes, {len(gs)} gallery templates)")
    pos = np.searchsorted(gs, probe_subjects).clip(0, len(gs) - 1)
    found = gs[pos] == probe_subjects
    if not found.all():
        raise ValueError(f"probe subject {int(probe_subjects[np.flatnonzero(~found)[0]])} has no gallery template")
    counts = np.searchsorted(gs, probe_subjects, side="right") - np.searchsorted(gs, probe_subjects, side="left")
    if (counts > 1).any():
        raise ValueError(f"probe subject {int(probe_subjects[np.flatnonzero(counts > 1)[0]])} has "
                         f"{int(counts[counts > 1][0])} gallery templates (expected one)")
    mate = order[pos]
    q, g = len(probe_feats), len(gallery_feats)
    need = [math.ceil(q * f) for f in fpirs]
    top_k = max([k for k in need if k <= q * (g - 1)], default=0)
    ahead = np.empty(q, np.int64)
    mated = np.empty(q, np.float64)
    top_neg = np.empty(0, np.float64)
    gallery = np.asarray(gallery_feats, np.float64)
    for lo in range(0, q, batch):
        sim = np.asarray(probe_feats[lo:lo + batch], np.float64) @ gallery.T
        rows = np.arange(sim.shape[0])
        mated[lo:lo + batch] = m = sim[rows, mate[lo:lo + batch]]
        ahead[lo:lo + batch] = (sim > m[:, np.newaxis]).sum(axis=1)
        if top_k:
            sim[rows, mate[lo:lo + batch]] = -np.inf
            flat = sim.reshape(-1)
            if flat.size > top_k:
                flat = flat[np.argpartition(flat, flat.size - top_k)[flat.size - top_k:]]
            top_neg = np.concatenate([top_neg, flat])
            if top_neg.size > top_k:
                top_neg = top_neg[np.argpartition(top_neg, top_neg.size - top_k)[top_neg.size - top_k:]]
    top_neg = np.sort(top_neg)[::-1]
    cmc = {int(k): float(np.mean(ahead < k)) for k in ranks}
    tpir, thresholds = {}, {}
    for f, k in zip(fpirs, need):
        if 0 < k <= top_neg.size:
            thresholds[float(f)] = th = float(top_neg[k - 1])
            tpir[float(f)] = float(np.sum(mated > th) / q)
        else:
            thresholds[float(f)] = tpir[float(f)] = None
    return IdentificationResult(cmc, tpir, thresholds, q, g)

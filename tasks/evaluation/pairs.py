"""Pair verification metrics with the InsightFace protocol (formats-spec 4.5-4.7), vectorised.

Input: one embedding per image, pair ``i`` = rows ``(2i, 2i+1)``, already flip-fused and
L2-normalised (:func:`fuse_flip`), and one ``issame`` flag per pair.

* Accuracy: squared Euclidean distance ``d = sum((e1 - e2)**2)`` (in ``[0, 4]`` = ``2 - 2 cos`` for
  unit vectors); contiguous unshuffled folds (scikit-learn ``KFold(shuffle=False)`` sizes: the first
  ``P % nfolds`` folds hold one pair more); threshold grid ``np.arange(0, 4, 0.01)``; a pair is
  predicted "same" iff ``d < t``; per fold the **first** grid threshold with the best accuracy on the
  other folds is applied to the held-out fold. Mean and population std over folds.
* VAL@FAR=1e-3: grid ``np.arange(0, 4, 0.001)``, threshold where the training-fold FAR reaches
  1e-3 by the closed-form linear interpolation of spec 4.7 (what SciPy's ``interp1d(kind='slinear')``
  did before it started rejecting the duplicate FAR values), 0 when the FAR never reaches 1e-3.
* ROC over all pairs (not per fold) and TAR at fixed FARs, from sorted distances.

The numbers equal the original per-threshold loops exactly (``bench/verification.py`` holds that
reference; ``tests/test_verification.py`` compares them): every count is an integer obtained with
``searchsorted`` on sorted distances, and every rate is the same float division the loops perform.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

from datasets.atomic import atomic_paths
from tasks.evaluation.config import DEFAULT_FAR_TARGETS  # re-exported

ACCURACY_GRID = np.arange(0, 4, 0.01)
"""Thresholds searched for the accuracy (400 values 0.00 ... 3.99), as InsightFace ``evaluate``."""
VAL_GRID = np.arange(0, 4, 0.001)
"""Thresholds for VAL@FAR (4000 values), as InsightFace ``evaluate``."""
VAL_FAR_TARGET = 1e-3


def fuse_flip(emb: np.ndarray, emb_flip: np.ndarray) -> np.ndarray:
    """Flip-test fusion ``normalize(emb + emb_flip)``: raw embeddings are summed, then L2-normalised.

    ``emb``, ``emb_flip``: ``(N, D)`` raw embeddings of the images and of their mirrors. Returns
    ``(N, D)`` in the inputs' float dtype; an all-zero sum stays zero (as scikit-learn ``normalize``).
    """
    emb = np.asarray(emb)
    emb_flip = np.asarray(emb_flip)
    if emb.ndim != 2 or emb.shape != emb_flip.shape:
        raise ValueError(f"fuse_flip needs two (N, D) arrays of the same shape, got {emb.shape} and {emb_flip.shape}")
    total = emb + emb_flip
    if not np.issubdtype(total.dtype, np.floating):
        total = total.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", total, total))
    norms[norms == 0] = 1
    return total / norms[:, None]


def fold_bounds(n_pairs: int, nfolds: int) -> list[tuple[int, int]]:
    """Contiguous folds ``[(start, stop), ...]`` sized like scikit-learn ``KFold(nfolds, shuffle=False)``.

    ``nfolds == 1`` is InsightFace's ``LFold``: a single fold that is both training and test set.
    """
    if nfolds < 1:
        raise ValueError(f"nfolds must be >= 1, got {nfolds}")
    if n_pairs < nfolds:
        raise ValueError(f"cannot split {n_pairs} pairs into {nfolds} folds")
    sizes = np.full(nfolds, n_pairs // nfolds)
    sizes[: n_pairs % nfolds] += 1
    stops = np.cumsum(sizes)
    return [(int(stop - size), int(stop)) for size, stop in zip(sizes, stops)]


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """``(2P, D)`` embeddings -> ``(P,)`` squared Euclidean distances of rows ``2i`` and ``2i+1``."""
    return np.sum(np.square(embeddings[0::2] - embeddings[1::2]), 1)


def _check_inputs(embeddings: Any, issame: Any) -> tuple[np.ndarray, np.ndarray]:
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a (2P, D) array, got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"embeddings must be floating point, got dtype {emb.dtype}")
    same = np.asarray(issame)
    if same.ndim != 1:
        raise ValueError(f"issame must be a 1-D sequence of booleans, got shape {same.shape}")
    if same.dtype != bool:
        bad = np.flatnonzero(~np.isin(same, (0, 1)))
        if bad.size:
            raise ValueError(f"issame[{bad[0]}] = {same[bad[0]].item()!r} is not a boolean (expected True/False or 1/0)")
        same = same.astype(bool)
    if emb.shape[0] != 2 * same.shape[0]:
        raise ValueError(
            f"expected 2 x {same.shape[0]} = {2 * same.shape[0]} embeddings for {same.shape[0]} pairs, "
            f"got {emb.shape[0]}"
        )
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        col = int(np.flatnonzero(~np.isfinite(emb[row]))[0])
        raise ValueError(
            f"embedding row {row} (pair {row // 2}, {'first' if row % 2 == 0 else 'second'} image) "
            f"holds {emb[row, col]} at dimension {col} (expected finite values)"
        )
    return emb, same


class _FoldCounts:
    """Per fold and grid threshold: how many same / different pairs have ``d < t`` (int64 arrays)."""

    def __init__(self, dist: np.ndarray, issame: np.ndarray, bounds: list[tuple[int, int]], grid: np.ndarray):
        self.bounds = bounds
        self.single = len(bounds) == 1
        pos_lt, neg_lt, n_pos, n_neg = [], [], [], []
        for start, stop in bounds:
            d, s = dist[start:stop], issame[start:stop]
            pos, neg = np.sort(d[s]), np.sort(d[~s])
            pos_lt.append(np.searchsorted(pos, grid, side="left"))
            neg_lt.append(np.searchsorted(neg, grid, side="left"))
            n_pos.append(pos.size)
            n_neg.append(neg.size)
        self.pos_lt, self.neg_lt = np.array(pos_lt), np.array(neg_lt)  # (k, T)
        self.n_pos, self.n_neg = np.array(n_pos), np.array(n_neg)  # (k,)

    def train(self, f: int) -> tuple[np.ndarray, np.ndarray, int, int]:
        """``(pos_lt, neg_lt, n_pos, n_neg)`` of the training folds of fold ``f`` (all pairs if one fold)."""
        if self.single:
            return self.pos_lt[0], self.neg_lt[0], int(self.n_pos[0]), int(self.n_neg[0])
        return (
            self.pos_lt.sum(0) - self.pos_lt[f],
            self.neg_lt.sum(0) - self.neg_lt[f],
            int(self.n_pos.sum() - self.n_pos[f]),
            int(self.n_neg.sum() - self.n_neg[f]),
        )


def far_threshold(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """Threshold at which a nondecreasing FAR curve reaches ``target`` (formats-spec 4.7 closed form).

    ``a`` = largest FAR <= target, ``b`` = smallest FAR > target, ``t_a`` = the largest threshold with
    FAR ``a``, ``t_b`` = the smallest with FAR ``b``; result ``t_a + (t_b - t_a)(target - a)/(b - a)``.
    This is a degree-1 B-spline with repeated knots, i.e. old SciPy ``interp1d(far, thresholds,
    kind='slinear')(target)``. Returns 0.0 when the FAR never reaches ``target`` (as InsightFace).
    When the largest FAR equals ``target`` exactly there is no ``b``: the result is ``t_a`` (old SciPy
    returned 0.0 there when the last two FAR values were equal, an artefact not reproduced).
    """
    if far.size == 0 or far[-1] < target:
        return 0.0
    i_a = int(np.searchsorted(far, target, side="right")) - 1
    if i_a == far.size - 1:
        return float(thresholds[i_a])
    a, b = far[i_a], far[i_a + 1]
    t_a, t_b = thresholds[i_a], thresholds[i_a + 1]
    return float(t_a + (t_b - t_a) * (target - a) / (b - a))


def accuracy_folds(dist: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Held-out accuracy and chosen threshold per fold, ``(nfolds,)`` each (spec 4.6).

    ``dist``: ``(P,)`` squared distances, ``issame``: ``(P,)`` bool. Per fold the counts of pairs with
    ``d < t`` for all 400 grid thresholds come from ``searchsorted`` on the fold's sorted distances;
    training counts are the total minus the held-out fold's.
    """
    bounds = fold_bounds(issame.size, nfolds)
    counts = _FoldCounts(dist, issame, bounds, ACCURACY_GRID)
    fold_acc = np.zeros(len(bounds))
    fold_thr = np.zeros(len(bounds))
    for f, (start, stop) in enumerate(bounds):
        pos_lt, neg_lt, _, n_neg = counts.train(f)
        n_train = issame.size if counts.single else issame.size - (stop - start)
        best = int(np.argmax((pos_lt + (n_neg - neg_lt)) / n_train))
        correct = counts.pos_lt[f, best] + (counts.n_neg[f] - counts.neg_lt[f, best])
        fold_acc[f] = float(correct) / (stop - start)
        fold_thr[f] = ACCURACY_GRID[best]
    return fold_acc, fold_thr


def val_folds(
    dist: np.ndarray, issame: np.ndarray, nfolds: int = 10, notes: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per fold VAL, FAR and threshold at the training FAR of 1e-3, ``(nfolds,)`` each (spec 4.7).

    A fold whose test part or training part lacks same or different pairs gets NaN (the original
    divides by zero there) and a line in ``notes``.
    """
    bounds = fold_bounds(issame.size, nfolds)
    counts = _FoldCounts(dist, issame, bounds, VAL_GRID)
    vals = np.full(len(bounds), np.nan)
    fars = np.full(len(bounds), np.nan)
    thresholds = np.full(len(bounds), np.nan)
    for f, (start, stop) in enumerate(bounds):
        _, neg_lt, _, n_neg = counts.train(f)
        n_pos_test, n_neg_test = int(counts.n_pos[f]), int(counts.n_neg[f])
        if n_neg == 0 or n_pos_test == 0 or n_neg_test == 0:
            if notes is not None:
                notes.append(f"VAL undefined in fold {f}: it or its training folds lack same or different pairs")
            continue
        threshold = far_threshold(neg_lt / n_neg, VAL_GRID, VAL_FAR_TARGET)
        d, s = dist[start:stop], issame[start:stop]
        vals[f] = float(np.count_nonzero(d[s] < threshold)) / n_pos_test
        fars[f] = float(np.count_nonzero(d[~s] < threshold)) / n_neg_test
        thresholds[f] = threshold
    return vals, fars, thresholds



@dataclasses.dataclass(frozen=True)
class TarAtFar:
    """TAR at the largest achievable FAR <= ``target`` (accept iff score > ``threshold``)."""

    target: float
    tar: float
    far: float
    threshold: float
    n_genuine: int
    n_impostor: int


def tar_at_far(
    genuine_scores: np.ndarray,
    impostor_scores: np.ndarray,
    target: float,
    n_impostors: int | None = None,
) -> TarAtFar | None:
    """TAR at the largest FAR <= ``target``; higher score = more alike (use ``-distance``).

    ``impostor_scores`` may hold only the highest ``floor(target * n_impostors) + 1`` impostor scores
    when ``n_impostors`` (the full count) is given, which is how MegaFace's 3.5e9 impostor pairs are
    handled. Accepting iff ``score > v`` with ``v`` the ``(k+1)``-th highest impostor score, where
    ``k = floor(target * n)``, accepts at most ``k`` impostors and as many genuine pairs as any threshold
    that does. Returns None when ``target < 1 / n`` (too few impostor pairs to measure that FAR).
    """
    genuine = np.asarray(genuine_scores, dtype=np.float64).ravel()
    impostor = np.asarray(impostor_scores, dtype=np.float64).ravel()
    n = impostor.size if n_impostors is None else int(n_impostors)
    if genuine.size == 0 or n == 0:
        raise ValueError(f"TAR@FAR needs genuine and impostor pairs, got {genuine.size} and {n}")
    if target * n < 1 - 1e-9:
        return None
    k = int(math.floor(target * n * (1 + 1e-12)))
    if k >= n:
        return TarAtFar(target, 1.0, 1.0, -math.inf, genuine.size, n)
    if impostor.size < min(k + 1, n):
        raise ValueError(f"need the {k + 1} highest impostor scores for FAR {target:g} of {n} pairs, got {impostor.size}")
    v = float(np.partition(impostor, impostor.size - (k + 1))[impostor.size - (k + 1)])
    false_accepts = int(np.count_nonzero(impostor > v))
    tar = float(np.count_nonzero(genuine > v)) / genuine.size
    return TarAtFar(target, tar, false_accepts / n, v, genuine.size, n)


def roc_curve(dist: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC over all pairs: ``(far, tar, thresholds)``, one point per distinct distance plus ``(0, 0)``.

    Point ``i`` accepts the pairs with ``d <= thresholds[i]`` (``thresholds[0] = -inf``). Built from one
    stable sort and cumulative counts; both rates are nondecreasing and end at 1.
    """
    order = np.argsort(dist, kind="stable")
    d, s = dist[order], issame[order]
    tp, fp = np.cumsum(s), np.cumsum(~s)
    last = np.r_[np.flatnonzero(d[1:] != d[:-1]), d.size - 1]
    n_pos, n_neg = max(int(tp[-1]), 1), max(int(fp[-1]), 1)
    far = np.r_[0.0, fp[last] / n_neg]
    tar = np.r_[0.0, tp[last] / n_pos]
    return far, tar, np.r_[-np.inf, d[last]]


def far_key(target: float) -> str:
    """Column name for a FAR target: ``1e-4 -> 'tar@far=1e-04'``."""
    return f"tar@far={target:.0e}"


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    """Outcome of :func:`evaluate_verification`. Rates are fractions in [0, 1], thresholds squared distances."""

    accuracy: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    val: float
    val_std: float
    far: float
    fold_val_thresholds: np.ndarray
    roc_far: np.ndarray
    roc_tar: np.ndarray
    roc_thresholds: np.ndarray
    tar_at_far: dict[float, TarAtFar | None]
    xnorm: float | None
    n_pairs: int
    n_same: int
    n_diff: int
    nfolds: int
    notes: tuple[str, ...] = ()

    def to_row(self) -> dict[str, Any]:
        """Flat scalars for a Parquet row or a Prefect table artifact (TAR columns None when not measurable)."""
        row: dict[str, Any] = {
            "n_pairs": self.n_pairs,
            "n_same": self.n_same,
            "n_diff": self.n_diff,
            "nfolds": self.nfolds,
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold_mean": float(np.mean(self.fold_thresholds)),
            "val@far=1e-03": self.val,
            "val_std": self.val_std,
            "val_far": self.far,
            "xnorm": self.xnorm,
        }
        for target, hit in self.tar_at_far.items():
            row[far_key(target)] = None if hit is None else hit.tar
        row["notes"] = "; ".join(self.notes)
        return row

    def summary(self, name: str = "") -> str:
        """One line in InsightFace's log style: ``[lfw]Accuracy-Flip: 0.99500+-0.00300``."""
        text = f"[{name}]Accuracy-Flip: {self.accuracy:1.5f}+-{self.accuracy_std:1.5f}"
        if self.xnorm is not None:
            text = f"[{name}]XNorm: {self.xnorm:f} " + text
        return text


def shuffled_pairs(n_pairs: int, seed: int) -> np.ndarray:
    """The pair order ``(P,)`` int64 that ``fold_seed=seed`` evaluates in (``numpy.random.default_rng(seed)``)."""
    return np.random.default_rng(seed).permutation(n_pairs)


def evaluate_verification(
    embeddings: np.ndarray,
    issame: Sequence[bool] | np.ndarray,
    nfolds: int = 10,
    far_targets: Iterable[float] = DEFAULT_FAR_TARGETS,
    raw_norms: np.ndarray | float | None = None,
    fold_seed: int | None = None,
) -> VerificationResult:
    """InsightFace verification metrics of ``embeddings`` ``(2P, D)`` float (pair ``i`` = rows ``2i, 2i+1``,
    fused and normalised) against ``issame`` ``(P,)`` bool.

    Folds are contiguous blocks of the pair list, as in LFW's ``pairs.txt`` (each of its 10 blocks holds
    300 same and 300 different pairs). A list that is not laid out in such blocks (a user's CSV sorted by
    person, all same pairs first, ...) gives folds of one kind of pair: pass ``fold_seed`` to split a
    seeded permutation of the pairs (:func:`shuffled_pairs`) instead. Fewer pairs than ``nfolds`` are
    evaluated with one fold per pair (a single pair: one fold that is also the training set) and a note
    says so, instead of an error.

    ``raw_norms``: L2 norms of the raw (pre-normalisation) embeddings, any shape; their mean is reported
    as XNorm. Raises ``ValueError`` naming the row for NaN/inf embeddings, the counts for a size mismatch,
    and for a set without pairs.
    """
    emb, same = _check_inputs(embeddings, issame)
    if nfolds < 1:
        raise ValueError(f"nfolds must be >= 1, got {nfolds}")
    if same.size == 0:
        raise ValueError("the set has no pairs")
    dist = pair_distances(emb)
    notes: list[str] = []
    if fold_seed is not None:
        order = shuffled_pairs(same.size, fold_seed)
        dist, same = dist[order], same[order]
        notes.append(f"folds drawn from the pairs shuffled with seed {fold_seed}")
    if same.size < nfolds:
        notes.append(f"{same.size} pairs are fewer than {nfolds} folds: {same.size} fold(s) of one pair used"
                     + (" (the single fold is also the training set)" if same.size == 1 else "")
                     + "; accuracy over so few pairs is a rough figure")
        nfolds = int(same.size)

    fold_acc, fold_thr = accuracy_folds(dist, same, nfolds)
    vals, fars, val_thr = val_folds(dist, same, nfolds, notes)

    n_same, n_diff = int(same.sum()), int((~same).sum())
    roc_far, roc_tar, roc_thr = roc_curve(dist, same)
    tars: dict[float, TarAtFar | None] = {}
    for target in far_targets:
        target = float(target)
        if n_same == 0 or n_diff == 0:
            tars[target] = None
            continue
        tars[target] = tar_at_far(-dist[same], -dist[~same], target)
        if tars[target] is None:
            notes.append(f"TAR@FAR={target:.0e} needs >= {math.ceil(1 / target):,} different pairs, this set has {n_diff:,}")
    if n_same == 0 or n_diff == 0:
        notes.append(f"ROC and TAR undefined: {n_same} same and {n_diff} different pairs")

    xnorm = None if raw_norms is None else float(np.mean(np.asarray(raw_norms, dtype=np.float64)))
    return VerificationResult(
        accuracy=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        fold_accuracies=fold_acc,
        fold_thresholds=fold_thr,
        val=float(np.mean(vals)),
        val_std=float(np.std(vals)),
        far=float(np.mean(fars)),
        fold_val_thresholds=val_thr,
        roc_far=roc_far,
        roc_tar=roc_tar,
        roc_thresholds=roc_thr,
        tar_at_far=tars,
        xnorm=xnorm,
        n_pairs=int(same.size),
        n_same=n_same,
        n_diff=n_diff,
        nfolds=nfolds,
        notes=tuple(notes),
    )


def write_metrics(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Write metric rows (e.g. ``[result.to_row() | {"target": "lfw"}]``) as one Parquet table, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([dict(r) for r in rows])
    with atomic_paths(path) as (tmp,):
        pq.write_table(table, tmp)

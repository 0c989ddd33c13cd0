"""Verification metrics: ours (``tasks.evaluation.pairs``) against the original InsightFace loops.

``reference_verification`` restates InsightFace ``evaluate`` / ``calculate_roc`` /
``calculate_accuracy`` / ``calculate_val`` / ``calculate_val_far`` (formats-spec 4.6-4.7) as the
straightforward loops they are: per fold, one Python iteration per grid threshold, each computing the
confusion counts with boolean masks. The VAL threshold is what old SciPy's
``interp1d(far, thresholds, kind='slinear')`` computed (stable sort, degree-1 B-spline with the knots
``[x0, x..., xn]``, evaluated by de Boor's recursion), written out because SciPy is not a dependency
and modern SciPy refuses the duplicate FAR values.

Run: ``python bench/verification.py [--pairs 12000] [--dim 512]``; writes bench/results/verification.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import best_time, machine, write_result  # noqa: E402
from tasks.evaluation.pairs import accuracy_folds, evaluate_verification, pair_distances  # noqa: E402


def _kfold(n: int, nfolds: int):
    """(train indices, test indices) of contiguous unshuffled folds, like sklearn KFold / InsightFace LFold."""
    indices = np.arange(n)
    if nfolds == 1:
        return [(indices, indices)]
    sizes = [n // nfolds + (1 if i < n % nfolds else 0) for i in range(nfolds)]
    splits, start = [], 0
    for size in sizes:
        test = indices[start:start + size]
        train = np.concatenate([indices[:start], indices[start + size:]])
        splits.append((train, test))
        start += size
    return splits


def _accuracy(threshold, dist, actual_issame):
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, actual_issame))
    fp = np.sum(np.logical_and(predict, np.logical_not(actual_issame)))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(actual_issame)))
    fn = np.sum(np.logical_and(np.logical_not(predict), actual_issame))
    tpr = 0 if (tp + fn == 0) else float(tp) / float(tp + fn)
    fpr = 0 if (fp + tn == 0) else float(fp) / float(fp + tn)
    return tpr, fpr, float(tp + tn) / dist.size


def _val_far(threshold, dist, actual_issame):
    predict = np.less(dist, threshold)
    true_accept = np.sum(np.logical_and(predict, actual_issame))
    false_accept = np.sum(np.logical_and(predict, np.logical_not(actual_issame)))
    n_same = np.sum(actual_issame)
    n_diff = np.sum(np.logical_not(actual_issame))
    return float(true_accept) / float(n_same), float(false_accept) / float(n_diff)


def old_scipy_slinear(x: np.ndarray, y: np.ndarray, x_new: float) -> float:
    """``scipy.interpolate.interp1d(x, y, kind='slinear')(x_new)`` as SciPy <= 1.8 computed it.

    interp1d sorts x with a stable sort; ``make_interp_spline(k=1)`` returned
    ``BSpline([x0, x..., xn], y, 1)`` before any duplicate check; evaluation finds the knot interval
    ``t[l] <= x_new < t[l+1]`` (the last non-empty interval when ``x_new`` is the right end) and blends
    the two coefficients; an empty interval contributes 0.
    """
    order = np.argsort(x, kind="mergesort")
    x, y = x[order], y[order]
    if x_new < x[0] or x_new > x[-1]:
        raise ValueError("A value in x_new is outside the interpolation range.")
    t = np.r_[x[0], x, x[-1]]
    k, n = 1, y.size
    ell = k
    while x_new >= t[ell + 1] and ell + 1 != n:
        ell += 1
    xa, xb = t[ell], t[ell + 1]
    if xb == xa:
        return 0.0
    w = 1.0 / (xb - xa)
    return float(y[ell - 1] * (w * (xb - x_new)) + y[ell] * (w * (x_new - xa)))


def reference_verification(embeddings: np.ndarray, issame, nfolds: int = 10) -> dict:
    """InsightFace ``evaluate``: fold accuracies and thresholds, VAL@FAR=1e-3 (mean, std), mean FAR, ROC grid."""
    embeddings1, embeddings2 = embeddings[0::2], embeddings[1::2]
    actual_issame = np.asarray(issame)
    dist = np.sum(np.square(np.subtract(embeddings1, embeddings2)), 1)
    n = min(len(actual_issame), embeddings1.shape[0])
    folds = _kfold(n, nfolds)

    thresholds = np.arange(0, 4, 0.01)
    tprs = np.zeros((nfolds, len(thresholds)))
    fprs = np.zeros((nfolds, len(thresholds)))
    accuracy = np.zeros(nfolds)
    best_thresholds = np.zeros(nfolds)
    for fold_idx, (train_set, test_set) in enumerate(folds):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = _accuracy(threshold, dist[train_set], actual_issame[train_set])
        best = np.argmax(acc_train)
        for threshold_idx, threshold in enumerate(thresholds):
            tprs[fold_idx, threshold_idx], fprs[fold_idx, threshold_idx], _ = _accuracy(
                threshold, dist[test_set], actual_issame[test_set])
        _, _, accuracy[fold_idx] = _accuracy(thresholds[best], dist[test_set], actual_issame[test_set])
        best_thresholds[fold_idx] = thresholds[best]

    thresholds = np.arange(0, 4, 0.001)
    val = np.zeros(nfolds)
    far = np.zeros(nfolds)
    val_thresholds = np.zeros(nfolds)
    for fold_idx, (train_set, test_set) in enumerate(folds):
        far_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, far_train[threshold_idx] = _val_far(threshold, dist[train_set], actual_issame[train_set])
        if np.max(far_train) >= 1e-3:
            threshold = old_scipy_slinear(far_train, thresholds, 1e-3)
        else:
            threshold = 0.0
        val[fold_idx], far[fold_idx] = _val_far(threshold, dist[test_set], actual_issame[test_set])
        val_thresholds[fold_idx] = threshold

    return {
        "accuracy": accuracy,
        "thresholds": best_thresholds,
        "val": float(np.mean(val)),
        "val_std": float(np.std(val)),
        "far": float(np.mean(far)),
        "val_thresholds": val_thresholds,
        "tpr": np.mean(tprs, 0),
        "fpr": np.mean(fprs, 0),
    }


def reference_accuracy_search(dist: np.ndarray, issame, nfolds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Only ``calculate_roc``'s threshold search on given distances: fold accuracies and thresholds."""
    actual_issame = np.asarray(issame)
    thresholds = np.arange(0, 4, 0.01)
    accuracy = np.zeros(nfolds)
    best_thresholds = np.zeros(nfolds)
    for fold_idx, (train_set, test_set) in enumerate(_kfold(dist.size, nfolds)):
        acc_train = np.zeros(len(thresholds))
        for threshold_idx, threshold in enumerate(thresholds):
            _, _, acc_train[threshold_idx] = _accuracy(threshold, dist[train_set], actual_issame[train_set])
        best = np.argmax(acc_train)
        _, _, accuracy[fold_idx] = _accuracy(thresholds[best], dist[test_set], actual_issame[test_set])
        best_thresholds[fold_idx] = thresholds[best]
    return accuracy, best_thresholds


def synthetic_pairs(n_pairs: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(2P, dim)`` float32 unit embeddings and ``(P,)`` issame in LFW order (each of 10 contiguous
    folds: first half same pairs, then different pairs). Same pairs = an anchor plus noise of a
    per-pair scale, so that a few percent of them are hard (accuracy around 0.98)."""
    rng = np.random.default_rng(seed)
    issame = np.zeros(n_pairs, dtype=bool)
    fold = -(-n_pairs // 10)
    for start in range(0, n_pairs, fold):
        issame[start:start + min(fold // 2, n_pairs - start)] = True
    first = rng.standard_normal((n_pairs, dim))
    scale = np.exp(rng.normal(1.0, 0.6, size=(n_pairs, 1)))
    second = np.where(issame[:, None], first + scale * rng.standard_normal((n_pairs, dim)),
                      rng.standard_normal((n_pairs, dim)))
    emb = np.empty((2 * n_pairs, dim))
    emb[0::2], emb[1::2] = first, second
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), issame


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=12000, help="number of pairs (LFW has 6000)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="accepted for symmetry; this benchmark is numpy on the CPU")
    args = parser.parse_args(argv)

    emb, issame = synthetic_pairs(args.pairs, args.dim)
    dist = pair_distances(emb)
    ours_search_s, (ours_acc, ours_thr) = best_time(lambda: accuracy_folds(dist, issame, 10), repeat=20)
    ref_search_s, (ref_acc, ref_thr) = best_time(lambda: reference_accuracy_search(dist, issame, 10), repeat=2)
    ours_full_s, ours = best_time(lambda: evaluate_verification(emb, issame), repeat=5)
    ref_full_s, ref = best_time(lambda: reference_verification(emb, issame), repeat=1)

    same = bool(np.array_equal(ours_acc, ref_acc) and np.array_equal(ours_thr, ref_thr)
                and np.array_equal(ours.fold_accuracies, ref["accuracy"])
                and np.array_equal(ours.fold_thresholds, ref["thresholds"])
                and abs(ours.val - ref["val"]) <= 1e-12)
    result = {
        "pairs": args.pairs,
        "dim": args.dim,
        "accuracy": ours.accuracy,
        "val@far=1e-3": ours.val,
        "identical_to_reference": same,
        "accuracy_search_s": {"ours": ours_search_s, "reference": ref_search_s, "ratio": ref_search_s / ours_search_s},
        "full_evaluate_s": {"ours": ours_full_s, "reference": ref_full_s, "ratio": ref_full_s / ours_full_s},
    }
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}")
    print(f"{args.pairs} pairs, dim {args.dim}: accuracy {ours.accuracy:.5f}, VAL@1e-3 {ours.val:.5f}, identical: {same}")
    print(f"accuracy threshold search (10 folds x 400 thresholds, distances given): ours {ours_search_s * 1e3:.2f} ms, "
          f"reference {ref_search_s * 1e3:.0f} ms, "
          f"x{result['accuracy_search_s']['ratio']:.0f}")
    print(f"full evaluate from embeddings (accuracy + VAL; ours also ROC + TAR): ours {ours_full_s * 1e3:.2f} ms, "
          f"reference {ref_full_s * 1e3:.0f} ms, x{result['full_evaluate_s']['ratio']:.0f}")
    print(f"wrote {write_result('verification', result)}")
    return result


if __name__ == "__main__":
    main()

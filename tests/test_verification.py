"""Verification metrics: exact agreement with the original InsightFace loops, known answers, bad input."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.verification import old_scipy_slinear, reference_verification, synthetic_pairs
from tasks.evaluation.pairs import (
    ACCURACY_GRID,
    evaluate_verification,
    far_threshold,
    fold_bounds,
    fuse_flip,
    pair_distances,
    roc_curve,
    tar_at_far,
    write_metrics,
)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_set(n_pairs: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return _unit(rng.standard_normal((2 * n_pairs, dim))), rng.random(n_pairs) < 0.5


def _quantised_set(n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings whose squared distances are exactly grid values k/100 (ties with thresholds)."""
    rng = np.random.default_rng(seed)
    same = rng.random(n_pairs) < 0.5
    # d = a^2 + b^2 with a, b multiples of 0.1: exact sums of few binary fractions are not guaranteed, so
    # use (0, 0) vs (x, 0) with x^2 = k/100 only where exact: x in {0.5, 1.0, 1.5, ...} and 0.25 steps.
    xs = np.where(same, rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], n_pairs), rng.choice([0.75, 1.0, 1.25, 1.5], n_pairs))
    emb = np.zeros((2 * n_pairs, 2))
    emb[1::2, 0] = xs
    return emb, same


def _assert_same_as_reference(emb: np.ndarray, issame: np.ndarray, nfolds: int = 10) -> None:
    ours = evaluate_verification(emb, issame, nfolds=nfolds)
    ref = reference_verification(emb, issame, nfolds=nfolds)
    np.testing.assert_array_equal(ours.fold_accuracies, ref["accuracy"])
    np.testing.assert_array_equal(ours.fold_thresholds, ref["thresholds"])
    assert ours.accuracy == np.mean(ref["accuracy"]) and ours.accuracy_std == np.std(ref["accuracy"])
    np.testing.assert_allclose(ours.fold_val_thresholds, ref["val_thresholds"], rtol=0, atol=1e-12)
    assert abs(ours.val - ref["val"]) <= 1e-12
    assert abs(ours.val_std - ref["val_std"]) <= 1e-12
    assert abs(ours.far - ref["far"]) <= 1e-12


@pytest.mark.parametrize("seed", [0, 1])
def test_random_embeddings_match_reference(seed):
    emb, issame = _random_set(400, 16, seed)  # chance level: many near-ties in accuracy across thresholds
    _assert_same_as_reference(emb, issame)


def test_lfw_like_float32_embeddings_match_reference():
    emb, issame = synthetic_pairs(1200, 64, seed=3)
    _assert_same_as_reference(emb, issame)
    ours = evaluate_verification(emb, issame)
    assert 0.8 < ours.accuracy < 1.0 and ours.val > 0  # a non-trivial set: the comparison above means something


@pytest.mark.parametrize("n_pairs,nfolds", [(403, 10), (250, 1), (333, 5)])
def test_grid_ties_uneven_folds_and_single_fold_match_reference(n_pairs, nfolds):
    emb, issame = _quantised_set(n_pairs, seed=n_pairs)
    _assert_same_as_reference(emb, issame, nfolds=nfolds)


def test_far_never_reaching_target_gives_threshold_zero_like_reference():
    # 40 different pairs per training set: the smallest non-zero FAR is 1/36 > 1e-3, so it is reached;
    # to never reach 1e-3 every different pair must lie beyond the grid (d >= 4).
    emb = np.zeros((40, 2))
    emb[1::2, 0] = np.where(np.arange(20) % 2 == 0, 0.5, 2.5)  # same: d = 0.25, different: d = 6.25
    issame = np.arange(20) % 2 == 0
    ours = evaluate_verification(emb, issame)
    ref = reference_verification(emb, issame)
    assert ours.val == ref["val"] == 0.0 and ours.far == 0.0
    assert ours.accuracy == 1.0


def test_known_answer_threshold_and_accuracy():
    # 20 pairs; pairs 0-9 same at d = 0.5; pairs 10-18 different and pair 19 same, all at d = 1.25.
    emb = np.zeros((40, 2))
    issame = np.arange(20) < 10
    issame[19] = True
    emb[1::2, 0] = np.where(np.arange(20) < 10, 0.5, 1.0)
    emb[1::2, 1] = 0.5
    dist = pair_distances(emb)
    assert np.all(dist[:10] == 0.5) and np.all(dist[10:] == 1.25)
    res = evaluate_verification(emb, issame, nfolds=2)
    # fold 0 = pairs 0-9 (all same, d = 0.5); fold 1 = pairs 10-19.
    # Testing fold 0: trained on fold 1, where no threshold separates pair 19 from the 9 different
    # pairs at the same distance: the best training accuracy 9/10 is first reached at t = 0.00.
    # Testing fold 1: trained on fold 0 (all same at 0.5): best = the first grid value > 0.5 (strict d < t).
    assert res.fold_thresholds[0] == ACCURACY_GRID[0]
    assert res.fold_thresholds[1] == ACCURACY_GRID[ACCURACY_GRID > 0.5][0] == ACCURACY_GRID[51]
    assert res.fold_accuracies[0] == 0.0  # t = 0 rejects every pair, all of fold 0 are same pairs
    assert res.fold_accuracies[1] == 0.9  # t just above 0.5 rejects all of fold 1; 9 of 10 are different
    assert res.accuracy == pytest.approx(0.45)


def test_fold_bounds_like_sklearn_kfold():
    assert fold_bounds(23, 5) == [(0, 5), (5, 10), (10, 15), (15, 19), (19, 23)]
    assert fold_bounds(6000, 10)[3] == (1800, 2400)
    assert fold_bounds(7, 1) == [(0, 7)]
    with pytest.raises(ValueError, match="cannot split 3 pairs into 10 folds"):
        fold_bounds(3, 10)


def test_far_threshold_closed_form_equals_old_scipy_spline():
    rng = np.random.default_rng(7)
    grid = np.arange(0, 4, 0.001)
    for _ in range(20):
        far = np.sort(rng.integers(0, 60, grid.size)) / 50.0  # many duplicates, like real FAR curves
        far = np.minimum(far, 1.0)
        for target in (1e-3, far[rng.integers(0, grid.size)], 0.5):
            if far.max() < target:
                assert far_threshold(far, grid, target) == 0.0
                continue
            if far[-1] == target and far[-2] == target:
                continue  # old SciPy's degenerate last interval (documented divergence)
            assert abs(far_threshold(far, grid, target) - old_scipy_slinear(far, grid, target)) <= 1e-12


def test_roc_and_tar_at_far_agree_and_are_monotone():
    emb, issame = synthetic_pairs(3000, 32, seed=5)
    res = evaluate_verification(emb, issame)
    far, tar = res.roc_far, res.roc_tar
    assert far[0] == 0 and tar[0] == 0 and far[-1] == 1 and tar[-1] == 1
    assert np.all(np.diff(far) >= 0) and np.all(np.diff(tar) >= 0)
    dist = pair_distances(emb)
    for target in (1e-1, 1e-2, 1e-3):
        hit = res.tar_at_far[target]
        i = np.flatnonzero(far <= target)[-1]  # largest ROC FAR <= target
        assert hit.tar == tar[i] and hit.far == far[i] <= target
        # brute force at the chosen threshold
        accept = dist < -hit.threshold
        assert hit.tar == accept[issame].mean() and hit.far == accept[~issame].mean()
    # 1500 different pairs cannot measure FAR 1e-4 or below
    assert res.tar_at_far[1e-4] is None and res.tar_at_far[1e-6] is None
    assert any("TAR@FAR=1e-04 needs >= 10,000 different pairs" in n for n in res.notes)
    assert res.to_row()["tar@far=1e-06"] is None and res.to_row()["tar@far=1e-02"] == res.tar_at_far[1e-2].tar


def test_tar_at_far_from_top_scores_only():
    rng = np.random.default_rng(1)
    genuine, impostor = rng.normal(1, 1, 500), rng.normal(-1, 1, 100_000)
    full = tar_at_far(genuine, impostor, 1e-4)
    top = np.sort(impostor)[-11:]  # k = 10 false accepts allowed, need the 11 highest
    part = tar_at_far(genuine, top, 1e-4, n_impostors=impostor.size)
    assert full == part and full.far <= 1e-4 and full.far == 10 / impostor.size
    with pytest.raises(ValueError, match="need the 11 highest"):
        tar_at_far(genuine, top[1:], 1e-4, n_impostors=impostor.size)


def test_roc_curve_ties_form_one_point():
    dist = np.array([0.1, 0.2, 0.2, 0.3])
    same = np.array([True, True, False, False])
    far, tar, thr = roc_curve(dist, same)
    np.testing.assert_array_equal(far, [0, 0, 0.5, 1])
    np.testing.assert_array_equal(tar, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [-np.inf, 0.1, 0.2, 0.3])


def test_fuse_flip_sums_before_normalising():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((5, 8)) * 3, rng.standard_normal((5, 8))
    fused = fuse_flip(a, b)
    np.testing.assert_allclose(fused, (a + b) / np.linalg.norm(a + b, axis=1, keepdims=True), rtol=1e-12)
    other_order = _unit(_unit(a) + _unit(b))
    assert not np.allclose(fused, other_order)
    assert np.all(fuse_flip(np.zeros((1, 3)), np.zeros((1, 3))) == 0)
    with pytest.raises(ValueError, match="same shape"):
        fuse_flip(a, b[:4])


def test_xnorm_summary_and_metrics_parquet(tmp_path):
    emb, issame = _random_set(100, 8, 4)
    res = evaluate_verification(emb, issame, raw_norms=np.array([[20.0, 22.0], [21.0, 21.0]]))
    assert res.xnorm == 21.0
    assert res.summary("lfw").startswith("[lfw]XNorm: 21.000000 [lfw]Accuracy-Flip: ")
    path = tmp_path / "metrics.parquet"
    write_metrics(path, [res.to_row() | {"target": "lfw"}])
    table = pq.read_table(path).to_pylist()
    assert table[0]["target"] == "lfw" and table[0]["accuracy"] == res.accuracy and table[0]["xnorm"] == 21.0


def test_bad_input_is_named():
    emb, issame = _random_set(10, 4, 0)
    with pytest.raises(ValueError, match=r"expected 2 x 10 = 20 embeddings for 10 pairs, got 19"):
        evaluate_verification(emb[:19], issame)
    bad = emb.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"embedding row 7 \(pair 3, second image\) holds nan at dimension 2"):
        evaluate_verification(bad, issame)
    with pytest.raises(ValueError, match=r"issame\[2\] = 2 is not a boolean"):
        evaluate_verification(emb, [1, 0, 2, 0, 1, 0, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="the set has no pairs"):
        evaluate_verification(emb[:0], issame[:0])


def test_fewer_pairs_than_folds_is_a_note_and_fewer_folds():
    emb, issame = _random_set(6, 4, 2)
    res = evaluate_verification(emb, issame, nfolds=10)
    assert res.nfolds == 6 and res.fold_accuracies.shape == (6,)
    assert "6 pairs are fewer than 10 folds: 6 fold(s) of one pair used" in res.to_row()["notes"]
    exact = evaluate_verification(emb, issame, nfolds=6)
    assert res.accuracy == exact.accuracy and res.accuracy_std == exact.accuracy_std
    one = evaluate_verification(emb[:2], issame[:1], nfolds=10)
    assert one.nfolds == 1 and "single fold is also the training set" in one.to_row()["notes"]


def test_shuffled_folds_are_the_contiguous_folds_of_a_seeded_permutation():
    """A list sorted by kind (all same pairs first) gives one-kind folds; fold_seed splits a seeded
    permutation instead, exactly as if the list had been written in that order."""
    emb, issame = _random_set(200, 8, 4)
    emb[0::2][issame] = emb[1::2][issame] + 0.05  # same pairs close: a learnable set
    order = np.argsort(~issame, kind="stable")  # same pairs first, as a hand-written CSV might be
    rows = np.stack([2 * order, 2 * order + 1], 1).ravel()
    sorted_emb, sorted_same = emb[rows], issame[order]
    contiguous = evaluate_verification(sorted_emb, sorted_same)
    shuffled = evaluate_verification(sorted_emb, sorted_same, fold_seed=7)
    perm = np.random.default_rng(7).permutation(200)
    rows = np.stack([2 * perm, 2 * perm + 1], 1).ravel()
    by_hand = evaluate_verification(sorted_emb[rows], sorted_same[perm])
    np.testing.assert_array_equal(shuffled.fold_accuracies, by_hand.fold_accuracies)
    assert shuffled.val == by_hand.val and "shuffled with seed 7" in shuffled.to_row()["notes"]
    np.testing.assert_array_equal(shuffled.roc_tar, contiguous.roc_tar)  # the ROC does not depend on order
    # one-kind folds: VAL cannot be measured in them; shuffled folds hold both kinds
    assert "VAL undefined in fold 0" in contiguous.to_row()["notes"] and np.isnan(contiguous.val)
    assert "VAL undefined" not in shuffled.to_row()["notes"] and not np.isnan(shuffled.val)

"""IJB-B/IJB-C evaluation: the metrics equal arcface_torch's ``eval_ijbc.py`` (and InsightFace's
``ijb_1n.py``) computation, re-stated below from the published scripts in plain loops; the stage and
the command on a generated set in the exact IJB layout with known answers; protocol file errors."""
from __future__ import annotations

import heapq
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from build_data import export_onnx
from datasets.errors import FormatError
from datasets.ijb import load_meta
from eval_data import CodeEmbedder, CountingCodeEmbedder
from ijb_data import KNOWN_CMC, KNOWN_TAR, KNOWN_TPIR, expected_scores, reference_pool, write_ijb
from tasks.evaluation.ijb import (FAR_TARGETS, identification, image_features, pair_scores, pool_templates, roc_curve,
                                  tar_at_far)
from tasks.ijb import IjbConfig, main, run_ijb
from tasks.stage import load_record

X_LABELS = [10 ** -6, 10 ** -5, 10 ** -4, 10 ** -3, 10 ** -2, 10 ** -1]


# --- eval_ijbc.py / ijb_1n.py, re-stated ------------------------------------------------------------


def ref_image_feats(img_feats, faceness, use_flip_test=True, use_norm_score=True, use_detector_score=True):
    half = img_feats.shape[1] // 2
    x = img_feats[:, :half] + img_feats[:, half:] if use_flip_test else img_feats[:, :half]
    if not use_norm_score:
        x = x / np.sqrt(np.sum(x ** 2, -1, keepdims=True))
    return x * faceness[:, np.newaxis] if use_detector_score else x


def ref_templates(img_feats, templates, medias):
    unique_templates = np.unique(templates)
    template_feats = reference_pool(img_feats, templates, medias, unique_templates)
    norms = np.sqrt(np.einsum("ij,ij->i", template_feats, template_feats))  # sklearn.preprocessing.normalize
    norms[norms == 0.0] = 1.0
    return template_feats / norms[:, np.newaxis], unique_templates


def ref_scores(template_feats, unique_templates, p1, p2):
    template2id = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for count, uqt in enumerate(unique_templates):
        template2id[uqt] = count
    return np.sum(template_feats[template2id[p1]] * template_feats[template2id[p2]], -1).flatten()


def ref_roc_curve(y_true, y_score, drop_intermediate=True):
    """sklearn.metrics.roc_curve (positive label 1, no weights)."""
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score, y_true = y_score[desc], y_true[desc]
    distinct = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    if drop_intermediate and len(fps) > 2:
        optimal = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        fps, tps = fps[optimal], tps[optimal]
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    return fps / fps[-1], tps / tps[-1]


def ref_tar_row(label, score, drop_intermediate=True, x_labels=X_LABELS):
    fpr, tpr = ref_roc_curve(label, score, drop_intermediate)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    row = []
    for x in x_labels:
        _, min_index = min(list(zip(abs(fpr - x), range(len(fpr)))))
        row.append(tpr[min_index])
    return row


def ref_identification(query_feats, gallery_feats, mask):
    similarity = np.dot(query_feats, gallery_feats.T)
    top_inds = np.argsort(-similarity)
    q = query_feats.shape[0]
    cmc = [sum(mask[i] in top_inds[i, :k] for i in range(q)) / q for k in (1, 5, 10)]
    required = [math.ceil(q * x) for x in (0.01, 0.1)]
    pos = []
    for i in range(q):
        pos.append(similarity[i, mask[i]])
        similarity[i, mask[i]] = -2.0
    neg = heapq.nlargest(max(required), similarity[np.where(similarity > -2.0)])
    return cmc, [np.sum(np.array(pos) > neg[k - 1]) / q for k in required]


def _random_protocol(seed=0, n_images=700, n_templates=90, n_subjects=30, dim=16, n_pairs=1500):
    rng = np.random.default_rng(seed)
    subject_of_template = np.r_[np.arange(n_subjects), rng.integers(0, n_subjects, n_templates - n_subjects)]
    template_ids = rng.choice(np.arange(10, 5000), n_templates, replace=False)
    which = np.r_[np.arange(n_templates), rng.integers(0, n_templates, n_images - n_templates)]
    rng.shuffle(which)
    templates = template_ids[which]
    medias = rng.integers(0, 60, n_images)  # media ids shared across templates
    centres = rng.normal(size=(n_subjects, dim))
    base = centres[subject_of_template[which]]
    raw = np.concatenate([base + rng.normal(scale=4.0, size=base.shape), base + rng.normal(scale=4.0, size=base.shape)], 1)
    raw = (raw * rng.uniform(0.5, 3.0, (n_images, 1))).astype(np.float32)
    faceness = rng.uniform(0.3, 1.0, n_images).astype(np.float32)
    a, b = rng.integers(0, n_templates, n_pairs), rng.integers(0, n_templates, n_pairs)
    same = rng.random(n_pairs) < 0.3  # a third genuine
    b = np.where(same, [rng.choice(np.flatnonzero(subject_of_template == subject_of_template[i])) for i in a], b)
    labels = (subject_of_template[a] == subject_of_template[b]).astype(int)
    return raw, faceness, templates, medias, template_ids[a], template_ids[b], labels, template_ids, subject_of_template


@pytest.mark.parametrize("flip, norm_score, detector_score", [(True, True, True), (False, False, True), (True, False, False)])
def test_verification_equals_eval_ijbc(flip, norm_score, detector_score):
    raw, faceness, templates, medias, t1, t2, labels, _, _ = _random_protocol()
    ref_feats = ref_image_feats(raw, faceness, flip, norm_score, detector_score)
    feats = image_features(raw if flip else raw[:, :raw.shape[1] // 2], faceness, flip=flip, norm_score=norm_score,
                           detector_score=detector_score)
    np.testing.assert_array_equal(feats, ref_feats)
    ref_t, ref_ids = ref_templates(ref_feats, templates, medias)
    ids, pooled = pool_templates(feats, templates, medias)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(pooled, ref_t, rtol=0, atol=1e-14)
    # scores and ROC from the same template features (pooling above is checked to a tolerance: summation
    # order may differ between CPUs' kernels), so the exact comparisons below hold on any x86 CPU
    ref_s = ref_scores(pooled, ids, t1, t2)
    assert len(np.unique(ref_s)) < len(ref_s)  # exact ties (repeated and reversed pairs): they shape the ROC's points
    scores = pair_scores(ids, pooled, t1, t2, batch=256)  # several batches
    np.testing.assert_array_equal(scores, ref_s)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    ref_fpr, ref_tpr = ref_roc_curve(labels, ref_s)
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_array_equal(tpr, ref_tpr)
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds) < 0)
    tars = tar_at_far(fpr, tpr, FAR_TARGETS)
    assert list(tars.values()) == ref_tar_row(labels, ref_s)
    assert 0.05 < tars[1e-1] < 0.999  # a curve with something to measure


def test_roc_rule_with_ties_and_dropped_points():
    """Quantised scores: ties merge into one point; drop_intermediate removes collinear points, and
    that changes which point is nearest a FAR target (the test would see it)."""
    rng = np.random.default_rng(3)
    differs = 0
    for trial in range(40):
        n = int(rng.integers(20, 400))
        labels = (rng.random(n) < rng.uniform(0.2, 0.8)).astype(int)
        labels[:2] = [0, 1]
        scores = np.round(rng.normal(labels * rng.uniform(0.5, 2.0), 1.0) * 4) / 4
        fpr, tpr, _ = roc_curve(labels, scores)
        ref_fpr, ref_tpr = ref_roc_curve(labels, scores)
        np.testing.assert_array_equal(fpr, ref_fpr)
        np.testing.assert_array_equal(tpr, ref_tpr)
        assert list(tar_at_far(fpr, tpr, X_LABELS).values()) == ref_tar_row(labels, scores)
        differs += ref_tar_row(labels, scores) != ref_tar_row(labels, scores, drop_intermediate=False)
    # hand case: 4 impostors in a row, each at its own score, then the rest: the middle points go
    labels = np.array([0, 0, 0, 0, 1, 1, 0, 1, 1, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.4, 0.3, 0.2, 0.1])
    fpr, tpr, _ = roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr * 5, [0, 1, 4, 4, 5, 5])
    np.testing.assert_array_equal(tpr * 5, [0, 0, 0, 2, 2, 5])
    assert tar_at_far(fpr, tpr, [0.45])[0.45] == 0.0  # nearest FPR is 0.2 (0.25 away), not 0.8 (0.35)
    # equally near points (FPR 0.25 and 0.5 around 0.375, exact in binary): the larger FPR, then the larger TPR
    labels = np.array([0, 1, 0, 1, 0, 0, 1])
    scores = np.arange(7, 0, -1) / 10
    fpr, tpr, _ = roc_curve(labels, scores)
    assert tar_at_far(fpr, tpr, [0.375])[0.375] == ref_tar_row(labels, scores, x_labels=[0.375])[0] == 2 / 3
    assert differs > 0  # the random cases include some where dropping the collinear points changes a TAR


def test_identification_equals_ijb_1n():
    raw, faceness, templates, medias, _, _, _, template_ids, subject_of = _random_protocol(seed=1, n_templates=120)
    ids, pooled = pool_templates(image_features(raw, faceness), templates, medias)
    index = {int(t): i for i, t in enumerate(ids)}
    gallery_t = [int(template_ids[np.flatnonzero(subject_of == s)[0]]) for s in range(30)]  # one per subject
    probe_t = [int(t) for t in template_ids if int(t) not in gallery_t]
    subj = {int(t): int(s) for t, s in zip(template_ids, subject_of)}
    probe = pooled[[index[t] for t in probe_t]]
    gallery = pooled[[index[t] for t in gallery_t]]
    result = identification(probe, np.array([subj[t] for t in probe_t]), gallery, np.array([subj[t] for t in gallery_t]),
                            batch=17)
    mask = [gallery_t.index(next(g for g in gallery_t if subj[g] == subj[t])) for t in probe_t]
    cmc, tpir = ref_identification(probe, gallery, mask)
    assert [result.cmc[k] for k in (1, 5, 10)] == cmc
    assert [result.tpir[f] for f in (0.01, 0.1)] == tpir
    assert 0.2 < result.cmc[1] < 1.0 and result.probes == 90 and result.gallery == 30
    with pytest.raises(ValueError, match="probe subject 99 has no gallery template"):
        identification(probe[:1], np.array([99]), gallery, np.array([subj[t] for t in gallery_t]))


# --- the stage on a generated set -------------------------------------------------------------------


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory) -> Path:
    return write_ijb(tmp_path_factory.mktemp("ijb"))


def test_stage_known_answers_cache_and_skip(ijb_root, tmp_path):
    model = CountingCodeEmbedder()
    cfg = IjbConfig(device="cpu", batch_size=8, chunk_images=10, features_dir=str(tmp_path / "features"))
    result = run_ijb(model, ijb_root, tmp_path / "a", ["IJBC"], cfg)
    # 32 images in chunks of 10 (10, 10, 10, 2), forward batches of 4 images + their 4 mirrors: 3 + 3 + 3 + 1 passes
    assert not result.skipped and model.calls == 10
    row = result.rows[0]
    assert (row["target"], row["images"], row["templates"], row["pairs"], row["genuine"]) == ("IJBC", 32, 15, 105, 12)
    t1, t2, labels, expected = expected_scores()
    np.testing.assert_allclose(np.load(tmp_path / "a" / "ijbc_scores.npy"), expected, atol=1e-6)
    assert {f: row[f"tar@far={f:.0e}"] for f in FAR_TARGETS} == KNOWN_TAR
    assert {k: row[f"rank_{k}"] for k in (1, 5, 10)} == pytest.approx(KNOWN_CMC)
    assert {f: row[f"tpir@fpir={f:.0e}"] for f in (0.01, 0.1)} == pytest.approx(KNOWN_TPIR)
    assert row["tar@far=1e-01"] == ref_tar_row(labels, expected)[-1]
    roc = pq.read_table(tmp_path / "a" / "ijb_roc.parquet").to_pylist()
    assert roc[0]["far"] == 0 and roc[-1]["far"] == 1.0 and (tmp_path / "a" / "ijb_roc.png").stat().st_size > 1000
    assert load_record(tmp_path / "a").summary["IJBC"]["tar@far=1e-01"] == 1.0

    again = run_ijb(model, ijb_root, tmp_path / "a", ["IJBC"], cfg)
    assert again.skipped and again.rows == pq.read_table(tmp_path / "a" / "ijb.parquet").to_pylist()
    # another evaluation of the same model (other settings, other folder): features from the cache
    plain = run_ijb(model, ijb_root, tmp_path / "b", None, cfg.model_copy(update={"detector_score": False}))
    assert model.calls == 10 and plain.rows[0]["features_cached"] and plain.rows[0]["extract_seconds"] == 0
    without = expected_scores(detector_score=False)[3]
    np.testing.assert_allclose(np.load(tmp_path / "b" / "ijbc_scores.npy"), without, atol=1e-6)


def test_interrupted_extraction_resumes(ijb_root, tmp_path):
    cfg = IjbConfig(device="cpu", batch_size=8, chunk_images=10)
    with pytest.raises(RuntimeError, match="interrupted at forward pass 5"):
        run_ijb(CountingCodeEmbedder(fail_at=5), ijb_root, tmp_path, ["IJBC"], cfg)  # chunk 0-9 done (3 passes)
    model = CountingCodeEmbedder()
    result = run_ijb(model, ijb_root, tmp_path, ["IJBC"], cfg)
    assert model.calls == 7 and result.rows[0]["tar@far=1e-06"] == KNOWN_TAR[1e-6]  # images 10..31: 3 + 3 + 1 passes
    assert not list((tmp_path / "features").glob("*.inprogress"))


def test_command_line(ijb_root, tmp_path, capsys):
    model = export_onnx(CodeEmbedder(), tmp_path / "code.onnx")
    assert main([str(model), str(ijb_root), "--target", "IJBC", "--out-dir", str(tmp_path / "out"), "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "IJBC: TAR@FAR=1e-06..1e-01: 50.00 50.00 50.00 50.00 50.00 100.00; rank-1 88.89" in out
    assert main([str(model), str(tmp_path), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path}: no IJB target") and "\n" not in err


# --- protocol file errors ---------------------------------------------------------------------------


def _edit(root: Path, name: str, line: int, new: str) -> Path:
    path = root / "IJBC" / "meta" / name
    lines = path.read_text().splitlines()
    lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("name, line, new, message", [
    ("ijbc_name_5pts_score.txt", 3, "3.jpg 1 2 3 4 5 6 7 8 nine 10 0.9", "line 3, field 10: 'nine' is not a number"),
    ("ijbc_name_5pts_score.txt", 4, "4.jpg 1 2 3", "line 4 has 4 fields"),
    ("ijbc_name_5pts_score.txt", 2, "7.jpg 1 2 3 4 5 6 7 8 9 10 0.9", "line 2 names '7.jpg', but line 2 of ijbc_face_tid_mid.txt names '2.jpg'"),
    ("ijbc_face_tid_mid.txt", 5, "5.jpg 1007 x", "line 5, field 3: 'x' is not an integer"),
    ("ijbc_template_pair_label.txt", 7, "1000 999 0", "line 7: template 999 has no image in ijbc_face_tid_mid.txt"),
    ("ijbc_template_pair_label.txt", 9, "1000 1007 2", "line 9: label 2"),
])
def test_bad_protocol_rows_are_named(ijb_root, tmp_path, name, line, new, message):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(ijb_root / "IJBC" / "meta", root / "IJBC" / "meta")
    path = _edit(root, name, line, new)
    with pytest.raises(FormatError) as info:
        load_meta(root, "IJBC")
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)

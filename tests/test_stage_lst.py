"""The .lst stage on real aligned photos and generated aligned identities: labels, order, drops, geometry."""
from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest

from build_data import aligned_small_photos, synthetic_identities
from datasets.errors import FormatError
from datasets.face_align import TEMPLATE_112x112, estimate_similarities, estimate_similarity
from datasets.images import load_image
from datasets.lst import read_insightface_lst
from datasets.manifest import read_manifest
from tasks.alignment import AlignConfig, run_align
from datasets.rec_layout import read_labels, write_labels
from tasks.lst import EXTRA_COLUMNS, STAGE, LstConfig, run_lst


def _manifest(out):
    return read_manifest(out / "manifest.parquet", stage=STAGE, extra=EXTRA_COLUMNS)


def _import(raw, out):
    result = run_align(raw, out, AlignConfig(already_aligned=True))
    assert result.counts.get("ok", 0) >= 1
    return out


def test_list_labels_order_drops_and_geometry(tmp_path):
    real = tmp_path / "real"
    shutil.copytree(aligned_small_photos(), real)
    synth_raw = tmp_path / "synth"
    names = synthetic_identities(synth_raw, range(3), images=3)
    face = load_image(names[sorted(names)[0]][0])
    cv2.imwrite(str(synth_raw / "loose.jpg"), face[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 80])  # no identity folder
    synth = _import(synth_raw, tmp_path / "synth-aligned")

    out = tmp_path / "lst"
    result = run_lst({"raw": real, "synth": synth}, out)
    assert not result.skipped and result.image_size == (112, 112)
    lines = read_insightface_lst(out / "train.lst")
    table = read_labels(out / "labels.csv")
    # kit_harington has one photo (< min_images 2); every other identity is listed, labels by sorted name
    expected_names = sorted(["barack_obama", "rose_leslie", *names])
    assert table == {name: i for i, name in enumerate(expected_names)}
    assert (result.images, result.identities, result.num_classes) == (4 + 9, 5, 5)
    labels = [line.label for line in lines]
    assert labels == sorted(labels), "each identity must be one contiguous run, labels ascending"
    assert all(line.aligned for line in lines)

    df = _manifest(out).set_index("item_id")
    dropped = df[df["status"] == "dropped"]
    assert set(dropped.index) == {"raw:kit_harington/2.jpeg", "synth:loose.jpg"}
    assert "has 1 usable face(s); min_images is 2" in dropped.loc["raw:kit_harington/2.jpeg", "reason"]
    assert dropped.loc["synth:loose.jpg", "reason"].startswith("no identity")
    ok = df[df["status"] == "ok"]
    assert sorted(ok["line"]) == list(range(len(lines)))
    for item_id, row in ok.iterrows():
        line = lines[int(row["line"])]
        assert line.path == row["image_path"] and line.label == row["label"] == table[row["identity"]]

    # Detected faces: 17 columns, box and landmarks in the aligned image's pixels (near the template).
    for line in lines:
        if "/synth-aligned/" in line.path:
            assert line.bbox is None and line.landmarks is None  # imported crops: the "1 PATH LABEL" form
            continue
        assert line.landmarks is not None and line.bbox is not None
        points = np.asarray(line.landmarks)
        assert np.abs(points - TEMPLATE_112x112).max() < 6, (line.path, points)
        x1, y1, x2, y2 = line.bbox
        assert x1 < points[:, 0].min() and x2 > points[:, 0].max() and y1 < points[:, 1].min() and y2 > points[:, 1].max()
        assert load_image(line.path).shape == (112, 112, 3)

    again = run_lst({"raw": real, "synth": synth}, out)
    assert again.skipped and again.images == result.images
    assert run_lst({"raw": real, "synth": synth}, out, LstConfig(min_images=1)).images == 14


def test_labels_are_stable_across_runs(tmp_path):
    raw = tmp_path / "faces"
    synthetic_identities(raw, range(10, 13), images=2)
    aligned = tmp_path / "aligned"
    _import(raw, aligned)
    out = tmp_path / "lst"
    first = read_labels(run_lst([aligned], out).labels_path)
    assert first == {"synth0_000010": 0, "synth0_000011": 1, "synth0_000012": 2}

    # New identities, one sorting before all others: known labels stay, new ones get the next free labels
    synthetic_identities(raw, range(20, 21), images=2)
    synthetic_identities(raw, range(5, 6), images=2)
    shutil.rmtree(raw / "synth0_000011")  # a vanished identity keeps its label, unused
    _import(raw, aligned)
    result = run_lst([aligned], out)
    table = read_labels(result.labels_path)
    assert table == {**first, "synth0_000005": 3, "synth0_000020": 4}
    lines = read_insightface_lst(result.lst_path)
    assert sorted({line.label for line in lines}) == [0, 2, 3, 4]
    assert result.num_classes == 5 and result.identities == 4

    # force rebuilds the list but keeps the table; deleting the table renumbers from 0
    assert read_labels(run_lst([aligned], out, force=True).labels_path) == table
    (out / "labels.csv").unlink()
    renumbered = read_labels(run_lst([aligned], out).labels_path)
    assert sorted(renumbered.values()) == [0, 1, 2, 3] and renumbered["synth0_000005"] == 0


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("label,identity\n0,a\nx,b\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"labels.csv: line 3: label 'x'"):
        read_labels(bad)
    bad.write_text("label,identity\n0,a\n1,a\n", encoding="utf-8")
    with pytest.raises(FormatError, match="line 3"):
        read_labels(bad)
    write_labels(bad, {"名字, with comma": 1, 'quote "q"': 0})
    assert read_labels(bad) == {"名字, with comma": 1, 'quote "q"': 0}
    with pytest.raises(FormatError, match="no committed align stage record"):
        run_lst([tmp_path], tmp_path / "out")
    raw = tmp_path / "wide"
    synthetic_identities(raw, range(2), images=2)
    narrow = run_align(raw, tmp_path / "narrow", AlignConfig(already_aligned=True, image_size="112x96")).out_dir
    square = run_align(raw, tmp_path / "square", AlignConfig(already_aligned=True)).out_dir
    with pytest.raises(ValueError, match="different image sizes"):
        run_lst([narrow, square], tmp_path / "out")
    assert load_image(narrow / "images" / "synth0_000000" / "0.jpg").shape == (112, 96, 3)


def test_vectorised_similarities_equal_the_single_fit():
    rng = np.random.default_rng(0)
    angles = rng.uniform(-3.1, 3.1, 200)  # any rotation, including upside-down faces
    rot = np.stack([np.stack([np.cos(angles), -np.sin(angles)], -1), np.stack([np.sin(angles), np.cos(angles)], -1)], 1)
    src = TEMPLATE_112x112[None] * rng.uniform(0.3, 5, (200, 1, 1)) + rng.normal(0, 4, (200, 5, 2))
    src = np.einsum("kij,knj->kni", rot, src) + rng.uniform(-100, 900, (200, 1, 2))
    batch = estimate_similarities(src, TEMPLATE_112x112)
    single = np.stack([estimate_similarity(s, TEMPLATE_112x112) for s in src])
    assert np.abs(batch - single).max() < 1e-9
    with pytest.raises(ValueError, match="src set 1: points all coincide"):
        estimate_similarities(np.stack([src[0], np.ones((5, 2))]), TEMPLATE_112x112)

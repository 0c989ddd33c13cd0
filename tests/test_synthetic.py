"""The synthetic identity generator: reproducible, aligned, varied, and written in the raw-photo layout."""
from __future__ import annotations

import csv
import hashlib
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import ROOT
from datasets.synthetic import ARCFACE_TEMPLATE, SyntheticFaces, iter_jpeg_bytes, make_pairs, write_identity_folders, \
    write_pairs_csv

# Digest of a fixed selection of renders; the same code computes it in a fresh process.
_DIGEST_SCRIPT = """
import hashlib
from datasets.synthetic import SyntheticFaces
faces = SyntheticFaces(num_identities=3, images_per_identity=4, seed=7)
h = hashlib.sha256()
for i in (0, 2, 41):
    for k in (0, 3):
        h.update(faces.render(i, k).tobytes())
h.update(faces.encode_jpeg(2, 1))
print(h.hexdigest())
"""


def _digest_here() -> str:
    faces = SyntheticFaces(num_identities=3, images_per_identity=4, seed=7)
    h = hashlib.sha256()
    for i in (0, 2, 41):
        for k in (0, 3):
            h.update(faces.render(i, k).tobytes())
    h.update(faces.encode_jpeg(2, 1))
    return h.hexdigest()


def test_same_pixels_across_calls_and_processes():
    here = _digest_here()
    assert here == _digest_here()
    other = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=120).stdout.strip()
    assert other == here


def test_identity_does_not_depend_on_set_size_or_range():
    small = SyntheticFaces(num_identities=3, images_per_identity=2, seed=5)
    large = SyntheticFaces(num_identities=500, images_per_identity=40, seed=5)
    offset = SyntheticFaces(num_identities=2, images_per_identity=2, seed=5, first_identity=2)
    assert np.array_equal(small.render(2, 1), large.render(2, 1))
    image, label = offset[1]
    assert label == 0 and np.array_equal(image, small.render(2, 1))
    assert not np.array_equal(small.render(2, 1), SyntheticFaces(3, 2, seed=6).render(2, 1)), "seed has no effect"


@pytest.mark.parametrize("size", [(112, 112), (56, 56), (112, 96)])
def test_shapes_and_dtypes(size):
    faces = SyntheticFaces(num_identities=2, images_per_identity=3, image_size=size, seed=0)
    image, landmarks = faces.render_with_landmarks(1, 2)
    assert image.shape == (*size, 3) and image.dtype == np.uint8
    assert landmarks.shape == (5, 2) and landmarks.dtype == np.float32
    images, labels = faces.render_array()
    assert images.shape == (6, *size, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and labels.dtype == np.int64
    assert np.array_equal(images[4], faces.render(1, 1))
    assert len(faces) == 6 and np.array_equal(faces[-1][0], images[5])
    with pytest.raises(IndexError):
        faces[6]


def test_render_array_in_worker_processes_matches():
    faces = SyntheticFaces(num_identities=4, images_per_identity=2, seed=3)
    serial, labels = faces.render_array(workers=1)
    parallel, labels2 = faces.render_array(workers=2)
    assert np.array_equal(serial, parallel) and np.array_equal(labels, labels2)


def test_images_vary_within_identity_and_differ_between_identities():
    faces = SyntheticFaces(num_identities=6, images_per_identity=6, seed=1)
    images = faces.render_array()[0].astype(np.float32).reshape(6, 6, -1)
    within = np.mean([np.abs(images[i, a] - images[i, b]).mean() for i in range(6) for a in range(6) for b in range(a)])
    assert within > 8.0, f"images of one identity hardly vary (mean abs difference {within:.1f})"
    assert all(len({images[i, k].tobytes() for k in range(6)}) == 6 for i in range(6))
    # difficulty 0: every image of an identity is the same canonical face; identities still differ
    canonical = SyntheticFaces(num_identities=6, images_per_identity=3, seed=1, difficulty=0.0)
    assert np.array_equal(canonical.render(4, 0), canonical.render(4, 2))
    faces0 = np.stack([canonical.render(i, 0) for i in range(6)]).astype(np.float32)
    between = min(np.abs(faces0[a] - faces0[b]).mean() for a in range(6) for b in range(a))
    assert between > 5.0, f"two identities render almost the same canonical face ({between:.1f})"


def test_landmarks_near_the_arcface_template():
    faces = SyntheticFaces(num_identities=30, images_per_identity=4, seed=2)
    points = np.stack([faces.landmarks(i, k) for i in range(30) for k in range(4)])
    mean_error = np.linalg.norm(points.mean(axis=0) - ARCFACE_TEMPLATE, axis=1)
    assert mean_error.max() < 2.5, f"mean landmarks off the template by {mean_error.round(1)} px"
    worst = np.linalg.norm(points - ARCFACE_TEMPLATE, axis=2).max()
    assert worst < 16.0, f"a landmark is {worst:.1f} px from the template"
    spread = np.linalg.norm(points - ARCFACE_TEMPLATE, axis=2).mean()
    assert spread > 1.0, "landmarks never move: no pose variation"
    # a smaller image scales the points with it
    half = SyntheticFaces(num_identities=1, images_per_identity=1, image_size=(56, 56), seed=2)
    assert np.allclose(half.landmarks(3, 1), faces.landmarks(3, 1) / 2, atol=1e-4)


def _pupil_offsets(faces: SyntheticFaces, count: int, shift: float = 0.0) -> np.ndarray:
    """Distance from each eye landmark (moved right by ``shift`` px) to the darkest pixel near it."""
    offsets = []
    for i in range(count):
        var = faces.variation(i, 0)
        if var.blink or var.occlusion == 2:  # closed eyes or sunglasses: no pupil to find
            continue
        image, points = faces.render_with_landmarks(i, 0)
        grey = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32), (3, 3), 0.7)
        for x, y in points[:2] + [shift, 0.0]:
            x0, y0 = int(round(x)) - 3, int(round(y)) - 2
            window = grey[y0:y0 + 5, x0:x0 + 7]
            dy, dx = np.unravel_index(np.argmin(window), window.shape)
            offsets.append(np.hypot(x0 + dx - x, y0 + dy - y))
    return np.array(offsets)


def test_landmarks_follow_the_drawn_face():
    """The pupil (darkest spot of the eye) is where the eye landmark says, also after the pose warp."""
    for difficulty in (0.0, 0.6):
        faces = SyntheticFaces(num_identities=1, images_per_identity=1, seed=4, difficulty=difficulty)
        offsets = _pupil_offsets(faces, 16)
        assert len(offsets) >= 24
        assert np.median(offsets) < 1.8 and np.percentile(offsets, 90) < 3.2, offsets.round(1)
        # control: landmarks 4 px off would be caught
        assert np.median(_pupil_offsets(faces, 16, shift=4.0)) > 2.5


def test_mtcnn_finds_the_faces_at_our_landmarks():
    """A real face detector (facenet-pytorch MTCNN, weights in the wheel) sees faces where we drew them."""
    facenet = pytest.importorskip("facenet_pytorch")
    import torch

    faces = SyntheticFaces(num_identities=20, images_per_identity=2, seed=0)
    rendered = [faces.render_with_landmarks(i, k) for i in range(20) for k in range(2)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is as fast, and never spins on a busy machine
    try:
        boxes, _, points = facenet.MTCNN(device="cpu").detect(np.stack([im for im, _ in rendered]), landmarks=True)
    finally:
        torch.set_num_threads(threads)
    offsets = np.array([np.asarray(p[0], dtype=np.float64) - ours
                        for b, p, (_, ours) in zip(boxes, points, rendered) if b is not None])
    # measured on 120 images: MTCNN finds 94% (98% of canonical faces); median distance to ours 2.6 to 3.3 px
    assert len(offsets) >= 30, f"MTCNN found a face in only {len(offsets)} of 40 synthetic images"
    pooled = np.median(np.linalg.norm(offsets, axis=2))
    bias = np.linalg.norm(np.median(offsets, axis=0), axis=1)
    assert pooled < 6.0 and bias.max() < 4.0, f"MTCNN points {pooled:.1f} px from ours, biased by {bias.round(1)} px"


def test_written_folders_pairs_and_jpeg_sizes(tmp_path):
    faces = SyntheticFaces(num_identities=24, images_per_identity=5, seed=0)
    paths = write_identity_folders(tmp_path / "raw", faces)
    assert len(paths) == 120 and all(p.is_file() for p in paths)
    assert paths[6] == tmp_path / "raw" / faces.identity_name(1) / "1.jpg"
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == [faces.identity_name(i) for i in range(24)]
    assert not list((tmp_path / "raw").rglob(".*.partial"))
    decoded = cv2.cvtColor(cv2.imread(str(paths[6])), cv2.COLOR_BGR2RGB)
    assert np.abs(decoded.astype(int) - faces.render(1, 1)).mean() < 6.0  # quality 95 JPEG of that image
    sizes = np.array([p.stat().st_size for p in paths])
    # real 112x112 MS1M crops at quality 95 are about 4 to 9 KB (research/perf-anchors.md)
    assert 3000 < sizes.mean() < 10000 and sizes.min() > 1500 and sizes.max() < 16000, sizes

    csv_path = write_pairs_csv(tmp_path / "pairs.csv", paths, num_pairs=200, seed=1, relative_to=tmp_path)
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["path_a", "path_b", "same"]
    rows = rows[1:]
    assert len(rows) == 200
    for fold in range(10):  # contiguous tenths: 10 same pairs then 10 different pairs
        assert [r[2] for r in rows[fold * 20:(fold + 1) * 20]] == ["1"] * 10 + ["0"] * 10
    keys = set()
    for a, b, same in rows:
        assert (tmp_path / a).is_file() and (tmp_path / b).is_file() and a != b
        assert (a.split("/")[1] == b.split("/")[1]) == (same == "1")
        keys.add(tuple(sorted((a, b))))
    assert len(keys) == 200, "a pair repeats"
    # 24 identities >= 2 x 10 folds: each fold draws from its own identities
    folds = [{p.split("/")[1] for r in rows[f * 20:(f + 1) * 20] for p in r[:2]} for f in range(10)]
    assert all(not (folds[a] & folds[b]) for a in range(10) for b in range(a))


def test_pairs_reject_impossible_requests():
    groups = {"a": ["a/0.jpg", "a/1.jpg"], "b": ["b/0.jpg"]}
    with pytest.raises(ValueError, match="multiple of 2 \\* folds"):
        make_pairs(groups, num_pairs=30)
    with pytest.raises(ValueError, match="at least 2 identities"):
        make_pairs({"a": ["a/0.jpg", "a/1.jpg"]}, num_pairs=20)
    with pytest.raises(ValueError, match="distinct same pairs"):
        make_pairs(groups, num_pairs=20)  # only one same pair exists, 10 are needed


def test_jpeg_stream_for_benchmarks():
    faces = SyntheticFaces(num_identities=3, images_per_identity=2, seed=9)
    stream = list(iter_jpeg_bytes(faces, quality=90))
    assert [label for label, _ in stream] == [0, 0, 1, 1, 2, 2]
    for label, data in stream:
        assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    image = cv2.imdecode(np.frombuffer(stream[3][1], np.uint8), cv2.IMREAD_COLOR)
    assert image.shape == (112, 112, 3)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="difficulty"):
        SyntheticFaces(2, 2, difficulty=-1)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticFaces(2, 2, image_size=(8, 8))
    with pytest.raises(ValueError, match="num_identities=0"):
        SyntheticFaces(0, 2)
    with pytest.raises(ValueError, match="identity=-1"):
        SyntheticFaces(2, 2).render(-1, 0)

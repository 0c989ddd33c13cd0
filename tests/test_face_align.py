"""datasets.face_align: templates, Umeyama similarity, warp, crop fallback, face choice."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from datasets.face_align import (
    TEMPLATE_112x96,
    TEMPLATE_112x112,
    center_crop,
    choose_faces,
    crop_box,
    crop_transform,
    estimate_similarity,
    crop_size,
    template_for,
    transform_scale,
    warp_affine,
    warp_face,
)


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    return np.array([[scale * np.cos(a), -scale * np.sin(a), tx], [scale * np.sin(a), scale * np.cos(a), ty]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _least_squares_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Independent oracle: in 2-D the similarities [[a, -b, tx], [b, a, ty]] form a linear space,
    so the least-squares similarity is an ordinary linear least-squares problem."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_templates_follow_the_spec():
    assert TEMPLATE_112x112[0].tolist() == [38.2946, 51.6963]
    assert TEMPLATE_112x96[4].tolist() == [62.7299, 92.2041]
    assert np.allclose(TEMPLATE_112x112 - TEMPLATE_112x96, [[8.0, 0.0]] * 5)
    assert np.array_equal(template_for("112x96"), TEMPLATE_112x96)
    assert crop_size("112,112") == (112, 112) and crop_size((112, 96)) == (112, 96)
    with pytest.raises(ValueError, match="'112x112' or '112x96'"):
        crop_size("224x224")


@pytest.mark.parametrize("angle", [0.0, 17.0, -75.0, 160.0])
def test_similarity_recovers_exact_transform(angle):
    rng = np.random.default_rng(int(angle) + 200)
    src = rng.uniform(0, 500, size=(5, 2))
    truth = _similarity(0.37, angle, 12.5, -40.0)
    m = estimate_similarity(src, _apply(truth, src))
    assert np.allclose(m, truth, atol=1e-9)
    assert transform_scale(m) == pytest.approx(0.37)


def test_similarity_is_least_squares_and_never_reflects():
    rng = np.random.default_rng(7)
    src = rng.uniform(0, 300, size=(5, 2))
    noisy = _apply(_similarity(0.2, 30, 5, 9), src) + rng.normal(0, 2.0, size=(5, 2))
    assert np.allclose(estimate_similarity(src, noisy), _least_squares_similarity(src, noisy), atol=1e-9)
    mirrored = src * np.array([-1.0, 1.0])  # the best fit would be a reflection
    m = estimate_similarity(src, mirrored)
    assert np.linalg.det(m[:, :2]) > 0
    assert np.allclose(m, _least_squares_similarity(src, mirrored), atol=1e-9)


def test_similarity_rejects_bad_points():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        estimate_similarity(np.zeros((5, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), TEMPLATE_112x112)
    with pytest.raises(ValueError, match="finite"):
        estimate_similarity([[0, 0], [1, np.nan]], [[0, 0], [1, 1]])


@pytest.mark.parametrize("size", ["112x112", "112x96"])
def test_warp_puts_landmarks_on_the_template(size):
    """Draw five dots at known positions of a rotated, scaled 'face'; after the warp their
    centroids must sit on the template points."""
    template = template_for(size)
    to_photo = _similarity(3.1, 23.0, 140.0, 60.0)
    landmarks = _apply(to_photo, template)
    photo = np.zeros((600, 500, 3), np.uint8)
    for x, y in landmarks:
        cv2.circle(photo, (round(x * 16), round(y * 16)), 5 * 16, (255, 255, 255), -1, cv2.LINE_AA, shift=4)
    face = warp_face(photo, landmarks, size)
    assert face.shape == (*crop_size(size), 3) and face.dtype == np.uint8
    gray = face[..., 0].astype(np.float64)
    n, labels = cv2.connectedComponents((gray > 0).astype(np.uint8))
    assert n == 6
    ys, xs = np.mgrid[0 : gray.shape[0], 0 : gray.shape[1]]
    centroids = []
    for k in range(1, n):
        w = gray * (labels == k)
        centroids.append([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])
    centroids = np.array(sorted(centroids, key=lambda p: np.argmin(np.linalg.norm(template - p, axis=1))))
    assert np.abs(centroids - template).max() < 0.2


def test_center_crop_matches_spec():
    img = np.random.default_rng(0).integers(0, 256, size=(250, 250, 3), dtype=np.uint8)
    # 6.25 % inset (15 px) widened by 22 px per side and clipped: the whole 250 x 250 image
    assert crop_box(img.shape[:2]) == (0, 0, 250, 250)
    assert np.array_equal(center_crop(img, "112x112"), cv2.resize(img, (112, 112)))
    assert crop_box((400, 300), bbox=(100.7, 50.2, 200.0, 180.0)) == (78, 28, 222, 202)
    assert crop_box((400, 300), margin=0) == (18, 25, 282, 375)
    out = center_crop(img, "112x96", bbox=(60, 60, 180, 200))
    assert out.shape == (112, 96, 3)


def test_crop_transform_samples_like_resize():
    img = np.random.default_rng(1).integers(0, 256, size=(300, 400, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (0, 0), 3)
    box = (37, 20, 301, 280)
    resized = cv2.resize(img[20:280, 37:301], (96, 112), interpolation=cv2.INTER_LINEAR)
    warped = warp_affine(img, crop_transform(box, "112x96"), "112x96")
    assert np.abs(resized.astype(int) - warped).max() <= 2


def test_choose_faces_policies():
    # image 200 high x 400 wide; box 0 big but far off centre, box 1 smaller and central,
    # box 2 tiny with the highest score
    boxes = np.array([[0, 0, 120, 120], [160, 60, 240, 140], [300, 10, 320, 30]], dtype=np.float32)
    scores = np.array([0.95, 0.9, 0.99], dtype=np.float32)
    # area - 2 d^2: 14400 - 2 * (140^2 + 40^2) < 0 for box 0; 6400 - 0 for box 1
    assert choose_faces(boxes, scores, (200, 400), "insightface") == [1]
    assert choose_faces(boxes, scores, (2000, 4000), "insightface") != [1]  # centre elsewhere
    assert choose_faces(boxes, scores, (200, 400), "first") == [2]
    assert choose_faces(boxes, scores, (200, 400), "all") == [2, 0, 1]
    assert choose_faces(np.zeros((0, 4)), np.zeros(0), (10, 10), "insightface") == []
    with pytest.raises(ValueError, match="face policy"):
        choose_faces(boxes, scores, (200, 400), "largest")

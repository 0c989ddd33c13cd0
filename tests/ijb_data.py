"""A small IJB-C-layout set with known answers (not a test module).

``<root>/IJBC/loose_crop/<n>.jpg`` and ``<root>/IJBC/meta/{ijbc_face_tid_mid.txt, ijbc_name_5pts_score.txt,
ijbc_template_pair_label.txt, ijbc_1N_probe_mixed.csv, ijbc_1N_gallery_G1.csv, ijbc_1N_gallery_G2.csv}``,
exactly as arcface_torch's ``eval_ijbc.py`` and InsightFace's ``ijb_1n.py`` read them.

Faces are :mod:`eval_data` code images (read by :class:`eval_data.CodeEmbedder`), placed into
larger loose crops by a random similarity (rotation, scale, shift), saved as JPEG, with the five
template points mapped the same way as their landmarks: aligning them back gives the code image.
Six subjects with pairwise disjoint codes (so every code image's flip-fused raw feature is ``2 v``,
``v`` four ones, and codes are orthogonal). Templates (ids not contiguous, media ids shared across
templates as in IJB):

* ``A<s>``: one image of subject ``s``; ``B<s>``: three images in two medias (2 + 1);
* ``C0``, ``C1``: media 1 one image of the own code (detector score 1.0), media 2 two images of the
  code of subject ``s + 3`` (scores 0.5 and 0.7): media mean, then sum, gives weights 1 : 0.6, so
  the template scores ``1 / sqrt(1.36)`` with the own subject and ``0.6 / sqrt(1.36)`` with ``s + 3``;
* ``C2``: one image of the own code (score 0.5) and one of subject 5's (score 1.0): ``0.5 / sqrt(1.25)``
  with its own subject, ``1 / sqrt(1.25)`` with subject 5.

Pairs: every two templates (105 pairs; 12 genuine). 1:N: galleries G1 = ``A0..A2``, G2 = ``A3..A5``;
probes = every ``B`` and ``C`` template.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import cv2
import numpy as np

from datasets.face_align import TEMPLATE_112x112
from eval_data import code_image

SUBJECTS = 6
CODES = [(2 * s, 2 * s + 1) for s in range(SUBJECTS)]  # disjoint mirror-slot pairs
W_C01, W_C2 = 1 / math.sqrt(1.36), 1 / math.sqrt(1.25)
#: Known TAR at FAR 1e-6 ... 1e-1 (see :func:`expected_scores`: sorted scores 1 (6 genuine), 0.894 (2
#: impostors), 0.857 (4 genuine), 0.514 (4 impostors), 0.447 (2 genuine), 0 (87 impostors); FPRs of
#: the curve 0, 2/93, 6/93, 1: FAR <= 1e-2 -> FPR 0, TPR 6/12; FAR 1e-1 -> FPR 6/93, TPR 1).
KNOWN_TAR = {1e-6: 0.5, 1e-5: 0.5, 1e-4: 0.5, 1e-3: 0.5, 1e-2: 0.5, 1e-1: 1.0}
#: 1:N: 9 probes; C2 ranks second (its subject 5 gallery template scores higher); TPIR threshold at
#: both FPIRs (ceil(9 * f) = 1) is the highest non-mated score 0.894: only the six B probes pass.
KNOWN_CMC = {1: 8 / 9, 5: 1.0, 10: 1.0}
KNOWN_TPIR = {0.01: 6 / 9, 0.1: 6 / 9}


def _templates() -> list[tuple[str, int, list[list[tuple[int, float]]]]]:
    """``(name, subject, medias)``, a media a list of ``(code subject, detector score)`` images."""
    rng = np.random.default_rng(5)
    out = []
    for s in range(SUBJECTS):
        out.append((f"A{s}", s, [[(s, float(rng.uniform(0.6, 1.0)))]]))
        out.append((f"B{s}", s, [[(s, float(rng.uniform(0.6, 1.0))), (s, float(rng.uniform(0.6, 1.0)))],
                                 [(s, float(rng.uniform(0.6, 1.0)))]]))
    out.append(("C0", 0, [[(0, 1.0)], [(3, 0.5), (3, 0.7)]]))
    out.append(("C1", 1, [[(1, 1.0)], [(4, 0.5), (4, 0.7)]]))
    out.append(("C2", 2, [[(2, 0.5)], [(5, 1.0)]]))
    return out


def template_ids() -> dict[str, int]:
    return {name: 1000 + 7 * i for i, (name, _, _) in enumerate(_templates())}


def _direction(medias: list[list[tuple[int, float]]], detector_score: bool = True) -> np.ndarray:
    """The pooled template as weights over the (orthonormal) subject codes."""
    w = np.zeros(SUBJECTS)
    for media in medias:
        for code, score in media:
            w[code] += (score if detector_score else 1.0) / len(media)
    return w / np.linalg.norm(w)


def expected_scores(detector_score: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(t1, t2, labels, scores)`` of the pair file, the scores from the construction (images weighted
    by their detector score or not)."""
    templates = _templates()
    ids = template_ids()
    t1, t2, labels, scores = [], [], [], []
    for (na, sa, ma), (nb, sb, mb) in itertools.combinations(templates, 2):
        t1.append(ids[na])
        t2.append(ids[nb])
        labels.append(int(sa == sb))
        scores.append(float(_direction(ma, detector_score) @ _direction(mb, detector_score)))
    return np.array(t1), np.array(t2), np.array(labels), np.array(scores)


def _loose_crop(face: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A loose crop holding ``face`` (112x112 aligned) and the landmarks of its five template points."""
    size = int(rng.integers(200, 230))
    scale = float(rng.uniform(1.05, 1.3))  # loose-crop pixels per aligned pixel
    angle = float(rng.uniform(-0.3, 0.3))
    rot = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shift = np.array([size / 2, size / 2]) - rot @ np.array([56.0, 56.0]) + rng.uniform(-6, 6, 2)
    to_loose = np.hstack([rot, shift[:, None]])
    crop = cv2.warpAffine(face, to_loose, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(90, 90, 90))
    landmarks = TEMPLATE_112x112 @ rot.T + shift
    return crop, landmarks


def write_ijb(root: Path, target: str = "IJBC", seed: int = 0) -> Path:
    """Write the set under ``root/<target>``; returns ``root``."""
    rng = np.random.default_rng(seed)
    folder = root / target
    (folder / "loose_crop").mkdir(parents=True, exist_ok=True)
    (folder / "meta").mkdir(parents=True, exist_ok=True)
    t = target.lower()
    ids = template_ids()
    tid_mid, pts, rows_1n = [], [], {}
    n = 0
    for name, subject, medias in _templates():
        for m, media in enumerate(medias):
            media_id = 50 + (ids[name] + m) % 9  # shared between templates
            for code, score in media:
                n += 1
                image = f"{n}.jpg"
                crop, lmk = _loose_crop(code_image(CODES[code], rng), rng)
                ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(crop[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
                assert ok
                (folder / "loose_crop" / image).write_bytes(buf.tobytes())
                tid_mid.append(f"{image} {ids[name]} {media_id}")
                pts.append(" ".join([image, *(f"{v:.3f}" for v in lmk.reshape(-1)), f"{score:.6f}"]))
                rows_1n.setdefault(name, []).append(f"{ids[name]},{subject},{image}")
    (folder / "meta" / f"{t}_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (folder / "meta" / f"{t}_name_5pts_score.txt").write_text("\n".join(pts) + "\n")
    t1, t2, labels, _ = expected_scores()
    (folder / "meta" / f"{t}_template_pair_label.txt").write_text(
        "".join(f"{a} {b} {c}\n" for a, b, c in zip(t1, t2, labels)))
    header = "TEMPLATE_ID,SUBJECT_ID,FILENAME\n"
    galleries = ("G1", "G2") if target == "IJBC" else ("S1", "S2")
    for gallery, subjects in zip(galleries, (range(0, 3), range(3, 6))):
        (folder / "meta" / f"{t}_1N_gallery_{gallery}.csv").write_text(
            header + "".join(r + "\n" for s in subjects for r in rows_1n[f"A{s}"]))
    probes = [name for name in rows_1n if name[0] in "BC"]
    (folder / "meta" / f"{t}_1N_probe_mixed.csv").write_text(header + "".join(r + "\n" for p in probes for r in rows_1n[p]))
    return root


def reference_pool(img_feats, templates, medias, unique_templates):
    """eval_ijbc.py's image2template_feature loop over ``unique_templates`` (unnormalised sums)."""
    out = np.zeros((len(unique_templates), img_feats.shape[1]))
    for count, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face, fm = img_feats[ind_t], medias[ind_t]
        um, uc = np.unique(fm, return_counts=True)
        media = []
        for u, ct in zip(um, uc):
            (ind_m,) = np.where(fm == u)
            media += [face[ind_m]] if ct == 1 else [np.mean(face[ind_m], axis=0, keepdims=True)]
        out[count] = np.sum(np.array(media), axis=0)
    return out

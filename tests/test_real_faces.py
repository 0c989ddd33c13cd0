"""Learning real faces: a short training on part of faces_dev (the Yale Face Database, read from
../shared/data/faces_dev, never copied) verifies unseen people better than raw-pixel cosine.

Real MTCNN alignment of 6 photos of each of the 15 people (links in a temporary folder), the
``small-real`` preset's network and augmentations for a few dozen steps on 10 people, flip-fused
embeddings of the 5 others against the raw-pixel baseline on the same balanced pairs and 10-fold
protocol as ``bench/real_faces.py`` (which runs the full benchmark)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import real_faces as rf  # noqa: E402

needs_faces_dev = pytest.mark.skipif(not rf.FACES_DEV.is_dir(),
                                     reason=f"{rf.FACES_DEV} is absent (faces_dev is read from ../shared/data, never bundled)")
# lighting, expression and glasses variety in every person's six photos
CONDITIONS = ("01", "03", "04", "06", "07", "10", "02", "05")


def _subset(raw: Path) -> Path:
    for person in sorted(p for p in rf.FACES_DEV.iterdir() if p.is_dir()):
        photos = [person / f"{c}.gif" for c in CONDITIONS if (person / f"{c}.gif").exists()][:6]
        (raw / person.name).mkdir(parents=True)
        for photo in photos:
            (raw / person.name / photo.name).symlink_to(photo)
    return raw


def test_shuffled_people_keep_every_image_with_its_person_and_regroup_the_folds():
    people = [f"subject{i + 1:02d}" for i in range(15)]
    faces = rf.Faces(np.zeros((30, 1, 1, 3), np.uint8), np.repeat(np.arange(15), 2), people, [f"{i}.gif" for i in range(30)])
    shuffled = rf.shuffle_people(faces, 1)
    assert [shuffled.people[label] for label in shuffled.labels] == [people[label] for label in faces.labels]
    assert sorted(shuffled.people) == people and shuffled.people != people
    unseen = [shuffled.people[p] for p in rf.fold_people(15, 1)[1]]
    assert unseen != people[:5] and rf.shuffle_people(faces, 1).people == shuffled.people  # seeded


@needs_faces_dev
def test_a_short_training_beats_raw_pixels_on_unseen_people(tmp_path: Path):
    faces = rf.load_aligned(_subset(tmp_path / "raw"), tmp_path)
    assert len(faces.people) == 15 and len(faces.images) == 90
    train_p, test_p = rf.fold_people(len(faces.people), 3)
    test_idx = np.flatnonzero(np.isin(faces.labels, test_p))
    pairs, issame = rf.balanced_pairs(faces.labels[test_idx], seed=0)
    raw = rf.verify(rf.baseline_embeddings("raw_pixels", faces.images, faces.images[test_idx]),
                    pairs, issame)
    from tasks.training.config import load_config

    data = rf.pack_train(faces, train_p, tmp_path / "train", load_config(rf.preset_path("small-real"), {}).image_hw)
    result, _ = rf.train_model("small-real", data, tmp_path / "run", seed=0,
                               overrides={"max_steps": 60, "lr_steps": [45], "warmup": 5, "frequent": 20,
                                          "per_batch_size": 32})
    model = rf.verify(rf.model_embeddings(result.last_checkpoint, faces.images[test_idx]), pairs, issame)
    assert model.accuracy > raw.accuracy + 0.03, (model.accuracy, raw.accuracy)

"""112x96 end to end (bins stage -> .bin -> verification stage and training validation), and training
validation that keeps every target: a broken pack and a 6-pair set beside a good one."""
from __future__ import annotations

import csv
import pickle
from pathlib import Path

import cv2
import numpy as np
import torch

from build_data import PixelEmbedder, synthetic_identities
from datasets.rec_layout import InsightFaceRecWriter
from datasets.verification_bin import decode_bin, load_bin
from rec_fixtures import face_crops
from tasks.alignment import AlignConfig
from tasks.bins import PairsSet, run_bins
from tasks.training.record import read_metrics
from tasks.training.trainer import train
from tasks.training.validation import TargetError, ValidationSets
from tasks.verification import VerificationConfig, run_verification
from train_data import tiny_config


def _pairs_csv(tmp_path: Path, n_ids: int = 6) -> tuple[Path, Path]:
    """Aligned 112x112 faces of ``n_ids`` identities and a CSV of identical (same) and cross-identity
    (different) pairs, alternating."""
    faces = tmp_path / "faces"
    people = synthetic_identities(faces, range(n_ids), images=1, seed=4)
    paths = [p[0].relative_to(faces).as_posix() for p in people.values()]
    rows = []
    for i, path in enumerate(paths):
        rows.append((path, path, 1))
        rows.append((path, paths[(i + 1) % len(paths)], 0))
    out = tmp_path / "pairs.csv"
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([("path_a", "path_b", "same"), *rows])
    return out, faces


def test_bins_stage_writes_112x96_and_both_evaluators_read_it(tmp_path: Path):
    pairs, faces = _pairs_csv(tmp_path)
    result = run_bins(PairsSet(name="v96", file=str(pairs), image_root=str(faces), aligned=True), tmp_path / "bins",
                      AlignConfig(device="cpu", image_size="112x96"))
    images, issame = decode_bin(result.bin_path, (112, 96))
    assert images.shape == (24, 112, 96, 3) and result.pairs == 12 and issame.tolist() == [True, False] * 6
    assert all(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR).shape == (112, 96, 3)
               for b in load_bin(result.bin_path)[0])

    cfg = VerificationConfig(device="cpu", batch_size=16, image_size=(112, 96))
    row = run_verification(PixelEmbedder(), [result.bin_path], tmp_path / "eval", cfg).rows[0]
    assert row["image_size"] == "112x96" and row["n_pairs"] == 12 and row["accuracy"] == 1.0 and row["error"] == ""

    sets = ValidationSets([("v96", result.bin_path)], (112, 96), "arcface", batch_size=16)
    res = sets.evaluate(PixelEmbedder(), torch.device("cpu"))["v96"]
    assert res.accuracy == 1.0 and res.n_pairs == 12 and sets.data("v96", result.bin_path)[0].shape == (24, 112, 96, 3)
    shuffled = ValidationSets([("v96", result.bin_path)], (112, 96), "arcface", batch_size=16, fold_seed=3)
    res = shuffled.evaluate(PixelEmbedder(), torch.device("cpu"))["v96"]
    assert res.accuracy == 1.0 and "shuffled with seed 3" in res.to_row()["notes"]


def _tiny_96(root: Path) -> Path:
    """A 112x96 training set (8 classes x 4 crops) with three val packs: good, broken, 6 pairs."""
    crops = [c[:, 8:104] for c in face_crops(32 + 40, seed=11, size=112)]
    with InsightFaceRecWriter(root, image_size=(112, 96)) as writer:
        for i in range(32):
            writer.add(i // 4, cv2.imencode(".jpg", crops[i], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    from datasets.verification_bin import write_bin

    pairs = [c[:, :, ::-1] for c in crops[32:]]
    write_bin(root / "good96.bin", pairs, [i % 2 == 0 for i in range(20)])
    write_bin(root / "six96.bin", pairs[:12], [i % 2 == 0 for i in range(6)])
    (root / "broken.bin").write_bytes(pickle.dumps(([b"x"] * 3, [True]), protocol=2))
    return root


def test_training_at_112x96_records_every_val_target(tmp_path: Path):
    """A 112x96 run (softmax without fc7 bias, bn_mom, fc7 multipliers: the 2018 options on the real
    trainer) evaluates three targets: the good one decides the best checkpoint, the broken one gets
    its error row, the 6-pair one its note; training finishes."""
    data = _tiny_96(tmp_path / "data")
    cfg = tiny_config(tmp_path / "run", dataset=str(data), image_size="112,96", loss="softmax", fc7_no_bias=True,
                      bn_mom=0.95, fc7_lr_mult=2.0, fc7_wd_mult=0.0, max_steps=2, verbose=2, ckpt=3,
                      val_targets=["good96", "broken", "six96"])
    result = train(cfg)
    assert result.state == "finished" and result.step == 2 and result.best["target"] == "good96"
    assert set(result.val) == {"good96", "broken", "six96"}
    assert "broken.bin" in result.val["broken"]["error"] and "accuracy" not in result.val["broken"]
    frame = read_metrics(tmp_path / "run")
    val = frame[frame["kind"] == "val"].set_index("target")
    assert list(val.index) == ["good96", "broken", "six96"]
    assert 0 <= val.loc["good96", "accuracy"] <= 1 and val.loc["good96", "n_pairs"] == 20
    assert "3 images for 1 pairs" in val.loc["broken", "error"] and np.isnan(val.loc["broken", "accuracy"])
    assert val.loc["six96", "nfolds"] == 6 and "6 pairs are fewer than 10 folds" in val.loc["six96", "notes"]
    sets = ValidationSets([("broken", data / "broken.bin")], (112, 96), "arcface")
    assert isinstance(sets.evaluate(PixelEmbedder(), torch.device("cpu"))["broken"], TargetError)

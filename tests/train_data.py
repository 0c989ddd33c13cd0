"""Shared data for the training tests: a tiny packed set of real face crops and a tiny run configuration.

The mechanics tests (checkpoints, resume, DDP, policies) do not need faces that can be learnt, only
real bytes through the real writer and reader: 16 "identities" x 4 JPEG crops of the bundled photos
at 32x32 (``tests/rec_fixtures.face_crops``), packed with ``InsightFaceRecWriter``, plus a 20-pair
verification ``.bin`` written by ``write_bin``. Made once per test process, copied read-only.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2

from datasets.rec_layout import InsightFaceRecWriter
from datasets.verification_bin import write_bin
from rec_fixtures import face_crops
from tasks.training.config import TrainConfig

SIZE = 32
IDENTITIES, IMAGES = 16, 4
_CACHE = Path(tempfile.mkdtemp(prefix="facepipe-train-tests-"))
atexit.register(shutil.rmtree, _CACHE, True)


@functools.lru_cache(maxsize=None)
def tiny_dataset() -> Path:
    """Folder with train.rec/train.idx/property (16 classes x 4 images, 32x32) and tiny_val.bin (20 pairs)."""
    out = _CACHE / "tiny"
    crops = face_crops(IDENTITIES * IMAGES + 40, seed=7, size=SIZE)
    with InsightFaceRecWriter(out, image_size=(SIZE, SIZE)) as writer:
        for i in range(IDENTITIES * IMAGES):
            writer.add(i // IMAGES, cv2.imencode(".jpg", crops[i], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    pairs = [img[:, :, ::-1] for img in crops[IDENTITIES * IMAGES:]]
    write_bin(out / "tiny_val.bin", pairs, [i % 2 == 0 for i in range(20)])
    return out


def tiny_config(output: Path, **overrides: Any) -> TrainConfig:
    """A run that takes well under a second per step on 2 CPU cores (MobileNet 0.5, 32x32, batch 8)."""
    options: dict[str, Any] = dict(
        dataset=str(tiny_dataset()), output=str(output), network="m05", version_input=0, image_size=f"{SIZE},{SIZE}",
        emb_size=32, loss="cosface", margin_s=16.0, per_batch_size=8, lr=0.05, max_steps=6, verbose=3, frequent=1,
        num_workers=0, ckpt=3, device="cpu", seed=3, val_targets=["tiny_val"],
    )
    options.update(overrides)
    return TrainConfig(**options)

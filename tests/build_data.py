"""Shared data for the build-dataset tests: real photos, generated identities, a small embedding model.

Expensive things (MTCNN on real photos) are made once per test process and cached in a temporary
folder that is removed at exit; tests copy from it and never write into it.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import FACES

RAW = FACES / "raw"
#: Small real photos (fast to detect): two identities with two photos, one with a single photo.
SMALL_PHOTOS = {
    "barack_obama": ["5_small.jpg", "6_240p.jpg"],
    "rose_leslie": ["1.jpg", "2.jpg"],
    "kit_harington": ["2.jpeg"],
}

_CACHE = Path(tempfile.mkdtemp(prefix="facepipe-build-tests-"))
atexit.register(shutil.rmtree, _CACHE, True)


def require_photos() -> None:
    if not RAW.is_dir():
        pytest.skip(f"bundled face photos not found at {RAW} (see sample/faces/README.md)")


def copy_photos(dst: Path, photos: dict[str, list[str]] = SMALL_PHOTOS) -> Path:
    """Copy ``{identity: [file, ...]}`` from the bundled photos to ``dst/<identity>/<file>``."""
    require_photos()
    for identity, files in photos.items():
        (dst / identity).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy(RAW / identity / name, dst / identity / name)
    return dst


@functools.lru_cache(maxsize=None)
def aligned_small_photos() -> Path:
    """An align-stage folder of :data:`SMALL_PHOTOS` (real MTCNN on CPU), made once per process."""
    from tasks.alignment import AlignConfig, run_align

    raw = copy_photos(_CACHE / "small-raw")
    out = _CACHE / "small-aligned"
    result = run_align(raw, out, AlignConfig(device="cpu"))
    assert result.counts == {"ok": 5}, result.counts
    return out


def synthetic_identities(dst: Path, identities: range, images: int = 3, seed: int = 0) -> dict[str, list[Path]]:
    """Generated aligned identities ``dst/<name>/<k>.jpg`` (112x112 JPEG): ``{name: paths}``."""
    from datasets.synthetic import SyntheticFaces, write_identity_folders

    faces = SyntheticFaces(num_identities=len(identities), images_per_identity=images, seed=seed,
                           first_identity=identities.start)
    paths = write_identity_folders(dst, faces)
    out: dict[str, list[Path]] = {}
    for p in paths:
        out.setdefault(p.parent.name, []).append(p)
    return out


class PixelEmbedder(nn.Module):
    """A fixed, weight-free embedding: ``(N, 3, H, W) float32`` -> ``(N, 192)``, the 8x8 average-pooled
    image with its mean removed. Identical images give identical embeddings; different faces differ."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)
        return pooled - pooled.mean(dim=1, keepdim=True)


def export_onnx(module: nn.Module, path: Path, size: tuple[int, int] = (112, 112)) -> Path:
    """``module`` as an ONNX file with a dynamic batch axis (TorchScript exporter)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: 0.1 s instead of ~5 s
        torch.onnx.export(module.eval(), (torch.zeros(2, 3, *size),), str(path), input_names=["input"],
                          output_names=["embedding"], dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}},
                          dynamo=False)
    return path

"""Options of the stages that have no engine package: :class:`LstConfig` (:mod:`tasks.lst`),
:class:`PackConfig` (:mod:`tasks.pack`), :class:`MergeConfig` (:mod:`tasks.merge`) and
:class:`PairsSet` (:mod:`tasks.bins`). The stages re-export them.

A module of its own that imports only pydantic, so that command lines (:mod:`tasks.cli`) and forms
are built without importing the stages (prefect, torch, OpenCV, pandas).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["LstConfig", "MergeConfig", "PackConfig", "PairsSet"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class LstConfig(BaseModel):
    """Parameters of the ``.lst`` stage."""

    model_config = ConfigDict(extra="forbid")

    min_images: int = Field(2, ge=1, description="identities with fewer aligned faces are dropped (dir2lst keeps >= 2)")
    include_fallback: bool = Field(
        True, description="list the centre-crop fallbacks of photos without a detected face (align no_face=center_crop)")


class PackConfig(BaseModel):
    """Parameters of the pack stage."""

    model_config = ConfigDict(extra="forbid")

    shuffle: bool = Field(False, description="shuffle identity order and order within identities (seeded)")
    seed: int = Field(0, ge=0, description="seed of the shuffle")
    label_format: Literal["array", "scalar"] = Field(
        "array", description="image record label: [label, aligned] (face2rec2, flag 2) or the scalar label (flag 0)")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of faces aligned here (aligned=0 lines only)")


class MergeConfig(BaseModel):
    """Parameters of the merge stage (dataset_merge.py's ``--model``, ``--param1``, ``--param2``, ``--exclude``)."""

    model_config = ConfigDict(extra="forbid")

    dedup: Literal["none", "name", "model"] = Field(
        "none", description="none: concatenate; name: same identity name = one identity; model: embedding de-duplication")
    model: str | None = Field(None, description="embedding model: a .onnx file or a training checkpoint")
    normalize: Literal["arcface", "mxnet"] = Field(
        "arcface", description="input normalisation of the model: (x-127.5)/127.5 or (x-127.5)/128")
    param1: float = Field(0.3, ge=-1.0, le=1.0, description="an identity of a later dataset is dropped at cosine >= param1 with a kept one")
    param2: float = Field(0.4, ge=-1.0, le=1.0, description="a kept identity is removed at cosine >= param2 with an exclusion vector")
    exclude: list[str] = Field(default_factory=list, description="packed dataset folders or verification .bin files to keep out")
    batch_size: int = Field(64, ge=1, description="images per model call")
    label_format: Literal["scalar", "array"] = Field(
        "scalar", description="image record label: scalar (dataset_merge.py, flag 0) or [label, aligned]")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where a torch model runs")

    def needs_embeddings(self) -> bool:
        return self.dedup == "model" or bool(self.exclude)


class PairsSet(BaseModel):
    """One verification set to build: ``<name>.bin`` from the pair list ``file``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="name of the set; the pack is <name>.bin (e.g. lfw, cfp_fp, agedb_30)")
    file: str = Field(description="pair list: LFW pairs.txt, or CSV path_a,path_b,same")
    image_root: str | None = Field(None, description="folder the image paths are relative to (default: the list's folder)")
    aligned: bool = Field(False, description="the images are aligned face crops already (no detection)")
    format: Literal["auto", "lfw", "csv"] = Field("auto", description="pair list format")
    no_face: Literal["center_crop", "drop"] = Field(
        "center_crop", description="photo without a face: spec 5.3 centre crop (keeps the folds) or drop the pair")
    missing: Literal["fail", "drop"] = Field("fail", description="missing or unreadable image: fail, or drop the pair")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"pairs set name {value!r} must be letters, digits, '.', '_' or '-' (it names <name>.bin)")
        return value

    def root(self) -> Path:
        return Path(self.image_root).resolve() if self.image_root else Path(self.file).resolve().parent

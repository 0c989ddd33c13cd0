"""The evaluation stages' options: :class:`ExtractionConfig` (how embeddings are extracted),
:class:`VerificationConfig` (the verification stage), :class:`MegaFaceConfig` and :class:`ImageSet`
(the MegaFace stage).

A module of its own that imports only pydantic, so that command lines (:mod:`tasks.cli`) and forms
are built without importing torch.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from datasets.normalization import Normalization

__all__ = ["DEFAULT_FAR_TARGETS", "DEFAULT_RANKS", "DEFAULT_SIZES", "ExtractionConfig", "ImageSet", "MegaFaceConfig",
           "VerificationConfig", "IjbConfig"]

#: FARs at which TAR is reported by the pair protocol.
DEFAULT_FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
#: MegaFace distractor counts and CMC ranks.
DEFAULT_SIZES = (10, 100, 1000, 10000, 100000, 1000000)
DEFAULT_RANKS = tuple(range(1, 11))


class ExtractionConfig(BaseModel):
    """How embeddings are extracted (shared by the verification and MegaFace stages)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(256, ge=1, description="images per forward pass")
    flip: bool = Field(True, description="flip test: embed each image and its mirror, sum, L2-normalise")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where a torch model runs (auto: CUDA when present)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="torch models: bf16 autocast or fp32; auto = bf16 on CUDA, fp32 on the CPU")
    normalize: Normalization | None = Field(
        None, description="input normalisation: arcface (x-127.5)/127.5, mxnet (x-127.5)/128, none (pixels 0..255, "
                          "for graphs that normalise inside); default: the model's own (checkpoint meta, ONNX graph)")
    channel_order: Literal["rgb", "bgr"] | None = Field(
        None, description="channel order fed to the model; default rgb (every InsightFace and arcface_torch model)")
    image_size: tuple[int, int] | None = Field(
        None, description="input (height, width); default: the model's, else 112x112")
    network: str | None = Field(None, description="expected network code; a checkpoint of another network is refused")


class VerificationConfig(ExtractionConfig):
    """Parameters of the verification stage (extraction settings plus the protocol's)."""

    nfolds: int = Field(10, ge=1, description="contiguous folds of the accuracy protocol (1 = train on the test set)")
    shuffle_folds: bool = Field(
        False, description="split a seeded permutation of the pairs into folds (for pair lists not laid out in "
                           "LFW's balanced blocks, e.g. a CSV sorted by person)")
    fold_seed: int = Field(0, ge=0, description="seed of shuffle_folds")
    far_targets: list[float] = Field(list(DEFAULT_FAR_TARGETS), description="FARs at which TAR is reported")


class ImageSet(BaseModel):
    """Probes or distractors: an image list under ``root``, or a ``.rec`` set."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="image list (one relative path per line), or a .rec file / dataset folder")
    root: str | None = Field(None, description="folder the list's paths are relative to (default: the list's folder)")


class MegaFaceConfig(ExtractionConfig):
    """Parameters of the MegaFace stage (extraction settings plus the protocol's)."""

    algo: str = Field("facepipe", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="algorithm name in file names")
    probe_set: str = Field("facescrub", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="probe set name in file names")
    sizes: list[int] = Field(list(DEFAULT_SIZES), description="distractor counts to evaluate (the first N of the list)")
    ranks: list[int] = Field(list(DEFAULT_RANKS), description="CMC ranks")
    far: float = Field(1e-6, gt=0, lt=1, description="FAR of the headline TAR")
    roc_fars: list[float] = Field([1e-6, 1e-5, 1e-4, 1e-3], description="FARs of the ROC points in the CMC/ROC json")
    metric: Literal["euclidean", "cosine"] = Field("euclidean", description="devkit: euclidean (honours noise removal)")
    probe_noise: str | None = Field(None, description="FaceScrub noise list (facescrub_noises.txt)")
    distractor_noise: str | None = Field(None, description="MegaFace noise list (megaface_noises.txt)")
    strict_noise: bool = Field(True, description="a noise-list entry naming no image of the sets is an error")
    noise_seed: int = Field(0, description="seed of the noise added to replaced probes")
    devkit_dir: str | None = Field(None, description="also write devkit feature files here")
    devkit_size_suffix: bool = Field(False, description="devkit file names <img>_<algo>_<H>x<W>.bin (2018 form)")
    decode_threads: int = Field(4, ge=1, description="threads decoding images")
    chunk_images: int = Field(8192, ge=1, description="images per extraction chunk (the unit an interrupted run resumes at)")


class IjbConfig(ExtractionConfig):
    """Parameters of the IJB stage (extraction settings plus ``eval_ijbc.py``'s switches)."""

    norm_score: bool = Field(True, description="keep each image's feature norm as its weight (eval_ijbc use_norm_score)")
    detector_score: bool = Field(True, description="weight each image by its detector score (eval_ijbc use_detector_score)")
    identification: bool = Field(True, description="1:N identification too when the 1:N protocol files are there")
    features_dir: str | None = Field(None, description="feature cache folder (default <out_dir>/features); share it between runs")
    decode_threads: int = Field(4, ge=1, description="threads decoding and aligning images")
    chunk_images: int = Field(8192, ge=1, description="images per extraction chunk (the unit an interrupted run resumes at)")

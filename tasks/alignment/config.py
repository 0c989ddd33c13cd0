"""``AlignConfig``: every option of the align stage (:mod:`tasks.alignment.aligner`).

A module of its own that imports only pydantic, so that command lines (:mod:`tasks.cli`) and forms
are built without importing the detector (torch, OpenCV).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from datasets.hashing import params_hash
from datasets.image_size import parse_image_size

if TYPE_CHECKING:
    from models.face_detector import FaceDetector

__all__ = ["ALGORITHM_VERSION", "AlignConfig"]

#: Bump when a code change alters what is written for the same input and parameters; it is part
#: of the parameter hash, so rows made by older code are redone. 2: ``batch_size`` 1 by default and
#: MTCNN at ``detect_threads`` threads (a photo's face no longer depends on the photos beside it or
#: on the worker's thread count).
ALGORITHM_VERSION = 2
_OUTPUT_FIELDS = ("image_size", "min_face_size", "thresholds", "factor", "face_policy", "no_face",
                  "jpeg_quality", "max_side", "min_score", "refine_passes")


class AlignConfig(BaseModel):
    """Parameters of the align stage. All but ``device`` change the output; ``batch_size`` and
    ``detect_threads`` only when they are above 1.

    Batch invariance: MTCNN's convolutions may sum in a different order for a different batch
    shape or thread count (oneDNN and MKL pick kernels and blocking by shape, thread count and CPU
    model), so a photo detected together with others, or with other threads, can get landmarks a few
    1e-4 px away, enough to change some JPEG bytes of its face. With ``batch_size=1`` (the default)
    every photo, and every refinement crop, is its own MTCNN call, run with ``detect_threads`` torch
    threads whatever the worker's setting: its face is a function of its own bytes and the
    parameters only, on a given machine, whatever the other photos, their order, the shard size, the
    number of workers and their threads, or an interrupted and resumed run. With ``batch_size > 1``
    (faster mostly on CUDA) the faces depend on which photos share a batch, so ``batch_size`` and the
    plan's ``shard_size`` become part of the parameter hash and the stage record (:meth:`plan_params`).
    """

    model_config = ConfigDict(extra="forbid")

    image_size: Literal["112x112", "112x96"] = Field(
        "112x112", description="output height x width; '112,96' (InsightFace spelling) is accepted")
    min_face_size: int = Field(20, ge=8, description="MTCNN minimum face size, pixels of the detection image")
    thresholds: tuple[float, float, float] = Field((0.6, 0.7, 0.7), description="P-, R-, O-Net score thresholds")
    factor: float = Field(0.709, gt=0.1, lt=1.0, description="MTCNN image pyramid scale step")
    face_policy: Literal["insightface", "first", "all"] = Field(
        "insightface",
        description="insightface: largest area minus 2x squared distance to the image centre; "
                    "first: highest score; all: every face its own item")
    no_face: Literal["skip", "center_crop"] = Field(
        "skip", description="no face found: skip (status no_face) or write the spec 5.3 centre crop (status fallback)")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality of the aligned faces")
    max_side: int = Field(640, ge=0, description="longest side photos are downscaled to for detection; 0: never")
    detect_threads: int = Field(
        1, ge=1, le=256,
        description="torch threads MTCNN runs with on the CPU, whatever the process's setting (the thread count "
                    "changes the convolutions' sums); parallelism comes from shards on several workers")
    batch_size: int = Field(
        1, ge=1,
        description="photos per MTCNN call; 1: each photo's face is independent of the other photos (byte-"
                    "reproducible on one machine); >1: faster on CUDA, but faces depend on their batch mates, so "
                    "batch_size and shard_size enter the parameter hash")
    min_score: float = Field(0.0, ge=0.0, le=1.0, description="faces scoring lower are ignored")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when present, else CPU")
    refine_passes: int = Field(
        2, ge=0, le=3,
        description="landmark refinement passes: MTCNN again on each chosen face, aligned at 2x scale with a "
                    "margin from the warp decode; 0: align with the first detection's landmarks")
    already_aligned: bool = Field(
        False, description="inputs are aligned face crops: no detection; scaled to image_size only if needed")

    @field_validator("image_size", mode="before")
    @classmethod
    def _spell_size(cls, value: Any) -> Any:
        try:
            return str(parse_image_size(value))  # "112,112", (112, 112) -> "112x112"
        except ValueError:
            return value  # the Literal names the allowed sizes

    @field_validator("thresholds")
    @classmethod
    def _check_thresholds(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if not all(0.0 < v < 1.0 for v in value):
            raise ValueError(f"thresholds must lie in (0, 1), got {value}")
        return value

    def output_params(self) -> dict[str, Any]:
        """The parameters that change what is written (plus the algorithm version)."""
        params = self.model_dump(mode="json", include=set(_OUTPUT_FIELDS))
        params["algorithm"] = ALGORITHM_VERSION
        if self.batch_size > 1 and not self.already_aligned:  # batch mates change the faces (class docstring)
            params["batch_size"] = self.batch_size
        if self.detect_threads != 1 and not self.already_aligned:
            params["detect_threads"] = self.detect_threads
        if self.already_aligned:  # only when set, so that hashes of detected outputs stay as they were
            params["already_aligned"] = True
        return params

    def params_hash(self) -> str:
        return params_hash(self.output_params())

    def plan_params(self, shard_size: int) -> dict[str, Any]:
        """:meth:`output_params` of a run split into shards of ``shard_size`` files: with
        ``batch_size > 1`` the shards decide which photos share a batch, so ``shard_size`` is added."""
        params = self.output_params()
        if "batch_size" in params:
            params["shard_size"] = int(shard_size)
        return params

    def make_detector(self) -> "FaceDetector":
        from models.face_detector import FaceDetector

        return FaceDetector(
            min_face_size=self.min_face_size, thresholds=self.thresholds, factor=self.factor,
            max_side=self.max_side, batch_size=self.batch_size, device=self.device, threads=self.detect_threads,
        )

"""Parameters of the ``build-dataset`` flow (they are the form of the deployment in the Prefect UI).

:class:`BuildDatasetParams` holds all of them, validated; the flow's signature lists the same
fields one by one (so ``prefect deployment run build-dataset/default -p name=... -p raw_dir=...``
works) and builds this model first. :meth:`BuildDatasetParams.check_inputs` looks at the file
system and raises a one-line ``ValueError`` naming the path for bad input.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from datasets.errors import FormatError
from datasets.hashing import params_hash
from datasets.lst import detect_lst_form
from datasets.rec_layout import REC_FILES
from flows.local import default_data_root
from tasks.alignment import AlignConfig
from tasks.bins import PairsSet, missing_images, read_pairs
from tasks.lst import LstConfig
from tasks.merge import MergeConfig
from tasks.pack import PackConfig

__all__ = ["AlignConfig", "LstConfig", "PackConfig", "MergeConfig", "PairsSet", "TaskRunnerKind",
           "BuildDatasetParams", "DatasetLayout"]

TaskRunnerKind = Literal["threads", "processes", "dask"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_name(value: str) -> str:
    """A dataset or run name: a folder name that starts with a letter or digit."""
    if not _NAME.match(value):
        raise ValueError(f"name {value!r} must start with a letter or digit and hold only letters, digits, '.', '_', '-'")
    return value


class DatasetLayout:
    """Folders of one dataset under the data root: ``<data_root>/datasets/<name>/{align,lst,pack,merge,bins}``;
    the gathered training set is the dataset folder itself."""

    def __init__(self, data_root: str | os.PathLike, name: str):
        self.root = Path(data_root).resolve() / "datasets" / name

    @property
    def align(self) -> Path:
        return self.root / "align"

    @property
    def lst(self) -> Path:
        return self.root / "lst"

    @property
    def pack(self) -> Path:
        return self.root / "pack"

    @property
    def merge(self) -> Path:
        return self.root / "merge"

    @property
    def bins(self) -> Path:
        return self.root / "bins"


def _has_file(folder: Path) -> bool:
    for _dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not f.startswith(".") for f in filenames):
            return True
    return False


def _check_image_folder(path: str, what: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{what} {p} is not a folder (expected one sub-folder of images per identity)")
    if not _has_file(p):
        raise ValueError(f"{what} {p} holds no image files (expected <identity>/<image> below it)")


class BuildDatasetParams(BaseModel):
    """Everything ``build-dataset`` takes. See the flow's docstring for what each stage does."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="dataset name: <data_root>/datasets/<name>/ (letters, digits, '.', '_', '-')")
    raw_dir: str | None = Field(None, description="photos to detect and align: <raw_dir>/<identity>/<photo>")
    aligned_dirs: list[str] = Field(
        default_factory=list, description="folders of already aligned faces, <dir>/<identity>/<image> (no detection)")
    lst_file: str | None = Field(
        None, description="your own .lst, packed as it is instead of raw_dir/aligned_dirs (no align or lst stage): "
                          "InsightFace form 'aligned<TAB>path<TAB>label[<TAB>bbox[<TAB>landmarks]]' (aligned=0 lines "
                          "are aligned on their landmarks, or cropped from their bbox) or im2rec form "
                          "'index<TAB>label<TAB>path' (face crops); paths relative to the list's folder")
    data_root: str | None = Field(None, description="artefact root; default $FACEPIPE_DATA_ROOT or ./data")
    align: AlignConfig = Field(default_factory=AlignConfig, description="detection and alignment")
    lst: LstConfig = Field(default_factory=LstConfig, description="image list and labels")
    pack: PackConfig = Field(default_factory=PackConfig, description="train.rec packing")
    merge_with: list[str] = Field(
        default_factory=list, description="packed dataset folders to merge with this one (train.rec, train.idx, property)")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="merge and de-duplication")
    merge_first: Literal["this", "others"] = Field(
        "this", description="which comes first in the merge (the first dataset's identities are always kept)")
    pairs: list[PairsSet] = Field(default_factory=list, description="verification sets to build (<name>.bin each)")
    task_runner: TaskRunnerKind = Field("threads", description="runs the detection shards: threads, processes or dask")
    max_workers: int = Field(2, ge=1, description="parallel shards (threads, processes or local Dask workers)")
    dask_address: str | None = Field(None, description="scheduler of an existing Dask cluster, e.g. tcp://host:8786")
    shard_size: int = Field(64, ge=1, description="photos per detection shard (one Prefect task each)")
    force: bool = Field(False, description="redo every stage and every photo")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        return check_name(value)

    @model_validator(mode="after")
    def _check_combination(self) -> "BuildDatasetParams":
        if self.lst_file and (self.raw_dir or self.aligned_dirs):
            raise ValueError("lst_file is packed as it is: give it alone, without raw_dir or aligned_dirs "
                             "(merge_with can add other packed sets)")
        if not self.raw_dir and not self.aligned_dirs and not self.lst_file:
            raise ValueError("give raw_dir (photos to align) or aligned_dirs (aligned faces), or both; "
                             "or lst_file (a .lst to pack)")
        names = [p.name for p in self.pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"pairs names must be unique, got {names}")
        if self.merge.dedup != "none" and not self.merge_with:
            raise ValueError(f"merge.dedup={self.merge.dedup!r} needs merge_with (the packed datasets to merge with)")
        if self.merge.needs_embeddings() and not self.merge.model:
            raise ValueError("merge.dedup='model' and merge.exclude need merge.model (a .onnx file or a checkpoint)")
        if self.task_runner != "dask" and self.dask_address:
            raise ValueError(f"dask_address is set but task_runner is {self.task_runner!r}; use task_runner='dask'")
        return self

    def resolved_data_root(self) -> Path:
        return Path(self.data_root).resolve() if self.data_root else default_data_root()

    def layout(self) -> DatasetLayout:
        return DatasetLayout(self.resolved_data_root(), self.name)

    def sources(self) -> dict[str, tuple[Path, AlignConfig]]:
        """``{source name: (input folder, align configuration)}``: ``raw`` for raw_dir, and
        ``aligned-<folder name>-<6 hex of its path>`` for each aligned folder."""
        out: dict[str, tuple[Path, AlignConfig]] = {}
        if self.raw_dir:
            out["raw"] = (Path(self.raw_dir).resolve(), self.align)
        for folder in self.aligned_dirs:
            p = Path(folder).resolve()
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", p.name)[:40] or "dir"
            out[f"aligned-{safe}-{params_hash(str(p), 6)}"] = (p, self.align.model_copy(update={"already_aligned": True}))
        return out

    def pack_image_size(self) -> str | None:
        """The image size to pack ``lst_file`` at: ``align.image_size`` when it was given, else None
        (the pack stage takes the first aligned image's size)."""
        return self.align.image_size if "image_size" in self.align.model_fields_set else None

    def merges(self) -> bool:
        return bool(self.merge_with) or bool(self.merge.exclude)

    def check_inputs(self) -> None:
        """Fail fast, with a one-line ``ValueError`` naming the path, on input that cannot work."""
        if self.raw_dir:
            _check_image_folder(self.raw_dir, "raw_dir")
        for folder in self.aligned_dirs:
            _check_image_folder(folder, "aligned_dirs entry")
        if self.lst_file:
            if not Path(self.lst_file).is_file():
                raise ValueError(f"lst_file {self.lst_file} does not exist (expected a .lst file)")
            try:
                detect_lst_form(self.lst_file)
            except FormatError as exc:
                raise ValueError(f"lst_file: {exc}") from None
        for folder in self.merge_with:
            for name in REC_FILES:
                if not (Path(folder) / name).is_file():
                    raise ValueError(f"merge_with entry {folder}: {name} not found (expected a packed dataset folder)")
        if self.merge.needs_embeddings() and self.merge.model and not Path(self.merge.model).exists():
            raise ValueError(f"merge.model {self.merge.model} does not exist")
        for entry in self.merge.exclude:
            if not Path(entry).exists():
                raise ValueError(f"merge.exclude entry {entry} does not exist")
        for spec in self.pairs:
            if not Path(spec.file).is_file():
                raise ValueError(f"pairs {spec.name!r}: pair list {spec.file} does not exist")
            try:
                pairs = read_pairs(spec.file, spec.root(), spec.format)
            except FormatError as exc:
                raise ValueError(f"pairs {spec.name!r}: {exc}") from None
            missing = missing_images(pairs)
            if missing and spec.missing == "fail":
                line, path = missing[0]
                raise ValueError(f"pairs {spec.name!r}: {spec.file} line {line} names {path}, which does not exist "
                                 f"({len(missing)} missing in all; set missing='drop' to drop those pairs)")

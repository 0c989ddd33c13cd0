"""Parameters of the ``train-and-eval`` flow (the form of its deployment in the Prefect UI).

Training options come in three layers, later ones winning: a YAML ``preset`` (``configs/<name>.yaml``
or a path), the common InsightFace options as their own parameters (``-p network=r50 -p loss=arcface
-p margin_m=0.5 -p lr_steps=100000,140000``), and ``options`` for everything else
(``-p options='{"version_se": 1, "per-batch-size": 64}'``; dashed and 2018 names work).
:meth:`TrainAndEvalParams.train_config` turns them into a validated :class:`tasks.training.config.TrainConfig`;
:meth:`TrainAndEvalParams.check_inputs` raises one-line ``ValueError`` / ``FileNotFoundError`` naming
the path or option for input that cannot work, before anything runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.local import default_data_root
from datasets.rec_layout import REC_FILES
from flows.params import check_name
from tasks.verification import VerificationConfig
from tasks.evaluation.config import IjbConfig
from tasks.ijb import available_targets
from tasks.megaface import ImageSet, MegaFaceConfig
from tasks.training.config import TrainConfig, load_config
from tasks.training.validation import resolve_val_targets

__all__ = ["TrainAndEvalParams", "MegaFaceSpec", "IjbSpec", "RunLayout", "PRESETS_DIR", "preset_path"]

PRESETS_DIR = Path(__file__).resolve().parents[1] / "configs"
#: Options with their own flow parameter (None = the preset's value).
COMMON_OPTIONS = ("network", "loss", "margin_s", "margin_m", "lr", "lr_steps", "mom", "wd", "per_batch_size",
                  "emb_size", "image_size", "max_steps", "epochs", "ckpt", "verbose", "pretrained", "device")


def preset_path(preset: str) -> Path:
    """``configs/<preset>.yaml`` for a bare name, else the path itself; a one-line error lists the presets."""
    candidate = PRESETS_DIR / f"{preset}.yaml"
    if "/" not in preset and not preset.endswith((".yaml", ".yml")):
        if candidate.is_file():
            return candidate
        names = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise FileNotFoundError(f"preset {preset!r} is not in {PRESETS_DIR} (presets: {names}) and is not a YAML path")
    path = Path(preset).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"preset {path}: file not found")
    return path


class MegaFaceSpec(BaseModel):
    """The MegaFace stage: probe (FaceScrub-style) and distractor sets and the protocol's settings."""

    model_config = ConfigDict(extra="forbid")

    probes: ImageSet = Field(description="probe images: a list file (identity/image paths) or a .rec set")
    distractors: ImageSet = Field(description="distractor images: a list file or a .rec set")
    config: MegaFaceConfig = Field(default_factory=MegaFaceConfig, description="protocol and extraction settings")


class IjbSpec(BaseModel):
    """The IJB stage: the folder holding IJBB/ and/or IJBC/ (meta/ + loose_crop/ each) and the settings."""

    model_config = ConfigDict(extra="forbid")

    root: str = Field(description="folder holding IJBB/ and/or IJBC/, each with meta/ and loose_crop/ (as eval_ijbc.py reads them)")
    targets: list[Literal["IJBB", "IJBC"]] | None = Field(None, description="IJBB and/or IJBC (default: every one under root)")
    config: IjbConfig = Field(default_factory=IjbConfig, description="pooling, scoring and extraction settings")


class RunLayout:
    """Folders of one run: ``<data_root>/runs/<name>/{train,triplet,verification,megaface,ijb,export}``."""

    def __init__(self, data_root: str | Path, name: str):
        self.root = Path(data_root).resolve() / "runs" / name
        self.train, self.triplet, self.export = self.root / "train", self.root / "triplet", self.root / "export"
        self.verification, self.megaface = self.root / "verification", self.root / "megaface"
        self.ijb = self.root / "ijb"


class TrainAndEvalParams(BaseModel):
    """Everything ``train-and-eval`` takes. See the flow's docstring for the stages."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="training set: a name under <data_root>/datasets/, or a path (with /) to a folder with train.rec, train.idx, property")
    name: str | None = Field(None, description="run name: <data_root>/runs/<name>/ (default <dataset>-<network>-<loss>)")
    data_root: str | None = Field(None, description="artefact root; default $FACEPIPE_DATA_ROOT or ./data")
    preset: str | None = Field(None, description="training preset: configs/<preset>.yaml (cpu-demo, r100-arcface, r50-cosface, y1-softmax, m1-triplet) or a YAML path")
    network: str | None = Field(None, description="network code: r100, r50, y1, m1, ... (default: the preset's, else r50)")
    loss: str | None = Field(None, description="loss name or 2018 loss-type number: arcface/4, cosface/2, softmax/0, sphereface/1, combined/5, ...")
    margin_s: float | None = Field(None, description="scale s of the normalised logits (margin-s)")
    margin_m: float | None = Field(None, description="margin m (margin-m)")
    lr: float | None = Field(None, description="base learning rate")
    lr_steps: str | list[int] | None = Field(None, description="steps at which lr drops 10x, e.g. 100000,140000,160000 (lr-steps)")
    mom: float | None = Field(None, description="SGD momentum")
    wd: float | None = Field(None, description="weight decay")
    per_batch_size: int | None = Field(None, description="images per step per GPU (per-batch-size)")
    emb_size: int | None = Field(None, description="embedding size (emb-size)")
    image_size: str | None = Field(None, description="input 'height,width', must match the dataset (image-size)")
    max_steps: int | None = Field(None, description="stop after this many steps (max-steps)")
    epochs: int | None = Field(None, description="passes over the training set")
    ckpt: int | None = Field(None, description="checkpoints: 0 none, 1 best, 2 all, 3 last (the flow needs 1, 2 or 3)")
    verbose: int | None = Field(None, description="evaluate and checkpoint every N steps")
    pretrained: str | None = Field(None, description="start from this checkpoint ('prefix,epoch' or a path)")
    device: str | None = Field(None, description="auto, cpu or cuda")
    options: dict[str, Any] = Field(default_factory=dict, description="any other training option, e.g. {\"version_se\": 1}")
    nproc: int = Field(1, ge=1, description="training processes on this machine (GPUs); >1 runs torchrun")
    timeout_s: float | None = Field(None, gt=0, description="stop training after this many seconds (it can be resumed)")
    train: bool = Field(True, description="train; false: evaluate and export `model` instead")
    model: str | None = Field(None, description="a model to evaluate when train is false: a checkpoint, an arcface_torch "
                                                "backbone.pth, an MXNet 'prefix,epoch' or a .onnx file")
    triplet: bool = Field(False, description="fine-tune the trained model with semi-hard triplets (lr 0.005, mom 0)")
    triplet_options: dict[str, Any] = Field(default_factory=dict, description="training options of the triplet stage, on top of the training run's")
    verification: bool = Field(True, description="verification accuracy on the .bin sets")
    targets: list[str] | None = Field(None, description=".bin sets: names in the dataset folder or paths (default: every .bin there)")
    verification_config: VerificationConfig = Field(default_factory=VerificationConfig, description="verification settings")
    megaface: MegaFaceSpec | None = Field(None, description="MegaFace identification with noise removal (off when empty)")
    ijb: IjbSpec | None = Field(None, description="IJB-B/IJB-C 1:1 verification (TAR@FAR) and 1:N identification (off when empty)")
    export: bool = Field(True, description="export the final model to ONNX (checked with onnxruntime)")
    force: bool = Field(False, description="redo every stage (an earlier run with other options is moved aside, not deleted)")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str | None) -> str | None:
        return None if value is None else check_name(value)

    @model_validator(mode="after")
    def _check_combination(self) -> "TrainAndEvalParams":
        if not self.train and not self.model:
            raise ValueError("train is false: give model (a checkpoint or .onnx file to evaluate)")
        if self.train and self.model:
            raise ValueError("model is only used when train is false; to start training from it use pretrained")
        if self.triplet and not self.train:
            raise ValueError("triplet fine-tuning needs train=true (it starts from the trained checkpoint)")
        return self

    # --- derived -------------------------------------------------------------------------------------------
    def resolved_data_root(self) -> Path:
        return Path(self.data_root).resolve() if self.data_root else default_data_root()

    def dataset_dir(self) -> Path:
        """``<data_root>/datasets/<dataset>`` for a bare name (``sample``); a path (with ``/``, or ``./name``) as given."""
        if "/" in self.dataset or self.dataset.startswith(("~", ".")):
            return Path(self.dataset).expanduser().resolve()
        return self.resolved_data_root() / "datasets" / self.dataset

    def _overrides(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in COMMON_OPTIONS if getattr(self, k) is not None}
        out.update(self.options)
        return out

    def train_config(self) -> TrainConfig:
        """The validated training options; ``dataset`` and ``output`` are this run's."""
        overrides = {**self._overrides(), "dataset": str(self.dataset_dir())}
        base = load_config(preset_path(self.preset) if self.preset else None, overrides)
        return base.model_copy(update={"output": str(self.layout(base).train)})

    def triplet_config(self, trained: TrainConfig, checkpoint: str) -> TrainConfig:
        """The triplet stage's options: the training run's, the seed's triplet defaults, then ``triplet_options``."""
        data = trained.model_dump(mode="json")
        images = int(self.triplet_options.get("images_per_identity", self.triplet_options.get("images-per-identity", 5)))
        batch = max(images * 2, trained.per_batch_size // images * images)
        data.update({"loss": "triplet", "lr": 0.005, "mom": 0.0, "lr_steps": [], "warmup": 0, "sample_rate": 1.0,
                     "per_batch_size": batch, "images_per_identity": images, "pretrained": checkpoint, "resume": None,
                     "output": str(self.layout(trained).triplet)})
        for key, value in self.triplet_options.items():
            data[str(key).lstrip("-").replace("-", "_")] = value
        return load_config(None, data)

    def run_name(self, cfg: TrainConfig | None = None) -> str:
        if self.name:
            return self.name
        dataset = self.dataset_dir().name
        if cfg is None:
            return f"{dataset}-eval"
        return f"{dataset}-{cfg.network}-{cfg.loss}"

    def layout(self, cfg: TrainConfig | None = None) -> RunLayout:
        return RunLayout(self.resolved_data_root(), self.run_name(cfg))

    def check_inputs(self) -> TrainConfig | None:
        """Fail fast, naming the path or option, on input that cannot work. Returns the training options."""
        cfg = None
        if self.train:
            folder = self.dataset_dir()
            if not folder.is_dir():
                raise FileNotFoundError(f"dataset {self.dataset!r}: {folder} is not a folder (build it with build-dataset, "
                                        f"or give a folder with {', '.join(REC_FILES)})")
            missing = [f for f in REC_FILES if not (folder / f).is_file()]
            if missing:
                raise FileNotFoundError(f"dataset {folder}: {', '.join(missing)} missing (expected a packed training set)")
            cfg = self.train_config()
            if cfg.ckpt == 0:
                raise ValueError("ckpt 0 keeps no checkpoint, but train-and-eval evaluates and exports one: use 1, 2 or 3")
            if self.triplet:
                self.triplet_config(cfg, "pretrained.pt")  # option errors now, not after hours of training
        elif not Path(self.model).is_file():  # type: ignore[arg-type]
            from tasks.checkpoint import model_files  # "prefix,epoch" names a file of another name

            try:
                model_files(self.model)  # type: ignore[arg-type]
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"model {self.model}: file not found (expected a training checkpoint, an "
                                        f"arcface_torch .pth, an MXNet 'prefix,epoch' or a .onnx file; {exc})") from None
        if self.verification:
            self.verification_targets(cfg)
        if self.megaface is not None:
            for what, spec in (("probes", self.megaface.probes), ("distractors", self.megaface.distractors)):
                if not Path(spec.path).exists():
                    raise FileNotFoundError(f"megaface {what} {spec.path}: not found (an image list or a .rec set)")
        if self.ijb is not None:
            found = available_targets(self.ijb.root)
            missing = [t for t in (self.ijb.targets or found or ["IJBB or IJBC"]) if t not in found]
            if missing:
                raise FileNotFoundError(f"ijb root {self.ijb.root}: no {', '.join(missing)} folder with meta/ "
                                        f"(expected <root>/IJBC/meta and <root>/IJBC/loose_crop)")
        return cfg

    def verification_targets(self, cfg: TrainConfig | None) -> dict[str, str]:
        """``{name: .bin path}``: ``targets``, else the training run's ``val_targets``, else every ``.bin`` of the dataset."""
        wanted = self.targets if self.targets is not None else (cfg.val_targets if cfg is not None else None)
        return {name: str(path) for name, path in resolve_val_targets(wanted, self.dataset_dir())}

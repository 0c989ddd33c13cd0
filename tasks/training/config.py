"""``TrainConfig``: every option of a training run, with InsightFace's names (2018 ``train_softmax.py`` /
``train_triplet.py``, 2019 ``config.py``). It is a pydantic model, so it is also the form of a training
run in the Prefect UI.

Spellings: fields are snake_case (``per_batch_size``); YAML files and the command line also accept
the seeds' dashed spelling (``per-batch-size``, ``--margin-m``, ``--lr-steps 100000,140000``) and the
old aliases ``loss_type`` (-> ``loss``), ``loss_m1..3`` (-> ``margin_m1..3``), ``target``
(-> ``val_targets``), ``data_dir`` (-> ``dataset``), ``end_epoch`` (-> ``epochs``).

``loss``: a name (``arcface``, ``cosface``, ``softmax``, ``sphereface``, ``combined``, ``nsoftmax``,
``curricularface``, ``adaface``, ``triplet``) or a 2018 loss-type number (0 softmax, 1 sphereface,
2 cosface, 4 arcface, 5 combined, 12 triplet); it is stored as the name.

Units: ``lr_steps``, ``warmup``, ``max_steps``, ``verbose`` and ``frequent`` count optimiser steps
(batches per rank), as in 2018. ``per_batch_size`` is per process (per GPU); the global batch is
``per_batch_size * world_size``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.backbone import network_codes
from models.embedding import normalize_option
from models.margins import HEADS, LOSS_TYPES

__all__ = ["TrainConfig", "LOSS_NAMES", "CKPT_POLICIES", "load_config", "parse_args", "config_error"]

TRIPLET = "triplet"
LOSS_NAMES = (*HEADS, TRIPLET)
LOSS_NUMBERS = {**LOSS_TYPES, 12: TRIPLET}
CKPT_POLICIES = {0: "none", 1: "best", 2: "all", 3: "last"}
# Old option names -> field names (after dashes became underscores).
ALIASES = {
    "loss_type": "loss", "loss_m1": "margin_m1", "loss_m2": "margin_m2", "loss_m3": "margin_m3",
    "target": "val_targets", "data_dir": "dataset", "end_epoch": "epochs", "momentum": "mom",
}


def _csv_list(value: Any) -> Any:
    """``"a,b"`` -> ``["a", "b"]``; lists pass through; None / "" -> []."""
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, (int, float)):
        return [value]
    return value


class TrainConfig(BaseModel):
    """One training run. Defaults are the 2018 ``train_softmax.py`` defaults unless noted."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- data ---------------------------------------------------------------------------------------------
    dataset: str = Field("", description="training set folder: train.rec, train.idx, property (and .bin files)")
    output: str = Field("", description="run folder: checkpoints/, metrics.parquet, status.json, tensorboard/")
    val_targets: list[str] | None = Field(
        None, description="verification sets: names of .bin files in the dataset folder (lfw -> lfw.bin) or paths; "
                          "None: every .bin in the dataset folder; []: no evaluation")
    normalize: Literal["arcface", "mxnet"] = Field(
        "arcface", description="input normalisation: arcface (x-127.5)/127.5, mxnet (x-127.5)/128")
    flip: bool = Field(True, description="random horizontal mirror of training images (rand_mirror)")
    color: int = Field(0, ge=0, le=2, description="colour augmentation (2018 --color): 1 jitter of brightness, contrast "
                                                  "and saturation by +-color_jitter; 2 also JPEG re-encoding at quality 2-20 (p 0.5)")
    color_jitter: float = Field(0.125, ge=0.0, lt=1.0, description="strength of the color jitter (2018: 0.125)")
    cutoff: int = Field(0, ge=0, description="random erasing (2018 --cutoff): with p 0.5 a cutoff x cutoff pixel square "
                                             "is set to grey 128; 0 off")
    rand_scale: float = Field(0.0, ge=0.0, lt=1.0, description="random scale of the aligned crop by 1 +- rand_scale (0 off)")
    rand_shift: float = Field(0.0, ge=0.0, lt=1.0, description="random shift of the aligned crop by up to this fraction "
                                                               "of its width/height (0 off)")
    rand_light: float = Field(0.0, ge=0.0, le=1.0, description="random side lighting: the image times a linear ramp "
                                                               "1 +- rand_light across a random direction (0 off)")
    num_workers: int = Field(4, ge=0, description="data loader processes per rank")

    # --- network ------------------------------------------------------------------------------------------
    network: str = Field("r50", description="network code: r100, r50, y1, m1, ... (models.network_codes())")
    version_se: int = Field(0, ge=0, le=1, description="squeeze-excitation units (ResNet codes)")
    version_input: int = Field(1, ge=0, le=1, description="0: 7x7/2 stem + max-pool, 1: L (3x3/1 stem)")
    version_output: str | None = Field(None, description="embedding option A..J, GAP, GDC; None: the network's default (E; GDC for y1/y2/mbf)")
    version_unit: int = Field(3, ge=1, le=3, description="ResNet unit: 1 v1, 2 pre-activation, 3 IR")
    version_act: Literal["prelu", "relu"] = Field("prelu", description="activation")
    emb_size: int | None = Field(None, ge=1, description="embedding size; None: the network's default (512; y1 128)")
    image_size: str = Field("112,112", description="input 'height,width' in pixels; must match the dataset")
    dropout: float = Field(0.4, ge=0.0, lt=1.0, description="dropout of embedding options E and F")

    # --- loss ---------------------------------------------------------------------------------------------
    loss: str = Field("arcface", description="loss name or 2018 loss-type number (0, 1, 2, 4, 5; 12 = triplet)")
    margin_s: float = Field(64.0, gt=0, description="scale s of the normalised logits")
    margin_m: float | None = Field(None, description="margin m; None: the loss's default (arcface 0.5, cosface 0.35)")
    margin_m1: float | None = Field(None, description="combined margin m1 (multiplicative angle)")
    margin_m2: float | None = Field(None, description="combined margin m2 (additive angle)")
    margin_m3: float | None = Field(None, description="combined margin m3 (additive cosine)")
    easy_margin: bool = Field(False, description="ArcFace easy margin")
    sample_rate: float = Field(1.0, gt=0.0, le=1.0, description="Partial FC: share of negative class centres used per step")
    triplet_alpha: float = Field(0.3, gt=0.0, description="triplet margin alpha (squared distances)")
    triplet_max_ap: float = Field(0.0, ge=0.0, description="triplet: drop pairs with d(a,p) above this (0 = off)")
    images_per_identity: int = Field(5, ge=2, description="triplet: images of each identity in a batch")

    # --- optimisation ---------------------------------------------------------------------------------------
    lr: float = Field(0.1, gt=0.0, description="base learning rate (SGD)")
    lr_steps: list[int] = Field(default_factory=list, description="steps at which lr is multiplied by 0.1, e.g. 100000,140000,160000")
    mom: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    wd: float = Field(5e-4, ge=0.0, description="weight decay")
    warmup: int = Field(0, ge=0, description="linear learning-rate warm-up, in steps")
    per_batch_size: int = Field(128, ge=2, description="images per step on each rank (GPU)")
    max_steps: int = Field(0, ge=0, description="stop after this many steps (0: run all epochs)")
    epochs: int = Field(20, ge=1, description="passes over the training set")
    grad_clip: float = Field(0.0, ge=0.0, description="clip the gradient norm to this (0 = off)")
    nan_max_consecutive: int = Field(10, ge=1, description="stop after this many consecutive non-finite steps")

    # --- checkpoints, evaluation, logging -------------------------------------------------------------------
    ckpt: int = Field(1, description="checkpoints: 0 none, 1 best (by the first val target) + last, 2 all, 3 last")
    verbose: int = Field(2000, ge=1, description="evaluate and checkpoint every N steps")
    frequent: int = Field(20, ge=1, description="log every N steps")
    pretrained: str | None = Field(None, description="start from weights: a checkpoint path or 'prefix,epoch' (prefix-0001.pt)")
    resume: str | None = Field(None, description="continue a run exactly: 'auto' (output/checkpoints/last.pt if any) or a checkpoint path")
    eval_batch_size: int = Field(256, ge=1, description="images per forward pass during verification")

    # --- speed and reproducibility --------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    amp: Literal["auto", "bf16", "fp16", "none"] = Field(
        "auto", description="mixed precision: auto = bf16 on CUDA, none on CPU; fp16 uses a GradScaler")
    tf32: bool = Field(True, description="TF32 matmuls/convolutions on Ampere+ GPUs")
    channels_last: bool = Field(True, description="NHWC memory format for the backbone and its input")
    compile: bool = Field(False, description="torch.compile the backbone")
    seed: int = Field(0, ge=0, description="seed of every random stream (order, mirror, init, Partial FC sampling)")
    deterministic: bool = Field(False, description="deterministic kernels (exact resume; slower on GPU)")

    # --- normalisation of old spellings ---------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out: dict[str, Any] = {}
        for key, value in data.items():
            name = str(key).strip().lstrip("-").replace("-", "_")
            name = ALIASES.get(name, name)
            if name in out:
                raise ValueError(f"option {name!r} is given twice (as {key!r} and another spelling)")
            out[name] = value
        return out

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, value: Any) -> str:
        code = str(value).strip().lower()
        if code not in network_codes():
            raise ValueError(f"network {value!r} is not a known code; valid codes: {', '.join(network_codes())}")
        return code

    @field_validator("version_output", mode="before")
    @classmethod
    def _output(cls, value: Any) -> Any:
        return None if value in (None, "") else normalize_option(str(value))

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> str:
        parts = [p.strip() for p in value.replace("x", ",").split(",")] if isinstance(value, str) else list(value)
        try:
            h, w = (int(p) for p in parts)
        except (TypeError, ValueError):
            raise ValueError(f"image_size {value!r} must be 'height,width', e.g. 112,112") from None
        if min(h, w) < 16:
            raise ValueError(f"image_size {value!r} must be at least 16x16")
        return f"{h},{w}"

    @field_validator("loss", mode="before")
    @classmethod
    def _loss(cls, value: Any) -> str:
        key = str(value).strip().lower()
        if key.lstrip("-").isdigit():
            number = int(key)
            if number not in LOSS_NUMBERS:
                valid = ", ".join(f"{n} ({name})" for n, name in LOSS_NUMBERS.items())
                raise ValueError(f"loss type {value!r} is not supported; valid loss types: {valid}")
            return LOSS_NUMBERS[number]
        if key not in LOSS_NAMES:
            raise ValueError(f"loss {value!r} is not known; valid losses: {', '.join(LOSS_NAMES)} "
                             f"or loss-type numbers {', '.join(map(str, LOSS_NUMBERS))}")
        return key

    @field_validator("lr_steps", mode="before")
    @classmethod
    def _steps(cls, value: Any) -> Any:
        steps = _csv_list(value)
        try:
            steps = [int(s) for s in steps]
        except (TypeError, ValueError):
            raise ValueError(f"lr_steps {value!r} must be step numbers, e.g. 100000,140000,160000") from None
        if any(s < 1 for s in steps) or steps != sorted(steps):
            raise ValueError(f"lr_steps {value!r} must be positive and increasing")
        return steps

    @field_validator("val_targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        return None if value is None else _csv_list(value)

    @field_validator("ckpt", mode="before")
    @classmethod
    def _ckpt(cls, value: Any) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = -1
        if number not in CKPT_POLICIES:
            names = {v: k for k, v in CKPT_POLICIES.items()}
            if str(value).strip().lower() in names:
                return names[str(value).strip().lower()]
            raise ValueError(f"ckpt {value!r} is not a policy; valid: "
                             + ", ".join(f"{k} ({v})" for k, v in CKPT_POLICIES.items()))
        return number

    @field_validator("pretrained", "resume", mode="before")
    @classmethod
    def _optional_path(cls, value: Any) -> Any:
        return None if value in (None, "", "none", "None") else str(value)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.loss == TRIPLET:
            if self.per_batch_size % self.images_per_identity:
                raise ValueError(f"per_batch_size {self.per_batch_size} must be a multiple of images_per_identity "
                                 f"{self.images_per_identity} for the triplet loss (identities x images per batch)")
            if self.sample_rate != 1.0:
                raise ValueError(f"sample_rate {self.sample_rate} applies to classifier losses, not to the triplet loss")
        if self.version_se and not self.network.startswith("r"):
            raise ValueError(f"version_se applies to ResNet codes only, not to network {self.network!r}")
        return self

    # --- derived values -------------------------------------------------------------------------------------
    @property
    def image_hw(self) -> tuple[int, int]:
        h, w = self.image_size.split(",")
        return int(h), int(w)

    @property
    def is_triplet(self) -> bool:
        return self.loss == TRIPLET

    @property
    def ckpt_policy(self) -> str:
        return CKPT_POLICIES[self.ckpt]

    def backbone_args(self) -> dict[str, Any]:
        """Keyword arguments of ``models.get_backbone`` (``network`` included)."""
        args: dict[str, Any] = {"network": self.network, "version_se": self.version_se,
                                "version_input": self.version_input, "version_unit": self.version_unit,
                                "version_act": self.version_act, "image_size": list(self.image_hw),
                                "dropout": self.dropout}
        if self.emb_size is not None:
            args["emb_size"] = self.emb_size
        if self.version_output is not None:
            args["version_output"] = self.version_output
        return args

    def augmenter(self) -> "Augmenter":
        """The loader's per-sample augmentation (:class:`datasets.augment.Augmenter`) for these options."""
        from datasets.augment import Augmenter

        return Augmenter(color=self.color, color_jitter=self.color_jitter, cutoff=self.cutoff,
                         rand_scale=self.rand_scale, rand_shift=self.rand_shift, rand_light=self.rand_light,
                         seed=self.seed)

    def margin_args(self) -> dict[str, Any]:
        """Keyword arguments of ``models.get_margin`` for this loss (InsightFace option names)."""
        if self.is_triplet:
            raise ValueError("the triplet loss has no margin head")
        cls, _ = HEADS[self.loss]
        import inspect

        accepted = set(inspect.signature(cls.__init__).parameters)
        m_name = "m2" if "m" not in accepted and "m2" in accepted else "m"  # combined: margin_m is m2
        options = {"s": self.margin_s, m_name: self.margin_m, "m1": self.margin_m1, "easy_margin": self.easy_margin or None}
        for name in ("m2", "m3"):
            if getattr(self, f"margin_{name}") is not None:
                options[name] = getattr(self, f"margin_{name}")
        return {k: v for k, v in options.items() if v is not None and k in accepted}

    def resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        return self.device

    def amp_dtype(self, device: str) -> str:
        """'bf16', 'fp16' or 'none' for ``device``."""
        if self.amp == "auto":
            return "bf16" if device == "cuda" else "none"
        return self.amp


def config_error(exc: ValidationError, source: str = "config") -> ValueError:
    """One readable line per problem: ``option 'network': network 'r7' is not a known code; valid codes: ...``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        message = str(err["msg"]).removeprefix("Value error, ")
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            import difflib

            close = difflib.get_close_matches(str(where), _option_names(), n=3)
            message = "is not an option" + (f"; did you mean {', '.join(close)}?" if close else "")
        shown = "" if isinstance(value, dict) or "given" in message or repr(value) in message else f" (got {value!r})"
        lines.append(f"option {where!r}: {message}{shown}" if where != "config" else message)
    return ValueError(f"{source}: " + "; ".join(lines))


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """A ``TrainConfig`` from a YAML file (dashed or snake_case keys) with ``overrides`` on top."""
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: training config not found") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{p}: not valid YAML ({exc})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: expected a mapping of option: value, got {type(loaded).__name__}")
        data = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    for key, value in (overrides or {}).items():
        data[str(key).lstrip("-").replace("-", "_")] = value
    data = {ALIASES.get(k, k): v for k, v in data.items()}
    try:
        return TrainConfig(**data)
    except ValidationError as exc:
        raise config_error(exc, str(path) if path is not None else "config") from None


def _option_names() -> list[str]:
    return [*TrainConfig.model_fields, *ALIASES]


def parse_args(argv: list[str] | None = None, prog: str = "python -m tasks.training") -> TrainConfig:
    """``--config x.yaml`` plus any option as ``--per-batch-size 64`` or ``--per_batch_size=64``."""
    parser = argparse.ArgumentParser(prog=prog, description="Train a face-recognition model (see tasks/training/config.py).",
                                     allow_abbrev=False)
    parser.add_argument("--config", help="YAML file of options (configs/*.yaml)")
    for name in _option_names():
        field = TrainConfig.model_fields.get(ALIASES.get(name, name))
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else [])
        kind = field.annotation if field is not None else None
        nargs = "?" if kind is bool else None
        parser.add_argument(*flags, dest=f"opt_{name}", nargs=nargs, const="true" if kind is bool else None,
                            default=None, metavar="VALUE", help=(field.description if field else f"alias of {ALIASES[name]}"))
    args = parser.parse_args(argv)
    overrides = {k.removeprefix("opt_"): v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    return load_config(args.config, overrides)

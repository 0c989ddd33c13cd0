"""``TrainConfig``: every option of a training run, with InsightFace's names (2018 ``train_softmax.py`` /
``train_triplet.py``, 2019 ``config.py``). It is a pydantic model, so it is also the form of a training
run in the Prefect UI.

Spellings: fields are snake_case (``per_batch_size``); YAML files and the command line also accept
the seeds' dashed spelling (``per-batch-size``, ``--margin-m``, ``--lr-steps 100000,140000``) and the
old aliases ``loss_type`` (-> ``loss``), ``loss_m1..3`` (-> ``margin_m1..3``), ``target``
(-> ``val_targets``), ``data_dir`` (-> ``dataset``), ``end_epoch`` (-> ``epochs``), ``prefix``
(-> ``output``: the run folder, where 2018 wrote ``<prefix>-0001.params``), ``rand_mirror``
(-> ``flip``), ``margin_a``/``margin_b`` (-> ``margin_m1``/``margin_m3``), and the 2019
``config.py`` names (``net_output``, ``net_se``, ``loss_s``, ``data_rand_mirror``, ...; :data:`ALIASES`).
2018 options that have no counterpart in a training run are refused with one line that says what
replaces them (:data:`REPLACED`, e.g. ``--images-filter`` -> the build-dataset ``lst.min_images``).

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

from datasets.errors import validation_message
from datasets.image_size import ImageSize, parse_image_size

__all__ = ["TrainConfig", "LOSS_NAMES", "CKPT_POLICIES", "ALIASES", "REPLACED", "load_config", "parse_args", "config_error"]

TRIPLET = "triplet"
# The tables of network codes, losses and embedding options live in models/ (which imports torch); they
# are read when a value is validated, so that building a command line does not import torch.


def _loss_names() -> tuple[str, ...]:
    from models.margins import HEADS

    return (*HEADS, TRIPLET)


def _loss_numbers() -> dict[int, str]:
    from models.margins import LOSS_TYPES

    return {**LOSS_TYPES, 12: TRIPLET}


def __getattr__(name: str) -> Any:
    if name == "LOSS_NAMES":
        return _loss_names()
    if name == "LOSS_NUMBERS":
        return _loss_numbers()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

CKPT_POLICIES = {0: "none", 1: "best", 2: "all", 3: "last"}
SPHEREFACE_OPTIONS = ("beta", "beta_min", "beta_freeze", "gamma", "power")
# Old option names -> field names (after dashes became underscores).
ALIASES = {
    "loss_type": "loss", "loss_m1": "margin_m1", "loss_m2": "margin_m2", "loss_m3": "margin_m3",
    "target": "val_targets", "data_dir": "dataset", "end_epoch": "epochs", "momentum": "mom",
    "clip_grad": "grad_clip",
    # 2018 train_softmax.py
    "prefix": "output", "rand_mirror": "flip", "margin_a": "margin_m1", "margin_b": "margin_m3",
    # 2019 config.py
    "net_output": "version_output", "net_se": "version_se", "net_input": "version_input", "net_unit": "version_unit",
    "net_act": "version_act", "net_multiplier": "version_multiplier", "loss_s": "margin_s",
    "data_rand_mirror": "flip", "dataset_path": "dataset",
}
# 2018/2019 options without a counterpart here -> what replaces them (one line, raised as the error).
REPLACED = {
    "images_filter": "identities with fewer images are dropped when the set is built: build-dataset "
                     "lst.min_images=N (python -m tasks.lst --min-images N)",
    "data_images_filter": "identities with fewer images are dropped when the set is built: build-dataset "
                          "lst.min_images=N (python -m tasks.lst --min-images N)",
    "margin": "the SphereFace margin is margin_m (an integer, default 4) with loss sphereface / 1",
    "scale": "SphereFace's beta follows beta, beta_min, beta_freeze, gamma and power (the LSoftmax 'scale' is not used)",
    "use_deformable": "deformable convolutions are not available; choose another network",
    "ce_loss": "the cross-entropy loss is logged as 'loss' in metrics.parquet in every run",
    "kvstore": "gradients are reduced by torch.distributed (DDP); use nproc / torchrun",
    "ctx_num": "the number of GPUs is the number of processes: nproc (flow) or torchrun --nproc-per-node",
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

    # allow_inf_nan=False: 'lr inf', 'margin_s nan', ... are refused naming the option
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # --- data ---------------------------------------------------------------------------------------------
    dataset: str = Field("", description="training set folder: train.rec, train.idx, property (and .bin files)")
    output: str = Field("", description="run folder: checkpoints/, metrics.parquet, status.json, tensorboard/")
    val_targets: list[str] | None = Field(
        None, description="verification sets: names of .bin files in the dataset folder (lfw -> lfw.bin) or paths; "
                          "None: every .bin in the dataset folder; []: no evaluation")
    normalize: Literal["arcface", "mxnet"] = Field(
        "arcface", description="input normalisation: arcface (x-127.5)/127.5, mxnet (x-127.5)/128")
    flip: bool = Field(True, description="random horizontal mirror of training images (rand_mirror)")
    val_shuffle_folds: bool = Field(
        False, description="verification: split a permutation of the pairs (seeded by seed) into folds, for pair lists "
                           "not laid out in LFW's balanced blocks")
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
    variant: Literal["arcface_torch", "mxnet"] | None = Field(
        None, description="layer settings of published weights: arcface_torch (BN eps 1e-5, GDC FC without bias), "
                          "mxnet (2018 MobileFaceNet BN eps 1e-3); None: the network code's own")
    version_multiplier: float | None = Field(
        None, gt=0.0, description="width multiplier of MobileNet codes (m1 1.0, m05 0.5); None: the code's")
    bn_mom: float = Field(0.9, ge=0.0, lt=1.0, description="BatchNorm momentum as in MXNet: weight of the old "
                                                             "running statistics (PyTorch momentum = 1 - bn_mom)")
    whiten_trunk: bool = Field(False, description="at every checkpoint, PCA-whiten the trunk's last feature map on the "
                                                  "training images (mirror-symmetric, no augmentation) and append it "
                                                  "to the embedding (models/whitening.py): for small data sets "
                                                  "(the checkpoint grows by features x min(images, 4096) floats)")

    # --- loss ---------------------------------------------------------------------------------------------
    loss: str = Field("arcface", description="loss name or 2018 loss-type number (0, 1, 2, 4, 5; 12 = triplet)")
    margin_s: float = Field(64.0, gt=0, description="scale s of the normalised logits")
    margin_m: float | None = Field(None, description="margin m; None: the loss's default (arcface 0.5, cosface 0.35)")
    margin_m1: float | None = Field(None, description="combined margin m1 (multiplicative angle)")
    margin_m2: float | None = Field(None, description="combined margin m2 (additive angle)")
    margin_m3: float | None = Field(None, description="combined margin m3 (additive cosine)")
    easy_margin: bool = Field(False, description="ArcFace easy margin")
    fc7_lr_mult: float = Field(1.0, ge=0.0, description="learning-rate multiplier of the classifier (fc7) weights")
    fc7_wd_mult: float = Field(1.0, ge=0.0, description="weight-decay multiplier of the classifier (fc7) weights")
    fc7_no_bias: bool = Field(False, description="softmax (loss 0): classifier without bias (the other losses have none)")
    beta: float | None = Field(None, gt=0.0, description="SphereFace: initial blend weight beta (default 1000)")
    beta_min: float | None = Field(None, ge=0.0, description="SphereFace: lower bound of beta (default 5)")
    beta_freeze: int | None = Field(
        None, ge=0, description="SphereFace: steps beta stays at its start (default 0; 5000 above 20000 classes)")
    gamma: float | None = Field(None, ge=0.0, description="SphereFace: beta = beta0 (1 + gamma t)^-power (default 0.12; "
                                                          "0.06 above 20000 classes)")
    power: float | None = Field(None, ge=0.0, description="SphereFace: exponent of the beta decay (default 1)")
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
    grad_clip: float = Field(5.0, ge=0.0, description="clip the global gradient norm to this, as arcface_torch "
                                                      "(clip_grad_norm_ max_norm 5; 0 = off)")
    nan_max_consecutive: int = Field(10, ge=1, description="stop after this many consecutive non-finite steps")

    # --- checkpoints, evaluation, logging -------------------------------------------------------------------
    ckpt: int = Field(1, description="checkpoints: 0 none, 1 best (by the first val target) + last, 2 all, 3 last")
    verbose: int = Field(2000, ge=1, description="evaluate and checkpoint every N steps")
    on_eval_failure: Literal["continue", "stop"] = Field(
        "continue", description="a val target's evaluation fails (e.g. non-finite embeddings): the checkpoint is "
                                "written and the failure recorded, then continue training, or stop (resume with "
                                "--resume auto)")
    frequent: int = Field(20, ge=1, description="log every N steps")
    pretrained: str | None = Field(None, description="start from weights: a checkpoint path or 'prefix,epoch' (prefix-0001.pt), "
                                                     "an arcface_torch backbone.pth, an MXNet 'prefix,epoch' (prefix-0001.params)")
    resume: str | None = Field(None, description="continue a run exactly: 'auto' (output/checkpoints/last.pt if any) or a checkpoint path")
    eval_batch_size: int = Field(256, ge=1, description="images per forward pass during verification")

    # --- speed and reproducibility --------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    amp: Literal["auto", "bf16", "fp16", "none"] = Field(
        "auto", description="mixed precision: auto = bf16 on CUDA, none on CPU; fp16 uses a GradScaler")
    tf32: bool = Field(True, description="TF32 matmuls/convolutions on Ampere+ GPUs")
    channels_last: bool = Field(True, description="NHWC memory format for the backbone and its input")
    compile: bool | None = Field(None, description="torch.compile the backbone; None: on CUDA yes, on the CPU no")
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
            if name in REPLACED:
                raise ValueError(f"option {key!r} is not a training option here: {REPLACED[name]}")
            name = ALIASES.get(name, name)
            if name in out:
                raise ValueError(f"option {name!r} is given twice (as {key!r} and another spelling)")
            out[name] = value
        return out

    @field_validator("network", mode="before")
    @classmethod
    def _network(cls, value: Any) -> str:
        from models.backbone import network_code  # imported when validating: --help needs no torch

        return network_code(value)

    @field_validator("version_output", mode="before")
    @classmethod
    def _output(cls, value: Any) -> Any:
        from models.embedding import normalize_option

        return None if value in (None, "") else normalize_option(str(value))

    @field_validator("image_size", mode="before")
    @classmethod
    def _image_size(cls, value: Any) -> str:
        return parse_image_size(value, minimum=16).csv

    @field_validator("loss", mode="before")
    @classmethod
    def _loss(cls, value: Any) -> str:
        key = str(value).strip().lower()
        LOSS_NUMBERS, LOSS_NAMES = _loss_numbers(), _loss_names()  # noqa: N806
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
        if isinstance(value, str):  # the command line: 'lfw,cfp_fp', '[]' (no evaluation), '[lfw, cfp_fp]'
            text = value.strip()
            if text.startswith("[") and text.endswith("]"):
                value = [v.strip().strip("'\"") for v in text[1:-1].split(",") if v.strip().strip("'\"")]
            elif text.lower() in ("none", "null", "all"):
                return None
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
        if self.version_multiplier is not None and not self.network.startswith("m"):
            raise ValueError(f"version_multiplier applies to MobileNet codes (m1, m05) only, not to network {self.network!r}")
        sphere = [n for n in SPHEREFACE_OPTIONS if getattr(self, n) is not None]
        if sphere and self.loss != "sphereface":
            raise ValueError(f"{', '.join(sphere)} apply to loss sphereface (loss type 1) only, not to {self.loss!r}")
        self._check_margins()
        return self

    def _check_margins(self) -> None:
        """Refuse margins outside the range where the loss still asks for a margin, one line naming
        the option, the loss and the valid range (checked before any data is read):

        * angular margins (``arcface``, ``curricularface`` m; ``combined`` m2): ``[0, pi/2)``. The
          target logit is ``cos(theta + m)``; m < 0 gives the target a bonus (the loss falls
          towards 0 without separating classes), and from pi/2 on ``cos(theta + m) <= 0`` for every
          theta in ``[0, pi/2]``: even a sample on its class centre scores below an orthogonal
          negative, so the loss cannot be made small and the margin no longer ranks anything.
        * additive cosine margins (``cosface`` m, ``combined`` m3, ``adaface`` m): ``[0, 1)``. The
          target logit is ``cos(theta) - m``; m < 0 is a bonus as above (the probe's ``-1`` ran to
          loss 0.0), and from 1 on a sample on its class centre (``cos = 1``) scores no higher than
          an orthogonal negative (``cos = 0``). Published values are 0.35 (CosFace) and 0.2-0.4.
        * ``combined`` m1 (multiplies the angle): ``(0, 2]``; the 2019 combinations use 0.9-1.0.
        * ``sphereface`` m: a whole number from 1 to 8 (the 2018 operator's multiple-angle
          polynomials; InsightFace uses 4).
        """
        import math

        if self.is_triplet:
            return
        angular = (0.0, math.pi / 2, "[0, pi/2) (angular margin: cos(theta + m))")
        additive = (0.0, 1.0, "[0, 1) (cosine margin: cos(theta) - m)")
        m_ranges = {"arcface": angular, "curricularface": angular, "cosface": additive, "amsoftmax": additive,
                    "adaface": additive}
        checks: list[tuple[str, float | None, tuple[float, float, str]]] = []
        if self.loss in m_ranges:
            checks.append(("margin_m", self.margin_m, m_ranges[self.loss]))
        if self.loss in ("combined", "margin_softmax"):
            checks += [("margin_m" if self.margin_m is not None else "margin_m2",
                        self.margin_m if self.margin_m is not None else self.margin_m2, angular),
                       ("margin_m3", self.margin_m3, additive)]
            m1 = self.margin_m1
            if m1 is not None and not 0.0 < m1 <= 2.0:
                raise ValueError(f"option 'margin_m1' {m1!r} is outside (0, 2] for loss {self.loss} "
                                 "(it multiplies the angle: cos(m1 theta + m2) - m3; 0.9-1.0 in use)")
        for name, value, (low, high, text) in checks:
            if value is not None and not low <= value < high:
                raise ValueError(f"option {name!r} {value!r} is outside {text} for loss {self.loss}")
        if self.loss == "sphereface" and self.margin_m is not None \
                and not (float(self.margin_m).is_integer() and 1 <= self.margin_m <= 8):
            raise ValueError(f"option 'margin_m' {self.margin_m!r} must be a whole number from 1 to 8 for loss "
                             "sphereface (the multiple of the angle; 4 in InsightFace)")

    # --- derived values -------------------------------------------------------------------------------------
    @property
    def image_hw(self) -> ImageSize:
        return parse_image_size(self.image_size)

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
        if self.variant is not None:
            args["variant"] = self.variant
        if self.version_multiplier is not None:
            args["multiplier"] = self.version_multiplier
        return args

    def augmenter(self) -> "Augmenter":
        """The loader's per-sample augmentation (:class:`datasets.augment.Augmenter`) for these options."""
        from datasets.augment import Augmenter

        return Augmenter(color=self.color, color_jitter=self.color_jitter, cutoff=self.cutoff,
                         rand_scale=self.rand_scale, rand_shift=self.rand_shift, rand_light=self.rand_light,
                         seed=self.seed)

    def margin_args(self) -> dict[str, Any]:
        """Keyword arguments of ``models.get_margin`` for this loss (:func:`models.margins.head_options`)."""
        if self.is_triplet:
            raise ValueError("the triplet loss has no margin head")
        from models.margins import head_options

        return head_options(self.loss, strict=False, margin_s=self.margin_s, margin_m=self.margin_m,
                            loss_m1=self.margin_m1, loss_m2=self.margin_m2, loss_m3=self.margin_m3,
                            easy_margin=self.easy_margin or None,
                            # SphereFace's beta annealing (2018 LSoftmax options; beta is the head's base)
                            beta=self.beta, beta_min=self.beta_min, beta_freeze=self.beta_freeze,
                            gamma=self.gamma, power=self.power)

    def resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
        return self.device

    def use_compile(self, device: str) -> bool:
        """Whether the backbone is compiled on ``device`` (``compile: None`` -> CUDA only)."""
        return (device == "cuda") if self.compile is None else self.compile

    def amp_dtype(self, device: str) -> str:
        """'bf16', 'fp16' or 'none' for ``device``."""
        if self.amp == "auto":
            return "bf16" if device == "cuda" else "none"
        return self.amp


def config_error(exc: ValidationError, source: str = "config") -> ValueError:
    """One readable line per problem: ``option 'network': network 'r7' is not a known code; valid codes: ...``."""
    return ValueError(f"{source}: " + validation_message(exc, _option_names()))


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
    return [*TrainConfig.model_fields, *ALIASES, *REPLACED]


def parse_args(argv: list[str] | None = None, prog: str = "python -m tasks.training") -> TrainConfig:
    """``--config x.yaml`` plus any option as ``--per-batch-size 64`` or ``--per_batch_size=64`` (the parser
    is generated from :class:`TrainConfig` in :mod:`tasks.cli`)."""
    from tasks import cli

    return config_from_args(cli.build_parser("train", prog).parse_args(argv))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``facepipe train`` arguments: ``--config`` with the options on top."""
    overrides = {k: v for k, v in vars(args).items() if k in TrainConfig.model_fields and v is not None}
    overrides |= {k.removeprefix("replaced_"): v for k, v in vars(args).items() if k.startswith("replaced_") and v is not None}
    return load_config(args.config, overrides)

"""``get_backbone``: one function that builds any InsightFace network code as ``trunk -> embedding head``.

Codes (``--network``): ``r18 r34 r49 r50 r74 r90 r100 r101 r152 r200 r269`` (fresnet table; default
LResNet-E-IR), ``m1`` / ``m05`` (MobileNet v1, multiplier 1 / 0.5), ``y1`` / ``y2`` (MobileFaceNet,
2019 config: GDC output, emb 128 / 256), ``mbf`` (arcface_torch's MobileFaceNet: scale 2, GDC, emb 512),
``i4`` (Inception-ResNet-v2), ``p68 p92 p107 p131`` (DPN), ``d121 d161 d169 d201`` (DenseNet),
``iresnet18 iresnet34 iresnet50 iresnet100 iresnet200`` (arcface_torch's IResNets: IR units, basic units at
every depth, their unit table, BN eps 1e-5; variant ``arcface_torch`` by default), ``onet`` (MTCNN's ONet
convolutions up to conv3, input 48x48, emb 128, starting from the face detector's weights: :mod:`models.onet`).

Variants (``variant``) where published weights were trained with other layer settings than ours:

* ``None`` (facepipe): BN eps 2e-5 everywhere (InsightFace's ``fresnet.py`` / ``symbol_utils.py``).
* ``"arcface_torch"``: BN eps 1e-5 everywhere (PyTorch's default, arcface_torch's ``iresnet.py`` and
  ``mobilefacenet.py``); the GDC output's FC has no bias and its last BN learns its scale.
* ``"mxnet"``: BN eps as the 2018 MXNet symbols have it: MobileFaceNet's conv BNs (``fmobilefacenet.py``
  passes no eps) use MXNet's default 1e-3; the embedding BNs keep 2e-5. ResNets are unchanged (2e-5).

The network takes *normalised* input ``(N, 3, H, W) float32`` (InsightFace: ``(pixel - 127.5) / 128``,
RGB) and returns the embedding ``(N, emb_size) float32`` (not L2-normalised).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from models.densenet import DENSENET_CONFIGS, DenseNetTrunk
from models.dpn import DPN_CONFIGS, DPNTrunk
from models.embedding import EmbeddingHead, normalize_option
from models.inception_resnet import InceptionResNetV2Trunk
from models.layers import ACTIVATIONS, init_weights, output_shape
from models.mobilefacenet import MobileFaceNetTrunk
from models.mobilenet import MobileNetTrunk
from models.onet import ONetTrunk, load_detector_weights
from models.resnet import ARCFACE_TORCH_UNITS, RESNET_UNITS, ResNetTrunk

# code -> (family, per-code defaults). Defaults not listed: emb 512, output "E".
NETWORKS: dict[str, tuple[str, dict]] = {
    **{f"r{d}": ("resnet", {"depth": d}) for d in RESNET_UNITS},
    "m1": ("mobilenet", {"multiplier": 1.0}),
    "m05": ("mobilenet", {"multiplier": 0.5}),
    "y1": ("mobilefacenet", {"blocks": (1, 4, 6, 2), "emb_size": 128, "version_output": "GDC"}),
    "y2": ("mobilefacenet", {"blocks": (2, 8, 16, 4), "emb_size": 256, "version_output": "GDC"}),
    "mbf": ("mobilefacenet", {"blocks": (1, 4, 6, 2), "scale": 2, "emb_size": 512, "version_output": "GDC"}),
    "i4": ("inception_resnet", {}),
    **{f"p{d}": ("dpn", {"depth": d}) for d in DPN_CONFIGS},
    **{f"d{d}": ("densenet", {"depth": d}) for d in DENSENET_CONFIGS},
    **{f"iresnet{d}": ("resnet", {"depth": d, "units": u, "variant": "arcface_torch"})
       for d, u in ARCFACE_TORCH_UNITS.items()},
    "onet": ("onet", {"depth": 3, "emb_size": 128}),
}
VARIANTS = ("arcface_torch", "mxnet")
MXNET_DEFAULT_BN_EPS = 1e-3  # mx.sym.BatchNorm's default eps
ARCFACE_TORCH_BN_EPS = 1e-5  # torch.nn.BatchNorm*'s default eps
# Extra keyword options per family (``**kw`` of get_backbone).
FAMILY_OPTIONS = {
    "resnet": (), "mobilenet": ("multiplier",), "mobilefacenet": ("blocks", "scale"), "inception_resnet": (),
    "dpn": (), "densenet": ("densenet_dropout",), "onet": ("depth",),
}


class Backbone(nn.Module):
    """``head(trunk(x))`` for ``x`` of shape ``(N, 3, *image_size)``; ``emb_size`` = output width."""

    def __init__(self, network: str, trunk: nn.Module, head: EmbeddingHead, image_size: tuple[int, int]):
        super().__init__()
        self.network = network
        self.variant: str | None = None  # set by get_backbone
        self.image_size = image_size
        self.emb_size = head.out_features
        self.trunk = trunk
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing():  # the TorchScript ONNX exporter traces with a fixed shape
            self._check_input(x)
        return self.head(self.trunk(x))

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != self.image_size:
            raise ValueError(f"{self.network}: input has shape {tuple(x.shape)}, expected "
                             f"(N, 3, {self.image_size[0]}, {self.image_size[1]})")


def _input_size(image_size: Sequence[int]) -> tuple[int, int]:
    """``(height, width)`` as two positive ints (strings are parsed by :mod:`datasets.image_size`)."""
    try:
        size = tuple(int(v) for v in image_size) if not isinstance(image_size, str) else ()
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size {image_size!r} must be (height, width), two positive integers, e.g. (112, 112)")
    return size  # type: ignore[return-value]


def network_codes() -> list[str]:
    """Every accepted ``network`` code."""
    return list(NETWORKS)


def network_code(network: str) -> str:
    """``network`` as a code of ``NETWORKS`` (case and spaces ignored); ``ValueError`` listing the codes."""
    code = str(network).strip().lower()
    if code not in NETWORKS:
        hint = " (ResNet depths come from the fresnet table)" if re.fullmatch(r"r\d+", code) else ""
        raise ValueError(f"network {network!r} is not a known code; valid codes: {', '.join(NETWORKS)}{hint}")
    return code


def _trunk(family: str, spec: dict, version_input: int, version_unit: int, version_se: int, act: str,
           variant: str | None = None) -> nn.Module:
    if family == "resnet":
        return ResNetTrunk(spec["depth"], version_unit=version_unit, version_input=version_input,
                           version_se=version_se, act=act, units=spec.get("units"))
    if family == "mobilenet":
        return MobileNetTrunk(spec["multiplier"], version_input, act)
    if family == "mobilefacenet":
        return MobileFaceNetTrunk(tuple(spec["blocks"]), spec.get("scale", 1), act,
                                  first_expansion=128 if variant == "arcface_torch" else None)
    if family == "inception_resnet":
        return InceptionResNetV2Trunk(version_input)
    if family == "onet":
        return ONetTrunk(spec["depth"])
    if family == "dpn":
        return DPNTrunk(spec["depth"], version_input, act)
    return DenseNetTrunk(spec["depth"], version_input, act, spec.get("densenet_dropout", 0.2))


def get_backbone(network: str, *, emb_size: int | None = None, version_se: int = 0, version_input: int = 1,
                 version_output: str | None = None, version_unit: int = 3, version_act: str = "prelu",
                 image_size: Sequence[int] = (112, 112), dropout: float = 0.4, variant: str | None = None,
                 initialize: bool = True, **kw) -> Backbone:
    """Build the network ``network`` (a code of ``NETWORKS``) with InsightFace's option names.

    ``emb_size`` / ``version_output`` default to the code's own (512 / "E"; y1 128 / GDC, y2 256 / GDC).
    ``version_se``, ``version_unit`` (1 v1, 2 v2 pre-activation, 3 IR) apply to ResNet codes;
    ``version_input`` 0 = 7x7/2 stem + max-pool, 1 = L (3x3/1 stem); ``version_act`` prelu | relu
    (Inception-ResNet keeps its ReLU); ``dropout`` is the rate of outputs E and F. Extra ``kw``:
    ``multiplier`` (m*), ``blocks`` / ``scale`` (y*, mbf), ``densenet_dropout`` (d*).
    ``variant``: ``None``, ``"arcface_torch"`` or ``"mxnet"`` (module docstring); default: the code's own.
    Weights are initialised arcface_torch-style (kaiming-normal convs) unless ``initialize=False`` (weights
    that are loaded next, e.g. a network built on the meta device).
    """
    code = network_code(network)
    family, defaults = NETWORKS[code]
    unknown = set(kw) - set(FAMILY_OPTIONS[family])
    if unknown:
        allowed = ", ".join(FAMILY_OPTIONS[family]) or "none"
        raise TypeError(f"get_backbone({code!r}) got unexpected options {sorted(unknown)} (extra options: {allowed})")
    if version_act not in ACTIVATIONS:
        raise ValueError(f"version_act {version_act!r} is not supported (expected one of {', '.join(ACTIVATIONS)})")
    if version_input not in (0, 1):
        raise ValueError(f"version_input {version_input!r} is not supported (expected 0 or 1)")
    if version_se and family != "resnet":
        raise ValueError(f"version_se applies to ResNet codes only, not {code!r}")
    if version_unit not in (1, 2, 3):
        raise ValueError(f"version_unit {version_unit!r} is not supported (expected 1, 2 or 3)")
    spec = {**defaults, **kw}
    variant = variant if variant is not None else spec.get("variant")
    if variant not in (None, *VARIANTS):
        raise ValueError(f"variant {variant!r} is not known (expected one of {', '.join(VARIANTS)}, or None)")
    if variant == "arcface_torch" and (version_unit != 3 or version_input != 1 or version_se) and family == "resnet":
        raise ValueError(f"variant 'arcface_torch' of {code!r} is the IR network with input L "
                         f"(version_unit 3, version_input 1, version_se 0)")
    size = _input_size(image_size)
    emb = int(emb_size if emb_size is not None else spec.get("emb_size", 512))
    if emb < 1:
        raise ValueError(f"emb_size {emb_size!r} must be a positive integer")
    option = normalize_option(version_output if version_output is not None else spec.get("version_output", "E"))
    trunk = _trunk(family, spec, version_input, version_unit, version_se, version_act, variant)
    try:
        _, channels, h, w = output_shape(trunk, (1, 3, *size))
    except RuntimeError as exc:
        raise ValueError(f"image_size {size} is too small for {code!r}: {exc}") from None
    if h < 1 or w < 1:
        raise ValueError(f"image_size {size} is too small for {code!r} (last feature map {h}x{w})")
    head = EmbeddingHead(option, channels, (h, w), emb, dropout, version_act,
                         arcface_gdc=variant == "arcface_torch" and option == "GDC")
    model = Backbone(code, trunk, head, size)
    model.variant = variant
    _apply_variant_eps(model, family, variant)
    if initialize:
        init_weights(model)
        if family == "onet":  # the detector's real-face convolutions are the starting point
            load_detector_weights(model.trunk)
    return model


def _apply_variant_eps(model: Backbone, family: str, variant: str | None) -> None:
    """Set the BN eps of ``variant`` (see the module docstring) on every BatchNorm of ``model``."""
    if variant == "arcface_torch":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = ARCFACE_TORCH_BN_EPS
    elif variant == "mxnet" and family == "mobilefacenet":
        convs = [model.trunk] + ([model.head.layers[1]] if model.head.option == "GDC" else [])
        for part in convs:
            for m in part.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eps = MXNET_DEFAULT_BN_EPS

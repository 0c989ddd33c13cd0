"""Published face-recognition weights onto our backbones: arcface_torch state dicts and 2018 MXNet checkpoints.

Both functions recognise the network from the weights' names and shapes, build the matching
:class:`models.backbone.Backbone` and copy every tensor in (renamed; fp16 and fp64 become float32), so the
module gives the same embedding as the original network for the same normalised input.

* :func:`from_arcface_torch`: a ``backbone.pth`` state dict of arcface_torch (``backbones/iresnet.py``:
  ``iresnet18/34/50/100/200`` -> our ``iresnet*`` codes; ``backbones/mobilefacenet.py``: ``mbf`` and
  ``mbf_large`` -> our ``mbf`` with its ``blocks``/``scale``, variant ``arcface_torch``). Names
  ``conv1 bn1 prelu layerS.U.{bn1,conv1,bn2,prelu,conv2,bn3,downsample.0/1} bn2 fc features`` (IResNet) and
  ``layers.K... conv_sep features.layers...`` (MobileFaceNet); a ``module.`` prefix (DDP) is dropped.
* :func:`from_mxnet`: ``arg:``/``aux:`` parameters of a 2018 InsightFace MXNet checkpoint plus the
  nodes of its ``-symbol.json``: LResNet-E-IR (``fresnet.py`` unit v3: ``conv0 bn0 relu0
  stageS_unitU_{bn1,conv1,bn2,relu1,conv2,bn3,conv1sc,sc,se_conv1,se_relu1,se_conv2}``, output E:
  ``bn1 pre_fc1 fc1``) -> ``rN`` codes; MobileFaceNet (``fmobilefacenet.py``: ``conv_1 conv_2_dw|res_2
  dconv_23 res_3 dconv_34 res_4 dconv_45 res_5 conv_6sep``, output GDC: ``conv_6dw7_7 pre_fc1 fc1``) ->
  ``y1``/``y2`` with variant ``mxnet``. Each BatchNorm takes its ``eps`` from its symbol node (MXNet's
  default 1e-3 where the node gives none) and, with ``fix_gamma`` (MXNet's default True), a scale of
  exactly 1 whatever the file stores. The symbol's input nodes ``_minusscalar0`` / ``_mulscalar0``
  (``(x - 127.5) * 0.0078125``) become the normalisation ``"mxnet"`` that the embedder applies.

Errors are ``ValueError`` with one line naming the mismatch (missing / unexpected keys, the first few;
``key: ours (shape) vs file (shape)``; the unknown network; the image size the weights cannot take);
callers prefix the file name. Imports torch only.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from models.backbone import Backbone, get_backbone
from models.layers import FixedGammaBatchNorm1d
from models.resnet import ARCFACE_TORCH_UNITS, RESNET_UNITS

__all__ = ["Imported", "from_arcface_torch", "from_mxnet", "is_arcface_torch_state", "mxnet_normalization",
           "MXNET_BN_EPS_DEFAULT"]

MXNET_BN_EPS_DEFAULT = 1e-3
_SHOW = 5  # keys listed in an error


class Imported:
    """What an import built: ``model`` (eval mode), ``backbone_args`` (rebuild with ``get_backbone``),
    ``source`` (``"arcface_torch"`` / ``"mxnet"``), ``architecture`` (the original's name for it) and
    ``conversion`` (one line: what was renamed or converted)."""

    def __init__(self, model: Backbone, backbone_args: dict[str, Any], source: str, architecture: str, conversion: str):
        self.model, self.backbone_args, self.source = model, backbone_args, source
        self.architecture, self.conversion = architecture, conversion


def _tensor(value: Any) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else torch.as_tensor(value)
    return t.float() if t.is_floating_point() else t


def _first(keys, n: int = _SHOW) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _load_exact(model: nn.Module, state: dict[str, torch.Tensor], what: str, *, optional: tuple[str, ...] = (),
                names: Mapping[str, str] | None = None, theirs=None) -> None:
    """Copy ``state`` into ``model``; one-line ``ValueError`` naming missing/unexpected keys or a shape mismatch.
    Keys ending in one of ``optional`` (``num_batches_tracked``) may be absent. ``names``: our key -> the
    file's key (for messages); ``theirs(our_key)``: the file's name of a key the file lacks."""
    names = names or {}
    ours = model.state_dict(keep_vars=True)  # no detach: cheap on the meta device
    missing = [k for k in ours if k not in state and not k.endswith(optional)]
    unexpected = [names.get(k, k) for k in state if k not in ours]
    problems = []
    if missing:
        problems.append(f"missing keys {_first([theirs(k) for k in missing])}" if theirs
                        else f"missing weights for our {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_first(unexpected)}")
    if not problems:
        for k, v in state.items():
            if tuple(ours[k].shape) != tuple(v.shape):
                problems.append(f"shape mismatch at {names.get(k, k)}: ours {tuple(ours[k].shape)} ({k}) "
                                f"vs file {tuple(v.shape)}")
                break
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
    merged = {k: (state[k].to(ours[k].dtype).contiguous() if k in state else torch.zeros(ours[k].shape, dtype=ours[k].dtype))
              for k in ours}
    model.load_state_dict(merged, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{what}: no weights for {_first(left)}")


def _image_size(cells_hw: tuple[int, int] | None, cells: int | None, image_size: tuple[int, int] | None,
                what: str) -> tuple[int, int]:
    """Input size giving the last feature map the weights were made for (stride 16)."""
    if image_size is not None:
        return tuple(image_size)  # type: ignore[return-value]
    if cells_hw is not None:
        return cells_hw[0] * 16, cells_hw[1] * 16
    assert cells is not None
    side = math.isqrt(cells)
    if side * side == cells:
        return side * 16, side * 16
    raise ValueError(f"{what}: the embedding layer takes a feature map of {cells} cells, which is not square; "
                     f"give image_size (e.g. 112,96 for 42 cells)")


def _check_cells(model: Backbone, state: dict[str, torch.Tensor], fc_key: str | None, names: Mapping[str, str],
                 what: str) -> None:
    """A clear error when the input size gives another last feature map than the embedding FC was made for."""
    if fc_key is None or fc_key not in state:
        return
    ours, file = model.state_dict(keep_vars=True)[fc_key].shape[1], state[fc_key].shape[1]
    if ours != file:
        h, w = model.image_size
        channels = model.trunk.out_channels
        raise ValueError(f"{what}: input {h}x{w} gives a {ours // channels}-cell feature map, but {names.get(fc_key, fc_key)} "
                         f"takes {file // channels} cells ({file} inputs); the network cannot take {h}x{w} input")


def _build(args: dict[str, Any], what: str) -> Backbone:
    """``get_backbone(**args)`` on the meta device (no memory, no initialisation: every tensor is loaded)."""
    try:
        with torch.device("meta"):
            return get_backbone(**args, initialize=False)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None


# --- arcface_torch ---------------------------------------------------------------------------------------------

def _strip(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor) and not isinstance(v, np.ndarray):
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = _tensor(v)
    return out


def is_arcface_torch_state(state: Any) -> bool:
    """True for a dict of tensors with arcface_torch's IResNet or MobileFaceNet key names."""
    if not isinstance(state, Mapping) or not state:
        return False
    keys = {k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k for k in state}
    return ("layer1.0.conv1.weight" in keys and "fc.weight" in keys) or \
        ("conv_sep.layers.0.weight" in keys and "features.layers.2.weight" in keys)


_IRES_UNIT = {"bn1": "body.0", "conv1": "body.1", "bn2": "body.2", "prelu": "body.3", "conv2": "body.4",
              "bn3": "body.5", "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
_IRES_TOP = {"conv1": "trunk.stem.0", "bn1": "trunk.stem.1", "prelu": "trunk.stem.2", "bn2": "head.layers.0",
             "fc": "head.layers.3", "features": "head.layers.4"}


def _rename_iresnet(key: str) -> str | None:
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(bn1|conv1|bn2|prelu|conv2|bn3|downsample\.[01])\.(\w+)", key)
    if m:
        return f"trunk.stages.{int(m[1]) - 1}.{m[2]}.{_IRES_UNIT[m[3]]}.{m[4]}"
    m = re.fullmatch(r"(conv1|bn1|prelu|bn2|fc|features)\.(\w+)", key)
    return f"{_IRES_TOP[m[1]]}.{m[2]}" if m else None


def _unrename_iresnet(key: str) -> str:
    """Our key -> arcface_torch's (for messages about keys the file lacks)."""
    m = re.fullmatch(r"trunk\.stages\.(\d)\.(\d+)\.(\w+\.\d)\.(\w+)", key)
    unit = {v: k for k, v in _IRES_UNIT.items()}
    if m and m[3] in unit:
        return f"layer{int(m[1]) + 1}.{m[2]}.{unit[m[3]]}.{m[4]}"
    top = {v: k for k, v in _IRES_TOP.items()}
    prefix, _, param = key.rpartition(".")
    return f"{top[prefix]}.{param}" if prefix in top else key


def _rename_mbf(key: str) -> str | None:
    m = re.fullmatch(r"layers\.(\d)\.(.+)", key)
    if m:  # ConvBlock/LinearBlock .layers.k, DepthWise .layers.u.layers.k, Residual .layers.i.layers.u.layers.k
        rest = re.sub(r"^layers\.(\d+)\.layers\.(\d+)\.layers\.(\d+)\.", r"\1.layers.\2.\3.", m[2])
        if rest == m[2]:
            rest = re.sub(r"^layers\.(\d+)\.layers\.(\d+)\.", r"layers.\1.\2.", m[2])
        if rest == m[2]:
            rest = re.sub(r"^layers\.(\d+)\.", r"\1.", m[2])
        return f"trunk.layers.{m[1]}.{rest}"
    m = re.fullmatch(r"conv_sep\.layers\.(\d)\.(\w+)", key)
    if m:
        return f"trunk.layers.8.{m[1]}.{m[2]}"
    m = re.fullmatch(r"features\.layers\.0\.layers\.([01])\.(\w+)", key)
    if m:
        return f"head.layers.{m[1]}.{m[2]}"
    m = re.fullmatch(r"features\.layers\.([23])\.(\w+)", key)
    return f"head.layers.{int(m[1]) + 1}.{m[2]}" if m else None


def _count(keys, pattern: str) -> int:
    found = {int(m[1]) for k in keys for m in [re.match(pattern, k)] if m}
    return max(found) + 1 if found else 0


def _rename_all(state: dict[str, torch.Tensor], rename, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    out, names, unknown = {}, {}, []
    for k, v in state.items():
        new = rename(k)
        if new is None:
            unknown.append(k)
        else:
            out[new], names[new] = v, k
    if unknown:
        raise ValueError(f"{what}: unexpected keys {_first(unknown)}")
    return out, names


def from_arcface_torch(state: Mapping[str, Any], *, image_size: tuple[int, int] | None = None) -> Imported:
    """Build our backbone from an arcface_torch ``backbone.pth`` state dict (see the module docstring)."""
    sd = _strip(state)
    halves = any(isinstance(v, torch.Tensor) and v.dtype == torch.float16 for v in state.values())
    keys = list(sd)
    if "layer1.0.conv1.weight" in sd and "fc.weight" in sd:
        units = tuple(_count(keys, rf"layer{s}\.(\d+)\.") for s in (1, 2, 3, 4))
        depth = next((d for d, u in ARCFACE_TORCH_UNITS.items() if u == units), None)
        if depth is None:
            raise ValueError(f"arcface_torch IResNet with units per stage {units} is not iresnet18/34/50/100/200 "
                             f"(units {', '.join(f'{d}: {u}' for d, u in ARCFACE_TORCH_UNITS.items())})")
        emb, flat = sd["fc.weight"].shape
        channels = sd["bn2.weight"].shape[0] if "bn2.weight" in sd else 512
        what = f"arcface_torch iresnet{depth}"
        if flat % channels:
            raise ValueError(f"{what}: fc.weight has {flat} inputs, not a multiple of {channels} channels")
        size = _image_size(None, flat // channels, image_size, what)
        args = {"network": f"iresnet{depth}", "emb_size": int(emb), "image_size": list(size), "dropout": 0.0}
        renamed, names = _rename_all(sd, _rename_iresnet, what)
        arch = f"iresnet{depth}"
    elif "conv_sep.layers.0.weight" in sd and "features.layers.2.weight" in sd:
        scale = sd["layers.0.layers.0.weight"].shape[0] // 64
        first = _count(keys, r"layers\.1\.layers\.(\d+)\.layers\.\d+\.layers\.") or 1
        blocks = (first, _count(keys, r"layers\.3\.layers\.(\d+)\."), _count(keys, r"layers\.5\.layers\.(\d+)\."),
                  _count(keys, r"layers\.7\.layers\.(\d+)\."))
        emb = sd["features.layers.2.weight"].shape[0]
        kh, kw = sd["features.layers.0.layers.0.weight"].shape[2:]
        what = f"arcface_torch MobileFaceNet (blocks {blocks}, scale {scale})"
        size = _image_size((kh, kw), None, image_size, what)
        args = {"network": "mbf", "emb_size": int(emb), "image_size": list(size), "variant": "arcface_torch",
                "blocks": list(blocks), "scale": int(scale)}
        renamed, names = _rename_all(sd, _rename_mbf, what)
        arch = "mbf" if (blocks, scale) == ((1, 4, 6, 2), 2) else \
            "mbf_large" if (blocks, scale) == ((2, 8, 12, 4), 4) else f"MobileFaceNet{blocks}x{scale}"
    else:
        raise ValueError("not an arcface_torch backbone state dict (no layer1.0.conv1.weight + fc.weight of an "
                         f"IResNet, no conv_sep + features.layers of a MobileFaceNet; keys: {_first(keys)})")
    model = _build(args, what)
    _check_cells(model, renamed, "head.layers.3.weight" if arch.startswith("iresnet") else None, names, what)
    _load_exact(model, renamed, what, optional=("num_batches_tracked",), names=names,
                theirs=_unrename_iresnet if arch.startswith("iresnet") else None)
    model.eval()
    conversion = (f"arcface_torch {arch} state dict ({len(sd)} tensors{', fp16 -> fp32' if halves else ''}) "
                  f"-> {args['network']} variant arcface_torch (BN eps 1e-5)")
    return Imported(model, args, "arcface_torch", arch, conversion)


# --- MXNet (2018 InsightFace) ----------------------------------------------------------------------------------

def _attrs(node: Mapping[str, Any]) -> dict[str, str]:
    return dict(node.get("attrs") or node.get("attr") or node.get("param") or {})


def _flag(value: str | None, default: bool) -> bool:
    return default if value is None else str(value).strip().lower() in ("true", "1")


def mxnet_normalization(nodes: list[Mapping[str, Any]]) -> tuple[float, float] | None:
    """``(mean, scale)`` of the symbol's ``_minus_scalar`` / ``_mul_scalar`` input nodes (``(x - mean) * scale``),
    or None when the graph does not normalise its input."""
    minus = next((n for n in nodes if n.get("op") == "_minus_scalar"), None)
    mul = next((n for n in nodes if n.get("op") == "_mul_scalar"), None)
    if minus is None and mul is None:
        return None
    mean = float(_attrs(minus).get("scalar", 0.0)) if minus else 0.0
    scale = float(_attrs(mul).get("scalar", 1.0)) if mul else 1.0
    return mean, scale


_FRESNET_UNIT = {"bn1": "body.0", "conv1": "body.1", "bn2": "body.2", "relu1": "body.3", "conv2": "body.4",
                 "bn3": "body.5", "conv1sc": "shortcut.0", "sc": "shortcut.1", "se_conv1": "se.gate.1",
                 "se_relu1": "se.gate.2", "se_conv2": "se.gate.3"}
_MXNET_PARAM = {"weight": "weight", "bias": "bias", "gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
                "moving_var": "running_var"}
_MFN_STAGES = {"conv_1": "0", "conv_2_dw": "1", "res_2": "1", "dconv_23": "2", "res_3": "3", "dconv_34": "4",
               "res_4": "5", "dconv_45": "6", "res_5": "7", "conv_6sep": "8"}
_MFN_PART = {"conv_sep": "0", "conv_dw": "1", "conv_proj": "2"}
_MFN_LAYER = {"conv2d": "0", "batchnorm": "1", "relu": "2"}


def _split_param(name: str) -> tuple[str, str] | None:
    m = re.fullmatch(r"(.+?)_(weight|bias|gamma|beta|moving_mean|moving_var)", name)
    return (m[1], m[2]) if m else None


def _rename_fresnet(layer: str) -> str | None:
    m = re.fullmatch(r"stage(\d)_unit(\d+)_(\w+)", layer)
    if m and m[3] in _FRESNET_UNIT:
        return f"trunk.stages.{int(m[1]) - 1}.{int(m[2]) - 1}.{_FRESNET_UNIT[m[3]]}"
    return {"conv0": "trunk.stem.0", "bn0": "trunk.stem.1", "relu0": "trunk.stem.2", "bn1": "head.layers.0",
            "pre_fc1": "head.layers.3", "fc1": "head.layers.4"}.get(layer)


def _rename_mfn(layer: str) -> str | None:
    m = re.fullmatch(r"(conv_1|conv_2_dw|conv_6sep)_(conv2d|batchnorm|relu)", layer)
    if m:
        return f"trunk.layers.{_MFN_STAGES[m[1]]}.{_MFN_LAYER[m[2]]}"
    m = re.fullmatch(r"(dconv_\d\d)_(conv_sep|conv_dw|conv_proj)_(conv2d|batchnorm|relu)", layer)
    if m:
        return f"trunk.layers.{_MFN_STAGES[m[1]]}.layers.{_MFN_PART[m[2]]}.{_MFN_LAYER[m[3]]}"
    m = re.fullmatch(r"(res_\d)_block(\d+)_(conv_sep|conv_dw|conv_proj)_(conv2d|batchnorm|relu)", layer)
    if m:
        return f"trunk.layers.{_MFN_STAGES[m[1]]}.{m[2]}.layers.{_MFN_PART[m[3]]}.{_MFN_LAYER[m[4]]}"
    m = re.fullmatch(r"conv_6dw7_7_(conv2d|batchnorm)", layer)
    if m:
        return f"head.layers.{_MFN_LAYER[m[1]]}"
    return {"pre_fc1": "head.layers.3", "fc1": "head.layers.4"}.get(layer)


def from_mxnet(arg_params: Mapping[str, Any], aux_params: Mapping[str, Any], nodes: list[Mapping[str, Any]], *,
               image_size: tuple[int, int] | None = None) -> Imported:
    """Build our backbone from a 2018 InsightFace MXNet checkpoint (see the module docstring).

    ``arg_params`` / ``aux_params``: name (without ``arg:``/``aux:``) -> array; ``nodes``: the ``nodes``
    list of ``-symbol.json``. The symbol must end in the embedding (``fc1``); a classifier beyond it
    (``fc7``) is ignored.
    """
    params = {k: _tensor(v) for k, v in {**arg_params, **aux_params}.items()}
    params = {k: v for k, v in params.items() if not k.startswith("fc7")}  # the training classifier
    prelu = any(n.get("op") == "LeakyReLU" and _attrs(n).get("act_type", "leaky") == "prelu" for n in nodes)
    act = "prelu" if prelu else "relu"
    if "conv0_weight" in params and "stage1_unit1_conv1_weight" in params:
        units = tuple(_count(params, rf"stage{s}_unit(\d+)_") - 1 for s in (1, 2, 3, 4))
        if "stage1_unit1_bn3_gamma" not in params or "stage1_unit1_bn1_gamma" not in params:
            raise ValueError("MXNet ResNet: only LResNet-E-IR units (fresnet version_unit 3: bn1-conv1-bn2-relu1-conv2-bn3) "
                             "are covered; stage1_unit1_bn1/bn3 not found")
        bottleneck = "stage1_unit1_conv3_weight" in params
        # r49 and r50 share one table in fresnet.py: the name people use is r50
        depth = max((d for d, u in RESNET_UNITS.items() if u == units and (d >= 101) == bottleneck), default=None)
        if depth is None or bottleneck:
            raise ValueError(f"MXNet fresnet with units per stage {units}{' (bottleneck)' if bottleneck else ''} "
                             f"is not a covered LResNet-E-IR depth (basic-unit depths: "
                             f"{', '.join(str(d) for d, u in RESNET_UNITS.items() if d < 101)})")
        if "pre_fc1_weight" not in params or "fc1_beta" not in params or "bn1_gamma" not in params:
            raise ValueError(f"MXNet r{depth}: only embedding output E (bn1 -> dropout -> pre_fc1 -> fc1) is covered; "
                             f"found {_first(k for k in params if not k.startswith('stage'))}")
        emb, flat = params["pre_fc1_weight"].shape
        channels = params["bn1_gamma"].shape[0]
        what = f"MXNet LResNet{depth}E-IR"
        size = _image_size(None, flat // channels, image_size, what)
        version_input = 0 if params["conv0_weight"].shape[-1] == 7 else 1
        args = {"network": f"r{depth}", "emb_size": int(emb), "image_size": list(size), "version_unit": 3,
                "version_input": version_input, "version_se": int("stage1_unit1_se_conv1_weight" in params),
                "version_act": act, "version_output": "E"}
        rename, arch = _rename_fresnet, f"LResNet{depth}E-IR"
    elif "conv_1_conv2d_weight" in params and "conv_6sep_conv2d_weight" in params:
        first = _count(params, r"res_2_block(\d+)_") or 1
        blocks = (first, _count(params, r"res_3_block(\d+)_"), _count(params, r"res_4_block(\d+)_"),
                  _count(params, r"res_5_block(\d+)_"))
        if "conv_6dw7_7_conv2d_weight" not in params or "pre_fc1_weight" not in params:
            raise ValueError("MXNet MobileFaceNet: only the GDC output (conv_6dw7_7 -> pre_fc1 -> fc1) is covered")
        emb = params["pre_fc1_weight"].shape[0]
        kh, kw = params["conv_6dw7_7_conv2d_weight"].shape[2:]
        code = {(1, 4, 6, 2): "y1", (2, 8, 16, 4): "y2"}.get(blocks, "y1")
        what = f"MXNet MobileFaceNet (blocks {blocks})"
        size = _image_size((kh, kw), None, image_size, what)
        args = {"network": code, "emb_size": int(emb), "image_size": list(size), "version_act": act,
                "version_output": "GDC", "variant": "mxnet", "blocks": list(blocks)}
        rename, arch = _rename_mfn, f"MobileFaceNet{list(blocks)}"
    else:
        raise ValueError("not a covered InsightFace MXNet network (no conv0 + stage1_unit1 of fresnet, no conv_1 + "
                         f"conv_6sep of fmobilefacenet; parameters: {_first(params)})")
    state, unknown, layer_of = {}, [], {}
    for name, value in params.items():
        split = _split_param(name)
        target = rename(split[0]) if split else None
        if target is None:
            unknown.append(name)
            continue
        layer_of[target] = split[0]
        state[f"{target}.{_MXNET_PARAM[split[1]]}"] = value
    if unknown:
        raise ValueError(f"{what}: unexpected parameters {_first(unknown)}")
    model = _build(args, what)
    # BatchNorm settings from the symbol: eps per node, fix_gamma -> scale 1.
    bn_nodes = {n.get("name"): _attrs(n) for n in nodes if n.get("op") == "BatchNorm"}
    modules = dict(model.named_modules())
    fixed = 0
    for target, layer in layer_of.items():
        module = modules.get(target)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or layer not in bn_nodes:
            continue
        attrs = bn_nodes[layer]
        module.eps = float(attrs.get("eps", MXNET_BN_EPS_DEFAULT))
        if _flag(attrs.get("fix_gamma"), True):
            state[f"{target}.weight"] = torch.ones(module.weight.shape)
            fixed += 1
        elif isinstance(module, FixedGammaBatchNorm1d):
            raise ValueError(f"{what}: BatchNorm {layer} learns its scale (fix_gamma False); ours keeps it at 1")
    _check_cells(model, state, "head.layers.3.weight" if args.get("version_output") == "E" else None,
                 {k: f"{layer_of.get(k.rsplit('.', 1)[0], k)}_{k.rsplit('.', 1)[1]}" for k in state}, what)
    _load_exact(model, state, what, optional=("num_batches_tracked",),
                names={k: f"{layer_of.get(k.rsplit('.', 1)[0], k)}_{k.rsplit('.', 1)[1]}" for k in state})
    model.eval()
    conversion = (f"MXNet {arch} ({len(params)} arrays) -> {args['network']}"
                  f"{' variant mxnet' if args.get('variant') else ''}; BN eps from the symbol, {fixed} fix_gamma BN(s) "
                  f"at scale 1")
    return Imported(model, args, "mxnet", arch, conversion)

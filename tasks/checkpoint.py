"""Training checkpoints: one ``.pt`` file (``torch.save`` zip format, loadable with ``weights_only=True``)
that rebuilds the embedding network on its own and lets a run continue exactly.

Contents (a dict; every tensor on the CPU):

* ``format`` / ``version``: ``"facepipe-train-checkpoint"`` / 1.
* ``meta``: ``network``, ``emb_size``, ``image_size`` ``[H, W]``, ``normalize``, ``backbone_args`` (the
  keyword arguments of ``models.get_backbone``), ``loss``, ``num_classes``, ``step``, ``epoch``,
  ``world_size`` (ranks that wrote it), ``val`` (last verification metrics), ``torch`` version.
* ``backbone``: the network's ``state_dict``.
* ``head``: classifier losses only: ``{"weight": (C, emb) float32, "bias": (C,) or None, "margin": buffers}``,
  the Partial FC shards of all ranks gathered into full tensors, so any number of ranks can resume.
* ``optimizer``: ``torch.optim`` state dict whose Partial FC entries are full ``(C, ...)`` tensors too;
  ``sharded`` maps their parameter index to C so that loading re-shards them for the new world size.
* ``scheduler``, ``scaler``: their ``state_dict`` (scaler None without fp16).
* ``progress``: ``step``, ``epoch``, ``sampler`` (``epoch``, ``consumed`` = items or batches handed out
  to all ranks in the epoch), ``best`` (value, step, target), ``saves`` (``model-NNNN.pt`` counter).
* ``rng``: one entry per rank: python ``random``, numpy legacy ``MT19937``, torch CPU and CUDA states.
* ``config``: the full :class:`tasks.training.config.TrainConfig` as a dict.
* ``whitening`` (``whiten_trunk`` runs only): ``{"mean": (D,), "proj": (D, k)}`` float32, the PCA
  whitening of the trunk's features on the training images (:mod:`models.whitening`); :func:`load_embedder`
  then returns the backbone with this branch, ``meta["emb_size"]`` = backbone's + k.

:func:`load_embedder` is what other stages use (merge de-duplication, evaluation, export, ``pretrained``).
It also takes published models (:func:`load_embedder` docstring): an arcface_torch ``backbone.pth``
state dict and a 2018 InsightFace MXNet checkpoint (``prefix,epoch`` / ``prefix-NNNN.params`` /
``prefix-symbol.json``), converted onto our backbones by :mod:`models.published`. Every torch file is
read with ``torch.load(weights_only=True)``: a pickle that would import or call anything else is
refused (:func:`safe_torch_load`) before any of it runs.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from datasets.atomic import atomic_paths
from datasets.errors import FormatError, UnsafePickleError
from datasets.hashing import sha256_file
from datasets.mxnet_params import MXNetCheckpoint, read_params, read_symbol, resolve_mxnet_checkpoint
from models.backbone import Backbone, get_backbone
from models.partial_fc import gather_shards, shard_bounds
from models.whitening import Whitening, WhitenedTrunkEmbedding
from models.published import Imported, from_arcface_torch, from_mxnet, is_arcface_torch_state, mxnet_normalization

__all__ = ["FORMAT", "VERSION", "resolve_checkpoint", "save_checkpoint", "copy_checkpoint", "link_checkpoint", "read_checkpoint",
           "build_backbone", "load_embedder", "check_same_network", "gather_optimizer_state", "safe_torch_load",
           "model_files", "model_files_digest", "model_source_kind", "MODEL_KINDS", "load_published_into",
           "shard_optimizer_state", "rng_state", "set_rng_state"]

FORMAT = "facepipe-train-checkpoint"
VERSION = 1
_PREFIX_EPOCH = re.compile(r"^(?P<prefix>.+),(?P<epoch>\d+)$")


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A checkpoint path from a path or the seeds' ``"prefix,epoch"`` form (``prefix-0001.pt``).

    Raises ``FileNotFoundError`` naming what was looked for; a ``.params`` file of MXNet is refused
    with a clear message (MXNet weights are not readable here).
    """
    text = os.fspath(spec)
    match = _PREFIX_EPOCH.match(text)
    if match and not Path(text).exists():
        prefix, epoch = match["prefix"], int(match["epoch"])
        path = Path(f"{prefix}-{epoch:04d}.pt")
        mxnet = Path(f"{prefix}-{epoch:04d}.params")
        if not path.exists() and mxnet.exists():
            raise FormatError(mxnet, "is an MXNet checkpoint", "a facepipe checkpoint (.pt); MXNet weights cannot be read here")
        if not path.exists():
            raise FileNotFoundError(f"checkpoint {text!r}: {path} does not exist")
        return path
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return path


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_paths(path) as (tmp,):
        torch.save(state, tmp)
    return Path(path)


def copy_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Make ``target`` an independent copy of ``source`` (its own file, not a hard link: damage to
    one never reaches the other), written atomically."""
    import shutil

    with atomic_paths(target) as (tmp,):
        shutil.copyfile(source, tmp)
    return Path(target)


#: The former name (it used to hard-link); now makes an independent copy.
link_checkpoint = copy_checkpoint


#: The global named in torch's weights-only refusal ("... GLOBAL posix.system whose module ...",
#: "Unsupported global: GLOBAL datetime.datetime was not ...").
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
#: Lines of torch's load errors that give advice (disable weights_only, allow-list globals, docs).
_ADVICE = re.compile(r"weights_only|trusted source|trust the source|add_safe_globals|documentation", re.IGNORECASE)


def _load_error_detail(exc: Exception) -> str:
    """One line from a ``torch.load`` error: the first that states what is wrong, not torch's advice."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    facts = [line for line in lines if not _ADVICE.search(line)] or lines
    return (facts[0].split(". ")[0] if facts else type(exc).__name__)[:300]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint dict onto the CPU (memory-mapped, ``weights_only``); ``FormatError`` if it is not one."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # zip/pickle errors of a file that is not a torch checkpoint
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise UnsafePickleError(path, f"refused: its pickle asks for the global {refused[1]}, which weights-only "
                                          "loading does not allow (nothing was executed)",
                                    "a file written by tasks.training.trainer") from None
        raise FormatError(path, f"cannot be read as a torch checkpoint ({_load_error_detail(exc)})",
                          "a file written by tasks.training.trainer") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise FormatError(path, f"format {found!r}", f"a facepipe training checkpoint (format {FORMAT!r})")
    if int(state.get("version", 0)) > VERSION:
        raise FormatError(path, f"checkpoint version {state.get('version')}", f"version <= {VERSION} (newer facepipe?)")
    for key in ("meta", "backbone"):
        if key not in state:
            raise FormatError(path, f"no {key!r} entry", "meta and backbone entries")
    return state


def build_backbone(backbone_args: dict[str, Any]) -> Backbone:
    """``models.get_backbone(**backbone_args)``; ``network`` is one of the arguments."""
    args = dict(backbone_args)
    network = args.pop("network")
    return get_backbone(network, **args)


def _describe(network: str, emb_size: int, image_size) -> str:
    h, w = image_size
    return f"network {network} with emb_size {emb_size} at {h}x{w}"


def check_same_network(meta: dict[str, Any], model: Backbone, path: str | os.PathLike, purpose: str) -> None:
    """Raise ``ValueError`` naming both networks when a checkpoint's network differs from ``model``'s."""
    saved = (meta["network"], int(meta["emb_size"]), tuple(meta["image_size"]))
    ours = (model.network, int(model.emb_size), tuple(model.image_size))
    if saved != ours:
        raise ValueError(f"{path}: cannot {purpose}: the checkpoint holds {_describe(*saved)}, "
                         f"this run builds {_describe(*ours)}")


def load_backbone_weights(model: Backbone, state: dict[str, Any], path: str | os.PathLike, purpose: str) -> None:
    """Copy a checkpoint's backbone weights into ``model`` (same code and size required)."""
    check_same_network(state["meta"], model, path, purpose)
    try:
        model.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        saved = state["meta"].get("backbone_args")
        raise ValueError(f"{path}: cannot {purpose}: its backbone was built with {saved}, which does not fit "
                         f"this run's backbone ({str(exc).splitlines()[0]})") from None


MODEL_KINDS = ("checkpoint", "arcface_torch", "mxnet")
_NORMALIZATIONS = {(127.5, 0.0078125): "mxnet", (127.5, 1.0 / 127.5): "arcface"}


def safe_torch_load(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a file whose pickle would import or call anything
    but tensors and plain containers is refused with a ``FormatError`` (nothing of it runs)."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - zip/pickle errors and the weights_only refusal
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise UnsafePickleError(path, f"refused: its pickle asks for the global {refused[1]}, which weights-only "
                                          "loading does not allow (nothing was executed)",
                                    "a torch.save file of tensors") from None
        raise FormatError(path, f"cannot be read as a torch file ({_load_error_detail(exc)})", "a torch.save file") from None


def model_files(spec: str | os.PathLike) -> list[Path]:
    """The files that hold the model named by ``spec``: one ``.pt``/``.pth``/``.onnx`` file, or an MXNet
    checkpoint's ``-symbol.json`` and ``.params``. Raises ``FileNotFoundError`` naming what is missing."""
    mx = resolve_mxnet_checkpoint(spec)
    if mx is not None:
        return mx.files
    return [resolve_checkpoint(spec)]


def model_files_digest(spec: str | os.PathLike) -> str:
    """sha256 of the model file; for an MXNet checkpoint, sha256 of its two files' sha256 in order."""
    files = model_files(spec)
    if len(files) == 1:
        return sha256_file(files[0])
    import hashlib

    return hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()


def model_source_kind(spec: str | os.PathLike) -> str | None:
    """``"mxnet"`` for an MXNet checkpoint spelling, ``"onnx"`` for ``*.onnx``, None otherwise (a torch file)."""
    text = os.fspath(spec)
    if text.lower().endswith(".onnx"):
        return "onnx"
    try:
        return "mxnet" if resolve_mxnet_checkpoint(text) is not None else None
    except FileNotFoundError:
        return "mxnet"


def _imported_meta(imported: Imported, normalize: str) -> dict[str, Any]:
    args = imported.backbone_args
    return {"network": args["network"], "emb_size": imported.model.emb_size, "image_size": list(imported.model.image_size),
            "normalize": normalize, "backbone_args": dict(args), "step": None, "source": imported.source,
            "architecture": imported.architecture, "conversion": imported.conversion}


def _load_mxnet(ckpt: MXNetCheckpoint, image_size) -> tuple[nn.Module, dict[str, Any]]:
    nodes = read_symbol(ckpt.symbol)
    args, aux = read_params(ckpt.params)
    norm = mxnet_normalization(nodes)
    normalize = _NORMALIZATIONS.get(norm) if norm else None
    if normalize is None:
        raise FormatError(ckpt.symbol, f"input normalisation {'(x - %g) * %g' % norm if norm else 'none in the graph'}",
                          "(x - 127.5) * 0.0078125 (_minusscalar0 / _mulscalar0) as InsightFace's 2018 symbols")
    try:
        imported = from_mxnet(args, aux, nodes, image_size=image_size)
    except ValueError as exc:
        raise FormatError(ckpt.params, str(exc)) from None
    meta = _imported_meta(imported, normalize)
    meta["conversion"] += f"; input (x - 127.5) * 0.0078125 from {ckpt.symbol.name} -> normalize {normalize}"
    return imported.model, meta


def _unwrap_state_dict(state: Any) -> Any:
    """A state dict nested as ``{"state_dict": ...}`` / ``{"model": ...}`` / ``{"backbone": ...}`` (common wrappers)."""
    if isinstance(state, dict) and not is_arcface_torch_state(state):
        for key in ("state_dict", "model", "backbone", "model_state_dict"):
            inner = state.get(key)
            if is_arcface_torch_state(inner):
                return inner
    return state


def load_embedder(path: str | os.PathLike, *, image_size: tuple[int, int] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The embedding network of a model file, in eval mode on the CPU, and its ``meta``.

    ``path``: a facepipe training checkpoint (``.pt``, or ``"prefix,epoch"`` for ``prefix-NNNN.pt``); an
    arcface_torch ``backbone.pth`` state dict (IResNet ``iresnet18..200``, MobileFaceNet ``mbf``; fp16 or
    fp32); or an InsightFace MXNet checkpoint (``"prefix,epoch"``, ``prefix-NNNN.params`` or
    ``prefix-symbol.json``: LResNet-E-IR ``r18/34/50/100``-style and MobileFaceNet ``y1``). ``image_size``
    is needed only for foreign weights whose last feature map is not square.

    The module maps normalised ``(N, 3, H, W) float32`` (``meta["normalize"]``: ``"arcface"`` =
    ``(x - 127.5) / 127.5``, ``"mxnet"`` = ``(x - 127.5) / 128``, RGB) to raw ``(N, emb_size)``
    embeddings. ``meta`` has at least ``network``, ``emb_size``, ``image_size`` ``[H, W]``,
    ``normalize``, ``backbone_args`` and ``source`` (``facepipe`` / ``arcface_torch`` / ``mxnet``);
    imported models add ``architecture`` and ``conversion`` (one line saying what was converted).
    """
    mx = resolve_mxnet_checkpoint(path)
    if mx is not None:
        return _load_mxnet(mx, image_size)
    path = resolve_checkpoint(path)
    try:
        state = read_checkpoint(path)
    except UnsafePickleError:  # a pickle that would run code: refused, whatever else it holds
        raise
    except FormatError as not_ours:
        try:
            inner = _unwrap_state_dict(safe_torch_load(path))
        except UnsafePickleError:  # a pickle that would run code: say so
            raise
        except FormatError:
            raise not_ours from None
        if not is_arcface_torch_state(inner):
            raise not_ours from None
        try:
            imported = from_arcface_torch(inner, image_size=image_size)
        except ValueError as exc:
            raise FormatError(path, str(exc)) from None
        return imported.model, _imported_meta(imported, "arcface")
    meta = dict(state["meta"])
    try:
        model = build_backbone(meta["backbone_args"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(path, f"meta backbone_args {meta.get('backbone_args')!r} do not build a network ({exc})") from None
    load_backbone_weights(model, state, path, "load the embedding network")
    model.eval()
    meta.setdefault("source", "facepipe")
    if state.get("whitening") is not None:  # whiten_trunk: the backbone and its whitened trunk branch
        try:
            model = WhitenedTrunkEmbedding(model, Whitening.from_state(state["whitening"])).eval()
            with torch.no_grad():  # the whitening must fit this trunk's feature map
                model(torch.zeros(1, 3, *model.image_size))
        except (KeyError, AttributeError, ValueError, RuntimeError) as exc:
            raise FormatError(path, f"its 'whitening' entry does not fit the network ({str(exc).splitlines()[0]})") from None
        meta.update(emb_size=model.emb_size, embedding="backbone + whitened trunk (models/whitening.py)")
    return model, meta


def _bn_eps(model: nn.Module) -> list[float]:
    return [m.eps for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def load_published_into(model: Backbone, spec: str | os.PathLike, purpose: str) -> dict[str, Any] | None:
    """Copy the weights of a published model (arcface_torch ``.pth``, MXNet checkpoint) into ``model``.

    Returns the import's ``meta`` (with ``conversion``), or None when ``spec`` is a facepipe training
    checkpoint (the caller reads it with :func:`read_checkpoint`). Raises ``ValueError`` naming the file,
    the network it holds and the options that would build it when ``model`` is another network.
    """
    if model_source_kind(spec) != "mxnet":
        path = resolve_checkpoint(spec)
        try:
            read_checkpoint(path)
            return None
        except FormatError:
            pass
    (h, w) = model.image_size
    imported, meta = load_embedder(spec, image_size=(h, w))
    theirs = {k: tuple(v.shape) for k, v in imported.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    same = (imported.network == model.network and imported.emb_size == model.emb_size
            and tuple(imported.image_size) == tuple(model.image_size) and theirs == ours
            and _bn_eps(imported) == _bn_eps(model))
    if not same:
        args = meta["backbone_args"]
        options = " ".join(f"{k}={v}" for k, v in args.items() if k in ("network", "emb_size", "image_size", "variant",
                                                                         "version_output", "version_act"))
        raise ValueError(f"{spec}: cannot {purpose}: it holds {meta.get('architecture')} ({meta['source']}: "
                         f"{_describe(imported.network, imported.emb_size, imported.image_size)}"
                         f"{', variant ' + str(args.get('variant')) if args.get('variant') else ''}), this run builds "
                         f"{_describe(model.network, model.emb_size, model.image_size)}"
                         f"{', variant ' + str(model.variant) if model.variant else ''}; set {options}")
    model.load_state_dict(imported.state_dict())
    return meta


# --- optimizer state with Partial FC shards -------------------------------------------------------------------

def _param_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """``id(param) -> index`` in the numbering of ``optimizer.state_dict()``."""
    order = [p for group in optimizer.param_groups for p in group["params"]]
    return {id(p): i for i, p in enumerate(order)}


def gather_optimizer_state(optimizer: torch.optim.Optimizer, sharded: dict[nn.Parameter, int],
                           group=None) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded parameter's per-row state gathered to ``(C, ...)``.

    ``sharded``: Partial FC parameters -> number of classes C. Collective when torch.distributed is
    initialised (every rank must call it); the result is meaningful on every rank.
    """
    state = optimizer.state_dict()
    index = _param_index(optimizer)
    out_state: dict[int, dict[str, Any]] = {}
    for i, entry in state["state"].items():
        out_state[i] = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}
    marks: dict[int, int] = {}
    for param, num_classes in sharded.items():
        i = index[id(param)]
        marks[i] = num_classes
        rows = param.shape[0]
        entry = state["state"].get(i, {})
        for key in sorted(entry):
            value = entry[key]
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                out_state[i][key] = gather_shards(value, num_classes, group).cpu()
    return {"state": out_state, "param_groups": state["param_groups"], "sharded": marks}


def shard_optimizer_state(saved: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The inverse of :func:`gather_optimizer_state` for ``rank`` of ``world_size``: a loadable state dict."""
    marks = {int(k): int(v) for k, v in saved.get("sharded", {}).items()}
    state: dict[int, dict[str, Any]] = {}
    for i, entry in saved["state"].items():
        i = int(i)
        entry = dict(entry)
        if i in marks:
            start, stop = shard_bounds(marks[i], rank, world_size)
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == marks[i]:
                    entry[key] = value[start:stop].clone()
        state[i] = entry
    return {"state": state, "param_groups": saved["param_groups"]}


# --- random states -----------------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """This process's python, numpy (legacy global), torch CPU and CUDA generator states (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only for devices that exist)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss_value)))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for device, value in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(value, device)


def all_rng_states(world_size: int) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (collective when distributed)."""
    mine = rng_state()
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return gathered

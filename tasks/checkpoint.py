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

:func:`load_embedder` is what other stages use (merge de-duplication, evaluation, export).
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
from models.backbone import Backbone, get_backbone
from models.partial_fc import gather_shards, shard_bounds

__all__ = ["FORMAT", "VERSION", "resolve_checkpoint", "save_checkpoint", "copy_checkpoint", "link_checkpoint", "read_checkpoint",
           "build_backbone", "load_embedder", "check_same_network", "gather_optimizer_state",
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


def load_embedder(path: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    """The embedding network of a checkpoint, in eval mode on the CPU, and its ``meta``.

    The module maps normalised ``(N, 3, H, W) float32`` (``meta["normalize"]``: ``"arcface"`` =
    ``(x - 127.5) / 127.5``, ``"mxnet"`` = ``(x - 127.5) / 128``, RGB) to raw ``(N, emb_size)``
    embeddings. ``meta`` has at least ``network``, ``emb_size``, ``image_size`` ``[H, W]``,
    ``normalize`` and ``backbone_args``.
    """
    path = resolve_checkpoint(path)
    state = read_checkpoint(path)
    meta = dict(state["meta"])
    try:
        model = build_backbone(meta["backbone_args"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FormatError(path, f"meta backbone_args {meta.get('backbone_args')!r} do not build a network ({exc})") from None
    load_backbone_weights(model, state, path, "load the embedding network")
    model.eval()
    return model, meta


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

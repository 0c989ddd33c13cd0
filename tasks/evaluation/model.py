"""The embedding model an evaluation stage runs: a training checkpoint, an ONNX export or a torch module.

:func:`model_digest` identifies the model without loading it (sha256 of the file; for an in-memory
module, of its class and weights), so a stage can find its outputs up to date before paying for
the load. :func:`load_eval_model` loads it and states what the stages need to know: input size
``(H, W)``, input normalisation (``"arcface"`` = ``(x - 127.5) / 127.5``, ``"mxnet"`` =
``(x - 127.5) / 128``), network code and embedding size where the file says so.

Files: ``*.onnx`` -> :class:`tasks.evaluation.embed.OnnxEmbedder`; a ``torch.save`` file (zip or pickle) ->
``tasks.checkpoint.load_embedder(path) -> (module in eval mode, meta)`` (meta: ``network``,
``emb_size``, ``image_size``, ``normalize``), imported only when needed; anything else raises
:class:`~datasets.errors.FormatError` naming the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from datasets.errors import FormatError
from datasets.hashing import sha256_file
from datasets.image_size import parse_image_size
from datasets.normalization import Normalization
from tasks.evaluation.config import ExtractionConfig
from tasks.evaluation.embed import EmbeddingResult, OnnxEmbedder, extract_embeddings

__all__ = ["ExtractionConfig", "EvalModel", "ModelSource", "model_digest", "load_eval_model", "rows_table"]

ModelSource = str | os.PathLike | nn.Module
DEFAULT_IMAGE_SIZE = (112, 112)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"


@dataclasses.dataclass(frozen=True)
class EvalModel:
    """A loaded embedding model. ``embedder`` maps normalised ``(B, 3, H, W)`` float32 to ``(B, D)`` raw
    embeddings; ``digest`` is :func:`model_digest`; ``name`` the file name (or module class)."""

    embedder: Callable[[Any], Any]
    name: str
    digest: str
    kind: Literal["checkpoint", "onnx", "module"]
    image_size: tuple[int, int]
    normalize: Normalization
    network: str | None
    emb_size: int | None

    def embed(
        self, images: np.ndarray | Iterable[np.ndarray], cfg: ExtractionConfig,
    ) -> EmbeddingResult:
        """Flip-fused embeddings of ``(N, H, W, 3)`` uint8 RGB images (or an iterable of such batches)."""
        module = isinstance(self.embedder, nn.Module)
        amp = torch.bfloat16 if cfg.precision == "bf16" and module else None
        return extract_embeddings(self.embedder, images, batch_size=cfg.batch_size, flip=cfg.flip,
                                  device=cfg.device if module else "auto", normalize=self.normalize, amp_dtype=amp)

    def describe(self) -> dict[str, Any]:
        """Scalars for a metrics row."""
        return {"model": self.name, "model_sha256": self.digest, "model_kind": self.kind, "network": self.network,
                "emb_size": self.emb_size, "image_size": f"{self.image_size[0]}x{self.image_size[1]}",
                "normalize": self.normalize}


#: Types of the :meth:`EvalModel.describe` columns, so that tables of several models concatenate.
DESCRIBE_TYPES: dict[str, pa.DataType] = {
    "model": pa.string(), "model_sha256": pa.string(), "model_kind": pa.string(), "network": pa.string(),
    "emb_size": pa.int64(), "image_size": pa.string(), "normalize": pa.string(),
}


def rows_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Metric rows as an Arrow table whose column types do not depend on the values: the
    :data:`DESCRIBE_TYPES` columns keep their types, other all-null columns (TAR@FAR of a small set)
    become float64."""
    table = pa.Table.from_pylist([dict(r) for r in rows])
    for i, field in enumerate(table.schema):
        wanted = DESCRIBE_TYPES.get(field.name, pa.float64() if pa.types.is_null(field.type) else None)
        if wanted is not None and field.type != wanted:
            table = table.set_column(i, field.name, table.column(i).cast(wanted))
    return table


def _module_digest(module: nn.Module) -> str:
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_digest(model: ModelSource) -> str:
    """sha256 of the model file, or of an ``nn.Module``'s class name and weights."""
    if isinstance(model, nn.Module):
        return _module_digest(model)
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: embedding model not found (expected a .onnx file or a training checkpoint)")
    return sha256_file(path)


def _file_kind(path: Path) -> Literal["onnx", "checkpoint", "unknown"]:
    if path.suffix.lower() == ".onnx":
        return "onnx"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(_ZIP_MAGIC) or head.startswith(_PICKLE_PROTO):
        return "checkpoint"
    return "unknown"


def _load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    try:
        from tasks.checkpoint import load_embedder
    except ImportError as exc:
        raise ValueError(f"{path}: a torch.save file, but this build cannot load training checkpoints ({exc})") from exc
    try:
        loaded = load_embedder(path)
    except (FormatError, ValueError, FileNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for foreign files
        raise FormatError(path, f"not a loadable training checkpoint ({type(exc).__name__}: {exc})",
                          "a checkpoint written by tasks.checkpoint or a .onnx file") from exc
    module, meta = loaded
    return module, dict(meta or {})


def _onnx_shape(embedder: OnnxEmbedder) -> tuple[tuple[int, int] | None, int | None]:
    in_shape = embedder.session.get_inputs()[0].shape
    out_shape = embedder.session.get_outputs()[0].shape
    size = tuple(in_shape[2:4]) if all(isinstance(v, int) and v > 0 for v in in_shape[2:4]) else None
    emb = out_shape[1] if len(out_shape) == 2 and isinstance(out_shape[1], int) else None
    return size, emb  # type: ignore[return-value]


def _size(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        return tuple(parse_image_size(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: image_size {value!r} is not (height, width) ({exc})") from None


def load_eval_model(model: ModelSource, cfg: ExtractionConfig | None = None, *, digest: str | None = None) -> EvalModel:
    """Load ``model`` (a checkpoint or ``.onnx`` path, or an ``nn.Module``) and check it against ``cfg``.

    Raises ``ValueError`` naming the file and both values when the model's network code or input size
    differs from ``cfg.network`` / ``cfg.image_size``; :class:`FormatError` for a file that is neither
    an ONNX model nor a training checkpoint.
    """
    cfg = cfg or ExtractionConfig()
    meta: dict[str, Any] = {}
    if isinstance(model, nn.Module):
        embedder: Callable[[Any], Any] = model.eval()
        name, kind = type(model).__name__, "module"
        meta = {k: getattr(model, k) for k in ("network", "emb_size", "image_size") if getattr(model, k, None) is not None}
    else:
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: embedding model not found (expected a .onnx file or a training checkpoint)")
        name, file_kind = path.name, _file_kind(path)
        if file_kind == "checkpoint":
            embedder, meta = _load_checkpoint(path)
            kind = "checkpoint"
        else:
            try:
                embedder = OnnxEmbedder(path)
            except FormatError as exc:
                if file_kind == "onnx":
                    raise
                raise FormatError(path, "neither an ONNX model nor a training checkpoint",
                                  "a .onnx file or a torch.save checkpoint written by tasks.checkpoint") from exc
            kind = "onnx"
            size, emb = _onnx_shape(embedder)
            meta = {k: v for k, v in (("image_size", size), ("emb_size", emb)) if v is not None}
    where = name if isinstance(model, nn.Module) else str(Path(model))
    network = meta.get("network")
    if cfg.network and network and str(network).lower() != cfg.network.lower():
        raise ValueError(f"{where}: the {kind} holds network {network!r} (emb {meta.get('emb_size')}), "
                         f"but network {cfg.network!r} was asked for")
    model_size = _size(meta.get("image_size"), where)
    wanted = _size(cfg.image_size, "config")
    if model_size and wanted and model_size != wanted:
        raise ValueError(f"{where}: the {kind} takes {model_size[0]}x{model_size[1]} images, "
                         f"but image_size {wanted[0]}x{wanted[1]} was asked for")
    normalize = cfg.normalize or meta.get("normalize") or "arcface"
    if normalize not in ("arcface", "mxnet"):
        raise ValueError(f"{where}: normalize {normalize!r} is not 'arcface' or 'mxnet'")
    emb_size = meta.get("emb_size")
    return EvalModel(embedder=embedder, name=name, digest=digest or model_digest(model), kind=kind,
                     image_size=model_size or wanted or DEFAULT_IMAGE_SIZE, normalize=normalize,
                     network=str(network) if network else None, emb_size=int(emb_size) if emb_size else None)

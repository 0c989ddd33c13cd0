"""Export the embedding network of a training checkpoint or a published model to ONNX, checked against
torch (no Prefect).

The engine behind the export stage (:mod:`tasks.export`, ``python -m tasks.export``). The ONNX model
has one input ``input`` ``(batch, 3, H, W) float32`` (normalised as the checkpoint's ``normalize``
says, RGB) and one output ``embedding`` ``(batch, emb_size) float32`` (raw, not L2-normalised); the
batch axis is dynamic. Metadata properties record ``network``, ``emb_size``, ``image_size``
(``H,W``), ``normalize``, the checkpoint's ``step``, ``source`` (facepipe, arcface_torch, mxnet) and,
for published models (:func:`tasks.checkpoint.load_embedder`), ``conversion``.

Exporters: ``torchscript`` (``torch.onnx.export(dynamo=False)``) or ``dynamo`` (``torch.export``-based,
opset >= 18, much slower to export); ``auto`` tries TorchScript first and falls back to dynamo. Before
the file is moved into place, onnxruntime runs it on two batch sizes (so the dynamic axis is
exercised) and every L2-normalised output must be within ``atol`` (default 1e-4) of torch's;
otherwise nothing is written and ``ValueError`` names the difference.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from datasets.atomic import atomic_paths
from tasks.checkpoint import load_embedder

__all__ = ["ExportResult", "Exporter", "INPUT", "OUTPUT", "export_onnx", "check_onnx"]

Exporter = Literal["auto", "torchscript", "dynamo"]
INPUT, OUTPUT = "input", "embedding"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str
    opset: int
    max_abs_diff: float
    batch_sizes: tuple[int, ...]
    export_s: float
    meta: dict


def _export_torchscript(model: torch.nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})


def _export_dynamo(model: torch.nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=max(opset, 18), input_names=[INPUT],
                                output_names=[OUTPUT], dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
                                verbose=False)
    program.save(str(path))


def check_onnx(path: str | Path, model: torch.nn.Module, image_size: tuple[int, int],
               batch_sizes: tuple[int, ...] = (2, 5), seed: int = 0) -> float:
    """Largest ``|onnxruntime - torch|`` of the L2-normalised embeddings over random inputs in [-1, 1] of each
    batch size (CPU provider). Normalised, because that is what recognition compares, and because raw
    embeddings of a briefly trained network can be ~1e6 in size, where float32 rounding alone exceeds 1e-4."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for b in batch_sizes:
        x = torch.rand(b, 3, *image_size, generator=gen) * 2 - 1
        with torch.no_grad():
            want = model(x).numpy()
        got = session.run(None, {name: x.numpy()})[0]
        if got.shape != want.shape:
            raise ValueError(f"{path}: ONNX output has shape {got.shape} for a batch of {b}, torch gives {want.shape}")
        got, want = (v.astype(np.float64) / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12) for v in (got, want))
        worst = max(worst, float(np.abs(got - want).max()))
    return worst


def _add_metadata(path: Path, meta: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    h, w = meta["image_size"]
    props = {"network": meta["network"], "emb_size": str(meta["emb_size"]), "image_size": f"{h},{w}",
             "normalize": meta["normalize"], "step": str(meta.get("step") if meta.get("step") is not None else ""),
             "producer": "facepipe tasks.export", "source": meta.get("source", "facepipe")}
    if meta.get("conversion"):
        props["conversion"] = meta["conversion"]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = 17, exporter: Exporter = "auto",
                atol: float = 1e-4) -> ExportResult:
    """Export ``checkpoint``'s embedding network to ``out`` (atomically) and check it with onnxruntime."""
    if opset < 17:
        raise ValueError(f"opset {opset} is too old (expected >= 17)")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter {exporter!r} is not known (expected auto, torchscript or dynamo)")
    model, meta = load_embedder(checkpoint)
    size = tuple(meta["image_size"])
    x = torch.zeros(2, 3, *size)
    started = time.perf_counter()
    out = Path(out)
    with atomic_paths(out) as (tmp,):
        used = exporter
        if exporter in ("auto", "torchscript"):
            try:
                _export_torchscript(model, x, tmp, opset)
                used = "torchscript"
            except Exception as exc:
                if exporter == "torchscript":
                    raise ValueError(f"{checkpoint}: TorchScript ONNX export failed: {exc}") from exc
                used = "dynamo"
        if used == "dynamo":
            _export_dynamo(model, x, tmp, opset)
        export_s = time.perf_counter() - started
        _add_metadata(tmp, meta)
        diff = check_onnx(tmp, model, size)
        if not diff <= atol:
            raise ValueError(f"{checkpoint}: the ONNX model differs from torch by up to {diff:.3g} "
                             f"(allowed {atol:g}); {out} was not written")
    used_opset = opset if used == "torchscript" else max(opset, 18)
    return ExportResult(out, used, used_opset, diff, (2, 5), export_s, meta)

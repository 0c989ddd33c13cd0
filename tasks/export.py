"""Export the embedding network of a training checkpoint to ONNX, checked against torch.

    python -m tasks.export runs/r100/checkpoints/best.pt r100.onnx [--opset 17] [--exporter auto]

The ONNX model has one input ``input`` ``(batch, 3, H, W) float32`` (normalised as the checkpoint's
``normalize`` says, RGB) and one output ``embedding`` ``(batch, emb_size) float32`` (raw, not
L2-normalised); the batch axis is dynamic. Metadata properties record ``network``, ``emb_size``,
``image_size`` (``H,W``), ``normalize`` and the checkpoint's ``step``.

Exporters: ``torchscript`` (``torch.onnx.export(dynamo=False)``: a second or two) or ``dynamo``
(``torch.export``-based, opset >= 18, much slower to export); ``auto`` tries TorchScript first and
falls back to dynamo. Before the file is moved into place, onnxruntime runs it on two batch sizes
(so the dynamic axis is exercised) and every L2-normalised output must be within ``atol`` (default 1e-4) of
torch's; otherwise nothing is written and ``ValueError`` names the difference.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    import sys

    from tasks import cli

    _args = cli.build_parser("export").parse_args()
    from tasks.export import run_command

    sys.exit(cli.execute(run_command, _args))

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from prefect import task
from prefect.cache_policies import NO_CACHE

from datasets.atomic import atomic_paths
from datasets.hashing import sha256_file
from tasks.checkpoint import load_embedder
from tasks import cli
from tasks.runtime import finished, logger
from tasks.stage import code_version, commit_record, current_record, invalidate

__all__ = ["ExportResult", "ExportStageResult", "export_onnx", "check_onnx", "run_export_stage", "export_task", "main"]

STAGE = "export"
MODEL_FILE = "model.onnx"

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
             "normalize": meta["normalize"], "step": str(meta.get("step", "")), "producer": "facepipe tasks.export"}
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


@dataclass(frozen=True)
class ExportStageResult:
    """``<out_dir>/model.onnx`` of a checkpoint; ``skipped`` when it was already exported."""

    path: Path
    checkpoint: str
    max_abs_diff: float
    skipped: bool


def run_export_stage(checkpoint: str | Path, out_dir: str | Path, *, opset: int = 17, force: bool = False) -> ExportStageResult:
    """:func:`export_onnx` into ``<out_dir>/model.onnx``, skipped when ``stage.json`` records the same
    checkpoint (sha256), opset and exporter code."""
    out = Path(out_dir).resolve()
    params = {"opset": opset}
    inputs = {"checkpoint": sha256_file(checkpoint)}
    code = code_version("tasks.export")
    if force:
        invalidate(out)
    else:
        record = current_record(out, STAGE, params, inputs, code)
        if record is not None:
            logger().info("export: %s is up to date", out / MODEL_FILE)
            return ExportStageResult(out / MODEL_FILE, str(checkpoint), float(record.summary["max_abs_diff"]), skipped=True)
    out.mkdir(parents=True, exist_ok=True)
    result = export_onnx(checkpoint, out / MODEL_FILE, opset=opset)
    logger().info("export: %s (%s, opset %d, max |onnxruntime - torch| %.2g)", result.path, result.exporter,
                  result.opset, result.max_abs_diff)
    commit_record(out, STAGE, params, inputs, code, [MODEL_FILE],
                  summary={"max_abs_diff": result.max_abs_diff, "exporter": result.exporter, "checkpoint": str(checkpoint)})
    return ExportStageResult(result.path, str(checkpoint), result.max_abs_diff, skipped=False)


@task(name="export", cache_policy=NO_CACHE)
def export_task(checkpoint: str, out_dir: str, opset: int = 17, force: bool = False) -> ExportStageResult:
    """:func:`run_export_stage`; Skipped when the ONNX file is up to date."""
    return finished(run_export_stage(checkpoint, out_dir, opset=opset, force=force))


def run_command(args: argparse.Namespace) -> int:
    """``facepipe export`` / ``python -m tasks.export`` with parsed arguments."""
    result = export_onnx(cli.existing_model(args.checkpoint), args.out, opset=args.opset, exporter=args.exporter,
                         atol=args.atol)
    summary = asdict(result)
    summary["path"] = str(result.path)
    summary["meta"] = {k: result.meta[k] for k in ("network", "emb_size", "image_size", "normalize", "step")}
    print(json.dumps(summary, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("export", run_command, argv)

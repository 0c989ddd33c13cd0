"""The export stage: a training checkpoint or a published model -> ONNX, checked against torch.

    python -m tasks.export runs/r100/checkpoints/best.pt r100.onnx [--opset 17] [--exporter auto]
    python -m tasks.export ms1mv3_arcface_r50/backbone.pth r50.onnx         # arcface_torch
    python -m tasks.export model-r100-ii/model,0 r100.onnx                  # 2018 MXNet checkpoint

Published models go through :func:`tasks.checkpoint.load_embedder` (the conversion is recorded in the
metadata property ``conversion`` and in the stage's summary).

The export itself (file layout, exporters, the onnxruntime check) is the engine
:mod:`tasks.evaluation.onnx_export` (:func:`export_onnx`, no Prefect); this module adds the stage
record (skip when up to date), the Prefect task and the command line.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    from tasks.cli import run_command_line

    run_command_line("export")

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.checkpoint import model_files_digest
from tasks.evaluation.onnx_export import ExportResult, check_onnx, export_onnx
from tasks import cli
from tasks.runtime import finished, logger
from tasks.stage import code_version, commit_record, current_record, invalidate

__all__ = ["ExportResult", "ExportStageResult", "export_onnx", "check_onnx", "run_export_stage", "export_task", "main"]

STAGE = "export"
MODEL_FILE = "model.onnx"


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
    inputs = {"checkpoint": model_files_digest(checkpoint)}
    code = code_version("tasks.export", "tasks.evaluation.onnx_export")
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
                  summary={"max_abs_diff": result.max_abs_diff, "exporter": result.exporter, "checkpoint": str(checkpoint),
                           "source": result.meta.get("source", "facepipe"), "conversion": result.meta.get("conversion")})
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
    summary["meta"] = {k: result.meta.get(k) for k in ("network", "emb_size", "image_size", "normalize", "step", "source",
                                                       "conversion")}
    print(json.dumps(summary, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("export", run_command, argv)

"""The ``train-and-eval`` flow: a packed training set in; a trained, evaluated and exported model out.

Stages (each a plain function in ``tasks/``, each Skipped in the UI when its inputs and options are
unchanged, each switched off by its parameter):

1. **train** (:mod:`tasks.train`): ``tasks.training.trainer`` in a child process (torchrun when
   ``nproc`` > 1) whose log streams into the run; a finished run with the same options and data is
   Skipped, a stopped or killed one resumes exactly from ``last.pt``.
2. **triplet** (``triplet=true``): fine-tuning of the trained checkpoint with semi-hard triplets.
3. **verification** (:mod:`tasks.verification`): accuracy, VAL@FAR, TAR@FAR and ROC on the ``.bin`` sets.
4. **megaface** (:mod:`tasks.megaface`, when ``megaface`` is given): rank-1 identification
   and TAR@FAR=1e-6 with noise removal.
5. **export** (:mod:`tasks.export`): ``model.onnx``, checked against torch with onnxruntime.

Layout: ``<data_root>/runs/<name>/{train,triplet,verification,megaface,export}/``. Artifacts:
``train-metrics-*``/``train-summary-*`` (training), ``verification-metrics`` and
``verification-roc`` (a table and a ROC plot), ``megaface-metrics``, and ``train-and-eval-summary``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.runs import parameters_from, result_of, validated
from flows.train_params import MegaFaceSpec, TrainAndEvalParams
from tasks.verification import row_text, verification_task
from tasks.export import export_task
from tasks.megaface import megaface_task
from tasks.runtime import logger, publish_markdown
from tasks.training.config import TrainConfig
from tasks.train import train_stage_task

__all__ = ["train_and_eval", "run"]


@task(name="check-inputs", cache_policy=NO_CACHE)
def check_inputs_task(params: TrainAndEvalParams) -> TrainConfig | None:
    """:meth:`TrainAndEvalParams.check_inputs`: fail at once, naming the path or option, on bad input."""
    return params.check_inputs()


def _state(skipped: bool) -> str:
    return "skipped (up to date)" if skipped else "ran"


def _summary_markdown(name: str, rows: list[tuple[str, str, str]]) -> str:
    lines = [f"### train-and-eval `{name}`", "", "| stage | state | result |", "| --- | --- | --- |"]
    lines += [f"| {stage} | {state} | {result} |" for stage, state, result in rows]
    return "\n".join(lines)


def run(p: TrainAndEvalParams) -> dict[str, Any]:
    """The body of :func:`train_and_eval` (call it inside a flow run)."""
    cfg: TrainConfig | None = result_of(check_inputs_task.with_options(task_run_name="check-inputs"), p)
    layout = p.layout(cfg)
    log = logger()
    log.info("train-and-eval %s -> %s", layout.root.name, layout.root)
    rows: list[tuple[str, str, str]] = []
    out: dict[str, Any] = {"run_dir": str(layout.root)}

    if cfg is not None:
        trained = result_of(train_stage_task.with_options(task_run_name="train"), cfg, p.nproc, p.timeout_s, p.force)
        best = trained.best or {}
        rows.append(("train", _state(trained.skipped),
                     f"{cfg.network}/{cfg.loss}, step {trained.step}, best {best.get('target', '-')} "
                     f"{best.get('accuracy', float('nan')):.4f}"))
        model = trained.checkpoint
        if p.triplet:
            tuned = result_of(train_stage_task.with_options(task_run_name="triplet"),
                              p.triplet_config(cfg, trained.checkpoint), p.nproc, p.timeout_s, p.force)
            tbest = tuned.best or {}
            rows.append(("triplet", _state(tuned.skipped),
                         f"step {tuned.step}, best {tbest.get('target', '-')} {tbest.get('accuracy', float('nan')):.4f}"))
            model = tuned.checkpoint
        out["checkpoint"] = model
    else:
        model = str(Path(p.model).resolve())  # type: ignore[arg-type]
        rows.append(("train", "off", f"evaluating {model}"))

    if p.verification:
        targets = p.verification_targets(cfg)
        if targets:
            ver = result_of(verification_task.with_options(task_run_name="verification"), model, targets, str(layout.verification), p.verification_config, p.force)
            rows.append(("verification", _state(ver.skipped), ", ".join(row_text(r) for r in ver.rows)))
            out["verification"] = {r["target"]: r["accuracy"] for r in ver.rows}
            if ver.errors:
                out["verification_errors"] = ver.errors
        else:
            log.warning("verification: no .bin sets in %s and none given in targets; stage left out", p.dataset_dir())
            rows.append(("verification", "off", "no .bin sets"))

    if p.megaface is not None:
        spec: MegaFaceSpec = p.megaface
        mega = result_of(megaface_task.with_options(task_run_name="megaface"), model, spec.probes, spec.distractors, str(layout.megaface), spec.config, p.force)
        rows.append(("megaface", _state(mega.skipped),
                     ", ".join(f"{r['distractors']}: rank-1 {r.get('rank_1', float('nan')):.4f}" for r in mega.rows)))
        out["megaface"] = {int(r["distractors"]): r.get("rank_1") for r in mega.rows}

    if p.export:
        if model.lower().endswith(".onnx"):
            rows.append(("export", "off", "the model is already ONNX"))
        else:
            exported = result_of(export_task.with_options(task_run_name="export"), model, str(layout.export), force=p.force)
            rows.append(("export", _state(exported.skipped), f"`{exported.path}` (max diff {exported.max_abs_diff:.1e})"))
            out["onnx"] = str(exported.path)

    publish_markdown("train-and-eval-summary", _summary_markdown(layout.root.name, rows), description="stages of this run")
    out["stages"] = {stage: state for stage, state, _ in rows}
    log.info("train-and-eval %s: %s", layout.root.name, "; ".join(f"{s} {st}: {r}" for s, st, r in rows))
    return out


def _flow_run_name() -> str:
    """``train-<name>``, or ``train-<dataset>`` when no run name is given (shown in the UI's run list)."""
    from prefect.runtime import flow_run

    params = flow_run.parameters
    label = params.get("name") or Path(str(params.get("dataset", "run"))).name or "run"
    return f"train-{label}"


@flow(name="train-and-eval", flow_run_name=_flow_run_name, log_prints=True)
@parameters_from(TrainAndEvalParams)
def train_and_eval(**values: Any) -> dict[str, Any]:
    """Train a face-recognition model on a packed dataset, fine-tune it with triplets, evaluate it
    (verification .bin sets, MegaFace) and export it to ONNX. Returns the checkpoint, the ONNX path,
    the accuracies and what each stage did. Parameters: :class:`flows.train_params.TrainAndEvalParams`."""
    return run(validated(TrainAndEvalParams, **values))

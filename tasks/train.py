"""The training stage of ``train-and-eval``: :func:`tasks.training.launcher.run_training` made cacheable and resumable.

A run folder (``cfg.output``) belongs to one configuration. :func:`run_train_stage`

* returns the finished run at once (Skipped in the UI) when ``stage.json`` records the same options
  and the same training data (digest of ``train.idx`` and ``property`` plus the size of
  ``train.rec``) and the checkpoints are still there. Code changes alone do not retrain: a week of
  GPU time is not thrown away for an edited log line; ``force`` does;
* resumes exactly (``resume: auto``, ``last.pt``) a run of the same configuration that was stopped,
  killed or timed out;
* refuses, naming the options that differ, a folder that holds a run of *another* configuration;
  with ``force`` that older run is moved aside to ``<output>.replaced-<UTC time>``, never deleted.

Options that do not change what is learned (``num_workers``, ``eval_batch_size``, ``frequent``,
``resume``) are left out of the comparison.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    import sys

    from tasks import cli

    _args = cli.build_parser("train", "python -m tasks.train").parse_args()
    from tasks.training.trainer import run_command

    sys.exit(run_command(_args))

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from datasets.rec_layout import IDX_FILE, PROPERTY_FILE, REC_FILE
from tasks.runtime import finished, in_run, logger
from tasks.stage import commit_record, current_record, invalidate
from tasks.training.config import TrainConfig, load_config
from tasks.training.record import METRICS_FILE
from tasks.training.launcher import CONFIG_FILE, TrainingRun, run_training

__all__ = ["STAGE", "TrainStageResult", "dataset_digest", "run_train_stage", "train_stage_task"]

STAGE = "train"
_NOT_LEARNED = ("num_workers", "eval_batch_size", "frequent", "resume", "on_eval_failure")
GPU_LIMIT = "gpu"


@dataclass
class TrainStageResult:
    """A finished training run: its folder, the checkpoint to evaluate (best, else last) and its best result."""

    output: Path
    checkpoint: str
    step: int
    best: dict[str, Any] | None
    checkpoints: list[str]
    skipped: bool
    wall_s: float = 0.0


def dataset_digest(folder: str | os.PathLike) -> str:
    """Digest of a packed training set: sha256 of ``train.idx`` and ``property``, and ``train.rec``'s size.

    Raises ``FileNotFoundError`` naming the folder and the missing file.
    """
    root = Path(folder)
    h = hashlib.sha256()
    for name in (IDX_FILE, PROPERTY_FILE):
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"{root}: not a packed training set ({name} is missing; expected train.rec, train.idx, property)")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    rec = root / REC_FILE
    if not rec.is_file():
        raise FileNotFoundError(f"{root}: not a packed training set (train.rec is missing)")
    h.update(str(rec.stat().st_size).encode())
    return h.hexdigest()[:32]


def _learned_options(cfg: TrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude=set(_NOT_LEARNED))


def _saved_options(output: Path) -> dict[str, Any] | None:
    path = output / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return _learned_options(load_config(path))
    except (ValueError, FileNotFoundError):
        return {}  # unreadable: treat as another configuration


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _move_aside(output: Path) -> Path:
    target = output.with_name(f"{output.name}.replaced-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    output.rename(target)
    return target


def _result(output: Path, info: dict[str, Any], skipped: bool, wall_s: float = 0.0) -> TrainStageResult:
    checkpoint = info.get("best_checkpoint") or info.get("last_checkpoint")
    if not checkpoint:
        raise ValueError(f"{output}: training finished without a checkpoint (ckpt=0?); train-and-eval needs one "
                         "to evaluate and export: use ckpt 1, 2 or 3")
    return TrainStageResult(output, str(checkpoint), int(info.get("step", 0)), info.get("best"),
                            list(info.get("checkpoints", [])), skipped, wall_s)


def run_train_stage(cfg: TrainConfig, nproc: int = 1, *, timeout_s: float | None = None, force: bool = False,
                    grace_s: float = 30.0) -> TrainStageResult:
    """Train ``cfg`` into ``cfg.output`` unless that run is already finished (see the module docstring)."""
    if not cfg.output:
        raise ValueError("option 'output' is empty: the training stage needs a run folder")
    output = Path(cfg.output).resolve()
    options = _learned_options(cfg)
    inputs = {"dataset": dataset_digest(cfg.dataset)}
    params = {"options": options, "nproc": nproc}
    log = logger()
    if not force:
        record = current_record(output, STAGE, params, inputs, "")
        if record is not None:
            log.info("train: %s is finished with these options and data (step %s); Skipped", output, record.summary.get("step"))
            return _result(output, record.summary, skipped=True)
    saved = _saved_options(output)
    if saved is not None and saved != options:
        if not force:
            changed = _differences(saved, options)
            raise ValueError(f"{output} holds a run with other options ({'; '.join(changed[:6])}); "
                             "give the run another name, or force=true to move that run aside and start over")
        log.warning("train: moved the earlier run with other options to %s", _move_aside(output))
    elif force and output.exists():
        log.warning("train: force: moved the earlier run to %s", _move_aside(output))
    invalidate(output)
    run: TrainingRun = run_training(cfg.model_copy(update={"resume": "auto"}), nproc, timeout_s=timeout_s, grace_s=grace_s,
                                    slot=gpu_slot(cfg.resolve_device()))
    if run.state != "finished":
        raise RuntimeError(f"training in {output} ended in state {run.state!r} at step {run.step}; run again to resume")
    info = {"step": run.step, "best": run.best, "best_checkpoint": run.best_checkpoint,
            "last_checkpoint": run.last_checkpoint, "checkpoints": run.checkpoints}
    result = _result(output, info, skipped=False, wall_s=run.wall_s)
    outputs = sorted({Path(c).resolve().relative_to(output) for c in {result.checkpoint, *run.checkpoints}
                      if Path(c).is_file()})
    if (output / METRICS_FILE).is_file():
        outputs.append(Path(METRICS_FILE))
    commit_record(output, STAGE, params, inputs, "", outputs, summary=info)
    return result


@contextlib.contextmanager
def gpu_slot(device: str) -> Iterator[None]:
    """One slot of the ``gpu`` global concurrency limit (created with limit 1 when missing) while
    training on CUDA inside a Prefect run; nothing otherwise."""
    if device != "cuda" or not in_run():
        yield
        return
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        yield


@task(name="train", cache_policy=NO_CACHE)
def train_stage_task(cfg: TrainConfig, nproc: int = 1, timeout_s: float | None = None, force: bool = False) -> TrainStageResult:
    """:func:`run_train_stage`; Skipped when the run is already finished. Call it directly in the flow
    (not ``.submit``) so that a cancellation reaches the child-stopping ``finally`` on the main thread."""
    return finished(run_train_stage(cfg, nproc, timeout_s=timeout_s, force=force), "training already finished")


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.train`` is the training engine's command (``python -m tasks.training``),
    kept under the stage's name for scripts written before the engine moved."""
    from tasks.training.trainer import main as train_main

    return train_main(argv, prog="python -m tasks.train")



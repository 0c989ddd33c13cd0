"""The training engine: one run of margin-softmax or triplet training, on one process or one rank of
``torchrun``, without Prefect.

    python -m tasks.training --config configs/r100-arcface.yaml --dataset data/ms1m --output runs/r100
    torchrun --standalone --nproc-per-node 8 -m tasks.training --config configs/r100-arcface.yaml ...

Modules: :mod:`~tasks.training.config` (``TrainConfig``, every option with InsightFace's names),
:mod:`~tasks.training.trainer` (the loop, checkpoints, resume), :mod:`~tasks.training.objectives`
(margin heads through Partial FC; triplets), :mod:`~tasks.training.distributed` (the process group),
:mod:`~tasks.training.validation` (``.bin`` targets during training), :mod:`~tasks.training.record`
(metrics.parquet, status.json, TensorBoard), :mod:`~tasks.training.launcher` (a run in a child
process, streamed into the caller's log; what the train stage uses).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.training.config import TrainConfig, load_config, parse_args
    from tasks.training.launcher import TrainingRun, run_training
    from tasks.training.trainer import TrainResult, main, train

# Names are loaded on first use, so that ``tasks.training.config`` imports without torch.
_HOMES = {"TrainConfig": "config", "load_config": "config", "parse_args": "config",
          "TrainingRun": "launcher", "run_training": "launcher",
          "TrainResult": "trainer", "main": "trainer", "train": "trainer"}
__all__ = ["TrainConfig", "TrainResult", "TrainingRun", "load_config", "main", "parse_args", "run_training", "train"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'tasks.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"tasks.training.{_HOMES[name]}"), name)
    globals()[name] = value
    return value

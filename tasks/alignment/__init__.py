"""The alignment engine behind the align stage: MTCNN detection, 5-point similarity alignment and the
stage's manifest, as plain functions (no Prefect).

``plan_align`` -> ``align_shard`` (for each shard, in any process) -> ``finalize_align``;
``run_align`` does all three in this process. :class:`AlignConfig` (:mod:`~tasks.alignment.config`)
is every option. Names are loaded on first use, so ``tasks.alignment.config`` imports without torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.alignment.aligner import (
        DEFAULT_SHARD_SIZE,
        EXTRA_COLUMNS,
        STAGE,
        STATUSES,
        AlignPlan,
        AlignResult,
        AlignShard,
        align_shard,
        aligned_geometry,
        check_up_to_date,
        finalize_align,
        load_plan,
        plan_align,
        run_align,
    )
    from tasks.alignment.config import AlignConfig

__all__ = [
    "AlignConfig", "AlignPlan", "AlignResult", "AlignShard", "DEFAULT_SHARD_SIZE", "EXTRA_COLUMNS", "STAGE",
    "STATUSES", "align_shard", "aligned_geometry", "check_up_to_date", "finalize_align", "load_plan", "plan_align", "run_align",
]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'tasks.alignment' has no attribute {name!r}")
    module = "tasks.alignment.config" if name == "AlignConfig" else "tasks.alignment.aligner"
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

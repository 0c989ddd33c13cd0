"""The alignment engine behind the align stage: MTCNN detection, 5-point similarity alignment and the
stage's manifest, as plain functions (no Prefect).

``plan_align`` -> ``align_shard`` (for each shard, in any process) -> ``finalize_align``;
``run_align`` does all three in this process. :class:`AlignConfig` is every option.
"""
from tasks.alignment.aligner import (
    DEFAULT_SHARD_SIZE,
    EXTRA_COLUMNS,
    STAGE,
    STATUSES,
    AlignConfig,
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

__all__ = [
    "AlignConfig", "AlignPlan", "AlignResult", "AlignShard", "DEFAULT_SHARD_SIZE", "EXTRA_COLUMNS", "STAGE",
    "STATUSES", "align_shard", "aligned_geometry", "check_up_to_date", "finalize_align", "load_plan", "plan_align", "run_align",
]

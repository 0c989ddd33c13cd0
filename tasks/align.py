"""Align stage (UI tasks ``align-plan``, ``align-shard``, ``align-finalize``): the Prefect tasks and
the command line of :mod:`tasks.alignment`, which holds the stage's logic and its file formats.

    python -m tasks.align RAW_DIR OUT_DIR [--image-size 112x112] [--min-face-size 20] ...
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    import sys

    from tasks import cli

    _args = cli.build_parser("align").parse_args()
    from tasks.align import run_command

    sys.exit(cli.execute(run_command, _args))

import argparse
import json
import os

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.states import State

from datasets.manifest import status_counts
from tasks.alignment import (
    DEFAULT_SHARD_SIZE,
    AlignConfig,
    AlignPlan,
    AlignResult,
    AlignShard,
    align_shard,
    check_up_to_date,
    finalize_align,
    plan_align,
    run_align,
)
from tasks import cli
from tasks.runtime import skipped
from tasks.stage import invalidate

# --- Prefect tasks (thin wrappers; a flow maps align_shard_task over the plan's shards) ----------


@task(name="align-plan", cache_policy=NO_CACHE)
def plan_align_task(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: AlignConfig,
                    shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False) -> AlignPlan | State:
    """:func:`plan_align`; when the stage is up to date, a Skipped state carrying the committed
    :class:`AlignResult` instead of the plan."""
    if force:
        invalidate(out_dir)
    plan = plan_align(raw_dir, out_dir, cfg, shard_size=shard_size, force=force)
    done = None if force else check_up_to_date(plan)
    return skipped(done, f"{plan.out_dir}: up to date") if done is not None else plan


@task(name="align-shard", cache_policy=NO_CACHE, task_run_name="align-shard-{shard.name}")
def align_shard_task(plan: AlignPlan, shard: AlignShard, torch_threads: int = 0) -> dict[str, int]:
    """:func:`align_shard` (``plan`` may be :meth:`AlignPlan.for_workers`); returns the shard's
    status counts. ``torch_threads`` > 0 sets torch's intra-op threads of the worker first."""
    if torch_threads > 0:
        import torch

        torch.set_num_threads(torch_threads)
    return status_counts(align_shard(plan, shard))


@task(name="align-finalize", cache_policy=NO_CACHE)
def finalize_align_task(plan: AlignPlan) -> AlignResult:
    return finalize_align(plan)


# --- command line (the parser is generated in tasks.cli from AlignConfig) ------------------------------


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, AlignConfig]:
    """Command-line arguments and the :class:`AlignConfig` they describe."""
    parser = cli.build_parser("align")
    args = parser.parse_args(argv)
    try:
        cfg = cli.config_from_args(args, AlignConfig)
    except ValueError as exc:
        parser.error(str(exc))
    return args, cfg


def run_command(args: argparse.Namespace) -> int:
    """``facepipe align`` / ``python -m tasks.align`` with parsed arguments."""
    cfg = cli.config_from_args(args, AlignConfig)
    result = run_align(args.raw_dir, args.out_dir, cfg, force=args.force, shard_size=args.shard_size)
    if args.json:
        print(json.dumps({**result.__dict__, "out_dir": str(result.out_dir), "manifest_path": str(result.manifest_path)}))
    else:
        state = "up to date (skipped)" if result.skipped else f"{result.processed} files aligned, {result.reused} reused"
        print(f"{result.manifest_path}: {result.files} files, {result.rows} rows; {state}")
        for status, count in result.counts.items():
            print(f"  {status:<11} {count}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("align", run_command, argv)


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
from pydantic import BaseModel

from datasets.manifest import status_counts
from tasks.alignment import (
    DEFAULT_SHARD_SIZE,
    AlignConfig,
    AlignResult,
    AlignShard,
    align_shard,
    check_up_to_date,
    finalize_align,
    load_plan,
    plan_align,
    run_align,
)
from tasks import cli
from tasks.runtime import skipped
from tasks.stage import invalidate

# --- Prefect tasks (thin wrappers; a flow maps align_shard_task over the plan's shards) ----------


class PlannedAlign(BaseModel):
    """What the flow gets back from :func:`plan_align_task`: where the plan lies and its shards'
    names and sizes. The plan itself (every photo) stays in the stage's folder."""

    plan_file: str
    shard_names: list[str]
    shard_files: list[int]

    @property
    def todo_files(self) -> int:
        return sum(self.shard_files)


@task(name="align-plan", cache_policy=NO_CACHE)
def plan_align_task(raw_dir: str | os.PathLike, out_dir: str | os.PathLike, cfg: AlignConfig,
                    shard_size: int = DEFAULT_SHARD_SIZE, force: bool = False) -> PlannedAlign | State:
    """:func:`plan_align`, saved in the stage folder; when the stage is up to date, a Skipped state
    carrying the committed :class:`AlignResult` instead."""
    if force:
        invalidate(out_dir)
    plan = plan_align(raw_dir, out_dir, cfg, shard_size=shard_size, force=force)
    done = None if force else check_up_to_date(plan)
    if done is not None:
        return skipped(done, f"{plan.out_dir}: up to date")
    return PlannedAlign(plan_file=str(plan.save()), shard_names=[s.name for s in plan.shards],
                        shard_files=[len(s.items) for s in plan.shards])


@task(name="align-shard", cache_policy=NO_CACHE, task_run_name="align-shard-{name}")
def align_shard_task(plan_file: str, shard: int, name: str = "", torch_threads: int = 0) -> dict[str, int]:
    """:func:`align_shard` for shard number ``shard`` of the saved plan (``name``: its name, for the
    UI); returns the shard's status counts. ``torch_threads`` > 0 sets torch's intra-op threads of
    the worker first."""
    if torch_threads > 0:
        import torch

        torch.set_num_threads(torch_threads)
    plan = load_plan(plan_file)
    return status_counts(align_shard(plan, plan.shards[shard]))


@task(name="align-finalize", cache_policy=NO_CACHE)
def finalize_align_task(plan_file: str) -> AlignResult:
    return finalize_align(load_plan(plan_file))


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


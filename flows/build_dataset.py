"""The ``build-dataset`` flow: photos and aligned faces in, an InsightFace training set out.

Stages (each a plain function in ``tasks/``, each skipped when its inputs, parameters and code are
unchanged, shown as Skipped in the UI):

1. **align** (:mod:`tasks.align`, engine :mod:`tasks.alignment`): ``raw_dir`` photos are detected (MTCNN) and aligned; every
   ``aligned_dirs`` folder is taken as aligned faces (no detection). Shards of photos are Prefect
   tasks, run by ``task_runner`` in a subflow ``align-<source>``; only new or changed photos are
   processed.
2. **lst** (:mod:`tasks.lst`): ``train.lst`` and ``labels.csv`` (stable labels).
3. **pack** (:mod:`tasks.pack`): ``train.rec``, ``train.idx``, ``property``. With ``lst_file`` (a
   user's ``.lst`` in the InsightFace or the im2rec form) stages 1 and 2 are left out and that list is
   packed (``aligned=0`` lines aligned on their landmarks or cropped from their bbox).
4. **merge** (:mod:`tasks.merge`, when ``merge_with`` or ``merge.exclude`` is given): this set
   and the others merged, relabelled, optionally de-duplicated with an embedding model.
5. **bins** (:mod:`tasks.bins`): one verification ``<name>.bin`` per ``pairs`` entry.
6. **gather** (:mod:`tasks.gather`): ``train.rec``, ``train.idx``, ``property``, ``labels.csv``
   and the ``.bin`` files hard-linked into ``<data_root>/datasets/<name>/``, plus ``dataset.json``:
   the folder a trainer reads.

Layout: ``<data_root>/datasets/<name>/{align/<source>,lst,pack,merge,bins/<set>}/``, each with its
``manifest.parquet`` and ``stage.json``. Artifacts: ``build-dataset-counts`` (rows per stage and
status), a progress bar per detection subflow, ``build-dataset-samples`` (a grid of packed faces)
and ``build-dataset-datasets`` (images, identities and bins of the packed sets).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from datasets.locks import folder_lock
from datasets.rec_layout import read_rec_index
from flows.params import AlignConfig, BuildDatasetParams, DatasetLayout
from flows.runs import make_task_runner, parameters_from, result_of, validated
from tasks.align import PlannedAlign, align_shard_task, finalize_align_task, plan_align_task
from tasks.alignment import AlignResult
from tasks.bins import BinsResult, bins_finalize_task, bins_prepare_task
from tasks.gather import DatasetResult, gather_dataset_task, sample_grid_markdown
from tasks.lst import lst_task
from tasks.merge import merge_task
from tasks.pack import pack_task
from tasks.runtime import Progress, logger, publish_markdown, publish_table

__all__ = ["build_dataset", "align_shards", "build"]


@flow(name="align-shards")
def align_shards(planned: PlannedAlign, torch_threads: int = 0, label: str = "") -> dict[str, int]:
    """Align every shard of a saved plan on this flow's task runner (each task reads the plan from
    the align stage's folder) and update a progress artifact as shards finish. Returns the rows per
    status."""
    progress = Progress(f"build-dataset-align-{label}", total=planned.todo_files, description=f"align {label}: detect + warp")
    futures = [align_shard_task.submit(planned.plan_file, i, name, torch_threads)
               for i, name in enumerate(planned.shard_names)]
    files = {id(f): n for f, n in zip(futures, planned.shard_files)}
    counts: Counter[str] = Counter()
    done, errors = 0, []
    for future in as_completed(futures):
        try:
            counts.update(future.result())
        except Exception as exc:  # noqa: BLE001 - let the other shards finish, then fail
            errors.append(exc)
        done += files[id(future)]
        progress.update(done)
    if errors:
        raise errors[0]
    return dict(counts)


def _torch_threads(p: BuildDatasetParams) -> int:
    if p.task_runner == "dask" and p.dask_address:
        return 0  # a remote cluster's workers keep their own setting
    return max(1, (os.cpu_count() or 1) // p.max_workers)


def _align_source(label: str, raw: Path, out: Path, cfg: AlignConfig, p: BuildDatasetParams) -> AlignResult:
    """Plan, align the shards (subflow on the chosen runner), finalize; or the Skipped result.
    Holds ``out``'s lock throughout (a second run on the folder fails at once: FolderBusy)."""
    with folder_lock(out, "align"):
        return _align_source_locked(label, raw, out, cfg, p)


def _align_source_locked(label: str, raw: Path, out: Path, cfg: AlignConfig, p: BuildDatasetParams) -> AlignResult:
    planned = result_of(plan_align_task.with_options(task_run_name=f"align-plan-{label}"),
                        str(raw), str(out), cfg, p.shard_size, p.force)
    if isinstance(planned, AlignResult):
        return planned
    if planned.shard_names:
        kind = "threads" if cfg.already_aligned else p.task_runner  # copying crops needs no other processes
        runner = make_task_runner(kind, p.max_workers, p.dask_address)
        result_of(align_shards.with_options(task_runner=runner, flow_run_name=f"align-{label}"),
                  planned, _torch_threads(p), label)
    return result_of(finalize_align_task.with_options(task_run_name=f"align-finalize-{label}"), planned.plan_file)


@task(name="check-inputs", cache_policy=NO_CACHE)
def check_inputs_task(params: BuildDatasetParams) -> None:
    """:meth:`BuildDatasetParams.check_inputs`: fail at once, naming the path, on bad input."""
    params.check_inputs()


def _count_rows(stage: str, counts: dict[str, int], skipped: bool) -> list[dict[str, Any]]:
    return [{"stage": stage, "status": status, "count": int(n), "skipped": skipped} for status, n in sorted(counts.items())]


def _dataset_row(name: str, role: str, folder: Path, bins: str = "") -> dict[str, Any]:
    index = read_rec_index(folder)
    prop = index.property
    return {"dataset": name, "role": role, "path": str(folder),
            "images": int(len(index.keys)), "identities": int(len(set(index.labels.tolist()))),
            "num_classes": prop.num_classes if prop else None,
            "image_size": f"{prop.height}x{prop.width}" if prop else "", "bins": bins}


def build(p: BuildDatasetParams) -> dict[str, Any]:
    """The body of :func:`build_dataset` (call it inside a flow run)."""
    result_of(check_inputs_task, p)
    layout: DatasetLayout = p.layout()
    log = logger()
    log.info("build-dataset %s -> %s (task runner %s, %d workers)", p.name, layout.root, p.task_runner, p.max_workers)
    counts: list[dict[str, Any]] = []
    stages: dict[str, str] = {}

    if p.lst_file:  # the user's list is packed as it is: no align or lst stage
        pack = result_of(pack_task, str(Path(p.lst_file).resolve()), str(layout.pack), p.pack, p.force,
                         p.pack_image_size())
    else:
        aligned: dict[str, AlignResult] = {}
        for label, (folder, cfg) in p.sources().items():
            res = _align_source(label, folder, layout.align / label, cfg, p)
            aligned[label] = res
            counts += _count_rows(f"align/{label}", res.counts, res.skipped)
            stages[f"align/{label}"] = "skipped" if res.skipped else "ran"

        lst = result_of(lst_task, {label: str(r.out_dir) for label, r in aligned.items()}, str(layout.lst), p.lst, p.force)
        counts += _count_rows("lst", lst.counts, lst.skipped)
        stages["lst"] = "skipped" if lst.skipped else "ran"

        pack = result_of(pack_task, str(layout.lst), str(layout.pack), p.pack, p.force)
    counts += _count_rows("pack", pack.counts, pack.skipped)
    stages["pack"] = "skipped" if pack.skipped else "ran"
    train_dir = pack.out_dir

    if p.merges():
        others = [str(Path(d).resolve()) for d in p.merge_with]
        order = [str(pack.out_dir), *others] if p.merge_first == "this" else [*others, str(pack.out_dir)]
        merged = result_of(merge_task, order, str(layout.merge), p.merge, p.force)
        counts += _count_rows("merge", merged.counts, merged.skipped)
        stages["merge"] = "skipped" if merged.skipped else "ran"
        train_dir = merged.out_dir

    bins: dict[str, BinsResult] = {}
    for spec in p.pairs:
        with folder_lock(layout.bins / spec.name, "bins"):  # as run_bins: one writer per bins folder
            plan = result_of(bins_prepare_task.with_options(task_run_name=f"bins-prepare-{spec.name}"),
                             spec, str(layout.bins / spec.name), p.align)
            faces = _align_source(f"bins-{spec.name}", plan.inputs_dir, plan.faces_dir, plan.align_cfg, p)
            counts += _count_rows(f"bins/{spec.name}/align", faces.counts, faces.skipped)
            res = result_of(bins_finalize_task, plan, p.force)
        bins[spec.name] = res
        counts += _count_rows(f"bins/{spec.name}", res.counts, res.skipped)
        stages[f"bins/{spec.name}"] = "skipped" if res.skipped else "ran"

    info = {"name": p.name, "train_from": train_dir.name,
            "sources": {label: str(folder) for label, (folder, _cfg) in p.sources().items()},
            **({"lst_file": str(Path(p.lst_file).resolve())} if p.lst_file else {}),
            "merge_with": [str(Path(d).resolve()) for d in p.merge_with]}
    dataset: DatasetResult = result_of(gather_dataset_task, str(layout.root), str(train_dir),
                                       {name: str(r.bin_path) for name, r in bins.items()}, info, p.force)
    stages["gather"] = "skipped" if dataset.skipped else "ran"

    publish_table("build-dataset-counts", counts, description=f"{p.name}: rows per stage and status")
    bins_text = ", ".join(f"{name} ({r.pairs} pairs)" for name, r in bins.items())
    rows = [_dataset_row(p.name, "packed", pack.out_dir)]
    if p.merges():
        rows += [_dataset_row(Path(d).name, "merged in", Path(d).resolve()) for d in p.merge_with]
    rows.append(_dataset_row(p.name, "training set", dataset.out_dir, bins_text))
    publish_table("build-dataset-datasets", rows, description=f"{p.name}: packed datasets")
    publish_markdown("build-dataset-samples", sample_grid_markdown(dataset.out_dir, f"{p.name}: sample aligned faces"),
                     description="first face of identities spread over the training set")
    log.info("build-dataset %s: %d images, %d identities, bins %s in %s", p.name, dataset.info["images"],
             dataset.info["identities"], sorted(bins), dataset.out_dir)
    return {"dataset_dir": str(dataset.out_dir), "images": dataset.info["images"],
            "identities": dataset.info["identities"], "num_classes": dataset.info["num_classes"],
            "bins": {name: r.pairs for name, r in bins.items()}, "stages": stages}


@flow(name="build-dataset", flow_run_name="build-{name}", log_prints=True)
@parameters_from(BuildDatasetParams)
def build_dataset(**values: Any) -> dict[str, Any]:
    """Build the training set <data_root>/datasets/<name>/ (train.rec, train.idx, property,
    labels.csv, <pairs name>.bin, dataset.json) from raw_dir photos and/or aligned_dirs faces.
    Returns counts and what each stage did. Parameters: :class:`flows.params.BuildDatasetParams`."""
    return build(validated(BuildDatasetParams, **values))

"""Verification stage: an embedding model on LFW / CFP-FP / AgeDB-30 style ``.bin`` packs (spec 4).

For each target pack: decode it (:func:`datasets.verification_bin.decode_bin`; an image whose width
is not the model's is resized as InsightFace does, any other size is an error), extract flip-fused
embeddings (:mod:`tasks.evaluation.embed`; CUDA when present, optional bf16), evaluate with the InsightFace
protocol (:mod:`tasks.evaluation.pairs`).

Output (``out_dir``):

* ``verification.parquet``: one row per target, tidy so that runs of several models can be
  concatenated: ``model``, ``model_sha256``, ``target``, ``bin_sha256``, ``images``, ``n_pairs``,
  ``n_same``, ``n_diff``, ``nfolds``, ``accuracy``, ``accuracy_std``, ``threshold_mean`` (squared
  distance), ``val@far=1e-03``, ``val_std``, ``val_far``, ``tar@far=1e-01`` ... ``tar@far=1e-06``
  (null when the set has too few different pairs), ``xnorm`` (mean raw embedding norm), ``seconds``
  (decode + extract + evaluate), ``notes``, ``error``, and the model and extraction settings.
  A target that cannot be evaluated (a missing or malformed pack, images of another size, non-finite
  embeddings, ...) gets its row with ``error`` set and empty metrics; the other targets are evaluated
  as usual (``error`` is empty in their rows). Only when every target fails does the call raise.
  A set with fewer pairs than ``nfolds`` is evaluated with one fold per pair and a note in ``notes``.
* ``verification_roc.parquet``: the ROC over all pairs, one row per point: ``model_sha256``,
  ``target``, ``far``, ``tar``, ``threshold`` (accept iff squared distance <= threshold).
* ``verification_roc.png``: TAR against FAR on a log axis, one curve per target.
* ``stage.json`` last. Its inputs are the model file's sha256 and each pack's sha256, so the same
  model on the same packs with the same settings is Skipped. It is not written when a target failed,
  so the next run tries again.

Folds: the 10-fold protocol splits the pair list into contiguous blocks, as LFW's ``pairs.txt`` is
laid out (10 blocks of 300 same + 300 different pairs). A pack built from a list in another order (a
CSV sorted by person, all same pairs first) gives folds of one kind of pair and a poorly chosen
threshold: ``shuffle_folds`` splits a seeded permutation of the pairs (``fold_seed``) instead.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    from tasks.cli import run_command_line

    run_command_line("evaluate")

import argparse
import base64
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from datasets.atomic import atomic_paths, remove_partials
from datasets.errors import FormatError
from datasets.hashing import sha256_file
from datasets.verification_bin import decode_bin
from tasks.evaluation.config import ExtractionConfig, VerificationConfig
from tasks.evaluation.model import EvalModel, ModelSource, load_eval_model, model_digest, rows_table
from tasks.evaluation.plots import plot_roc
from tasks import cli
from tasks.runtime import Progress, finished, logger, publish_markdown, publish_table
from tasks.stage import code_version, commit_record, current_record, invalidate
from tasks.evaluation.pairs import evaluate_verification, far_key

__all__ = ["STAGE", "METRICS_FILE", "ROC_FILE", "PLOT_FILE", "VerificationConfig", "VerificationStageResult",
           "run_verification", "plot_roc", "metrics_table", "row_text", "verification_task", "main"]

STAGE = "verification"
METRICS_FILE = "verification.parquet"
ROC_FILE = "verification_roc.parquet"
PLOT_FILE = "verification_roc.png"
_CODE_MODULES = ("tasks.verification", "tasks.evaluation.model", "tasks.evaluation.embed", "tasks.evaluation.pairs",
                 "datasets.verification_bin", "datasets.normalization")
_TABLE_COLUMNS = ("target", "accuracy", "accuracy_std", "threshold_mean", "val@far=1e-03", "xnorm", "n_pairs", "seconds",
                  "notes", "error")


@dataclass
class VerificationStageResult:
    """Outcome of :func:`run_verification`: the written files and the metric rows (one per target)."""

    out_dir: Path
    metrics_path: Path
    roc_path: Path
    plot_path: Path
    rows: list[dict[str, Any]]
    skipped: bool

    @property
    def errors(self) -> dict[str, str]:
        """``{target: error message}`` of the targets that could not be evaluated."""
        return {r["target"]: r["error"] for r in self.rows if r.get("error")}

    def summary_lines(self) -> list[str]:
        """InsightFace-style log lines: ``[lfw]XNorm: ... Accuracy-Flip: 0.99500+-0.00300``, or
        ``[lfw]error: ...`` for a target that failed."""
        return [f"[{r['target']}]error: {r['error']}" if r.get("error") else
                f"[{r['target']}]XNorm: {r['xnorm']:f} Accuracy-Flip: {r['accuracy']:1.5f}+-{r['accuracy_std']:1.5f}"
                for r in self.rows]


def row_text(row: Mapping[str, Any]) -> str:
    """``lfw 0.9950`` or ``lfw: error <message>`` for a summary line."""
    if row.get("error"):
        return f"{row['target']}: error {row['error']}"
    return f"{row['target']} {row['accuracy']:.4f}"


def _target_paths(targets: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """``{name: absolute path}``; a name is the pack's file stem unless given."""
    items = list(targets.items()) if isinstance(targets, Mapping) else [(Path(t).stem, t) for t in targets]
    if not items:
        raise ValueError("verification: no target .bin files given")
    out: dict[str, Path] = {}
    for name, target in items:
        path = Path(target).resolve()
        if name in out:
            raise ValueError(f"verification: two targets are named {name!r} ({out[name]} and {path}); pass a mapping name -> path")
        out[name] = path
    return out


def _bin_digest(path: Path) -> str | FormatError:
    """sha256 of a pack, or the error that names it when it is not a file."""
    if not path.is_file():
        return FormatError(path, "verification pack does not exist", "a .bin pickle (lfw.bin, cfp_fp.bin, ...)")
    return sha256_file(path)


#: Types of the metric columns, so that a table whose rows are all errors has the usual schema.
_METRIC_TYPES: dict[str, pa.DataType] = {
    "images": pa.int64(), "n_pairs": pa.int64(), "n_same": pa.int64(), "n_diff": pa.int64(), "nfolds": pa.int64(),
    "notes": pa.string(), "error": pa.string(), "bin_sha256": pa.string(), "flip": pa.bool_(), "precision": pa.string(),
}
_FLOAT_COLUMNS = ("accuracy", "accuracy_std", "threshold_mean", "val@far=1e-03", "val_std", "val_far", "xnorm", "seconds")


def _error_row(model: EvalModel, name: str, digest: str, cfg: VerificationConfig, exc: BaseException) -> dict:
    """The row of a target that could not be evaluated: metrics empty, ``error`` the one-line reason."""
    message = str(exc) if isinstance(exc, (FormatError, ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
    row: dict[str, Any] = {**model.describe(), "target": name, "bin_sha256": digest, "images": None, "n_pairs": None,
                           "n_same": None, "n_diff": None, "nfolds": None, **dict.fromkeys(_FLOAT_COLUMNS)}
    for target in cfg.far_targets:
        row[far_key(float(target))] = None
    row.update({"notes": "", "flip": cfg.flip, "precision": cfg.precision, "error": message.replace("\n", " ")})
    return row


def _metrics_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    table = rows_table([{c: row.get(c) for c in columns} for row in rows])
    for i, field in enumerate(table.schema):
        wanted = _METRIC_TYPES.get(field.name)
        if wanted is not None and field.type != wanted:
            table = table.set_column(i, field.name, table.column(i).cast(wanted))
    return table


def _write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_paths(path) as (tmp,):
        pq.write_table(table, tmp)


def _with_progress(images: np.ndarray, name: str, batch_size: int):
    """``images`` in batches of ``batch_size`` rows, reporting done/total, rate and time left as they are taken."""
    progress = Progress(f"verification-embed-{name}", total=len(images), description=f"verification: embed {name}")
    for start in range(0, len(images), batch_size):
        yield images[start:start + batch_size]
        progress.update(min(start + batch_size, len(images)))


def _evaluate_target(model: EvalModel, name: str, path: Path, digest: str, cfg: VerificationConfig) -> tuple[dict, pa.Table]:
    start = time.perf_counter()
    images, issame = decode_bin(path, model.image_size)
    emb = model.embed(_with_progress(images, name, cfg.batch_size), cfg)
    try:
        result = evaluate_verification(emb.fused, issame, nfolds=cfg.nfolds, far_targets=cfg.far_targets,
                                       raw_norms=emb.raw_norms, fold_seed=cfg.fold_seed if cfg.shuffle_folds else None)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    seconds = time.perf_counter() - start
    logger().info("%s (%d pairs, %.1f s)", result.summary(name), result.n_pairs, seconds)
    for note in result.notes:
        if "fewer than" in note:
            logger().warning("verification: %s: %s", name, note)
    row = {**model.describe(), "target": name, "bin_sha256": digest, "images": int(images.shape[0]),
           **result.to_row(), "seconds": seconds, "flip": cfg.flip, "precision": cfg.precision, "error": ""}
    for target in cfg.far_targets:  # same columns whatever the set size
        row.setdefault(far_key(float(target)), None)
    roc = pa.table({"model_sha256": [model.digest] * len(result.roc_far), "target": [name] * len(result.roc_far),
                    "far": result.roc_far, "tar": result.roc_tar, "threshold": result.roc_thresholds})
    return row, roc


def run_verification(
    model: ModelSource,
    targets: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: VerificationConfig | None = None,
    *,
    force: bool = False,
) -> VerificationStageResult:
    """Evaluate ``model`` (checkpoint or ``.onnx`` path, or an ``nn.Module``) on the ``targets`` packs
    (paths, named by file stem, or ``{name: path}``) into ``out_dir`` (see the module docstring).

    Skipped (``skipped=True``, nothing loaded) when ``stage.json`` matches the model and pack digests,
    the settings and the code; ``force`` redoes it.
    """
    cfg = cfg or VerificationConfig()
    out = Path(out_dir).resolve()
    sets = _target_paths(targets)
    digest = model_digest(model)
    found = {name: _bin_digest(path) for name, path in sets.items()}
    bin_digests = {name: d if isinstance(d, str) else "" for name, d in found.items()}
    params = {"config": cfg.model_dump(mode="json"), "targets": list(sets)}
    inputs = {"model": digest, **{f"bin:{name}": d for name, d in bin_digests.items()}}
    code = code_version(*_CODE_MODULES)
    paths = (out / METRICS_FILE, out / ROC_FILE, out / PLOT_FILE)
    if force:
        invalidate(out)
    elif all(bin_digests.values()) and current_record(out, STAGE, params, inputs, code) is not None:
        rows = pq.read_table(out / METRICS_FILE).to_pylist()
        logger().info("verification: %s is up to date (%s)", out, ", ".join(f"{r['target']} {r['accuracy']:.5f}" for r in rows))
        return VerificationStageResult(out, *paths, rows=rows, skipped=True)
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)

    loaded = load_eval_model(model, cfg, digest=digest)
    logger().info("verification: %s (%s, %s input %dx%d) on %s", loaded.name, loaded.kind, loaded.normalize,
                  *loaded.image_size, ", ".join(sets))
    rows, rocs, failures = [], {}, {}
    for name, path in sets.items():
        try:
            if not isinstance(found[name], str):
                raise found[name]  # type: ignore[misc]
            row, rocs[name] = _evaluate_target(loaded, name, path, bin_digests[name], cfg)
        except Exception as exc:  # noqa: BLE001 - one target's failure must not lose the others' results
            failures[name] = exc
            row = _error_row(loaded, name, bin_digests[name], cfg, exc)
            logger().error("verification: %s (%s) failed: %s", name, path, row["error"])
        rows.append(row)
    if not rocs:
        if len(failures) == 1:
            raise next(iter(failures.values()))
        raise ValueError("verification: every target failed: " + "; ".join(f"{r['target']}: {r['error']}" for r in rows))
    invalidate(out)  # the files below replace the recorded ones; a record is written only if every target succeeded
    _write_parquet(out / METRICS_FILE, _metrics_table(rows))
    _write_parquet(out / ROC_FILE, pa.concat_tables(list(rocs.values())))
    curves = {name: (roc.column("far").to_numpy(), roc.column("tar").to_numpy()) for name, roc in rocs.items()}
    plot_roc(curves, out / PLOT_FILE, title=f"{loaded.name} ({digest[:12]})")
    if failures:
        logger().warning("verification: %d of %d target(s) failed (%s); their rows carry the error, and the stage "
                         "is not recorded as done, so the next run tries again", len(failures), len(rows),
                         ", ".join(failures))
    else:
        summary = {r["target"]: {"accuracy": r["accuracy"], "accuracy_std": r["accuracy_std"]} for r in rows}
        commit_record(out, STAGE, params, inputs, code, [METRICS_FILE, ROC_FILE, PLOT_FILE], summary=summary)
    return VerificationStageResult(out, *paths, rows=rows, skipped=False)


def metrics_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the ``verification-metrics`` table artifact: the headline columns, rounded."""
    out = []
    for r in rows:
        keys = [*_TABLE_COLUMNS[:5], *(k for k in r if k.startswith("tar@far=")), *_TABLE_COLUMNS[5:]]
        out.append({"model": r["model"], "model_kind": r.get("model_kind"), **{k: (round(r[k], 5) if isinstance(r.get(k), float) else r.get(k)) for k in keys}})
    return out


def roc_markdown(plot_path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> str:
    """Markdown with the ROC plot as a data URI and one accuracy line per target."""
    data = base64.b64encode(Path(plot_path).read_bytes()).decode("ascii")
    lines = [f"- **{r['target']}**: error: {r['error']}" if r.get("error") else
             f"- **{r['target']}**: accuracy {r['accuracy']:.5f} ± {r['accuracy_std']:.5f}, {r['n_pairs']} pairs"
             for r in rows]
    return "\n".join(["### Verification ROC", "", f"![ROC](data:image/png;base64,{data})", "", *lines])


@task(name="verification", cache_policy=NO_CACHE)
def verification_task(model: str, targets: list[str] | dict[str, str], out_dir: str,
                      cfg: VerificationConfig | None = None, force: bool = False) -> VerificationStageResult:
    """:func:`run_verification`; publishes ``verification-metrics`` and ``verification-roc``; Skipped when up to date."""
    result = run_verification(model, targets, out_dir, cfg, force=force)
    name = result.rows[0]["model"] if result.rows else str(model)
    publish_table("verification-metrics", metrics_table(result.rows), description=f"{name}: verification accuracy and TAR@FAR")
    publish_markdown("verification-roc", roc_markdown(result.plot_path, result.rows), description=f"{name}: ROC per target")
    return finished(result)


def run_command(args: argparse.Namespace) -> int:
    """``facepipe evaluate`` / ``python -m tasks.verification`` with parsed arguments."""
    cfg = cli.config_from_args(args, VerificationConfig)
    result = run_verification(cli.existing_model(args.model), args.targets, args.out_dir, cfg, force=args.force)
    print("\n".join(result.summary_lines()))
    print(json.dumps({"metrics": str(result.metrics_path), "plot": str(result.plot_path), "skipped": result.skipped}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("evaluate", run_command, argv, prog="python -m tasks.verification")

"""IJB stage: an embedding model on IJB-B / IJB-C, the protocol of arcface_torch's ``eval_ijbc.py``.

Per target (``IJBB``, ``IJBC``; files as :mod:`datasets.ijb` describes them under ``<root>/<TARGET>/``):
read the protocol files; align every ``loose_crop`` image from its five landmarks to the ArcFace
112x112 template (decoding and warping on threads); embed the aligned faces and their mirrors
(:meth:`tasks.evaluation.model.EvalModel.embed`, a batch of images and their mirrors in one forward pass); keep the
raw embeddings ``(N, 2D)`` float32 ``[image | mirror]`` as features; then, with
:mod:`tasks.evaluation.ijb`: flip sum, feature norm and detector-score weighting, media then template
pooling, cosine scores of the template pairs, the ROC with TAR at FAR 1e-6 ... 1e-1, and, when the
1:N files are there, CMC rank-1/5/10 and TPIR at FPIR 1e-2 / 1e-1.

Features are cached in ``features_dir`` (default ``<out_dir>/features``) as
``<TARGET>-<key>.npy``, ``key`` a digest of the model file, the image list (landmark file, each
image's size and modification time) and the extraction settings: evaluating the same model again
(other pooling settings, another ``out_dir`` sharing ``features_dir``) does not extract again. An
interrupted extraction resumes at its last finished chunk (``.npy.inprogress`` and ``.progress.json``).

Output (``out_dir``):

* ``ijb.parquet``: one row per target: the model columns, ``target``, ``images``, ``templates``,
  ``pairs``, ``genuine``, ``impostor``, ``tar@far=1e-06`` ... ``tar@far=1e-01``, ``auc``, ``rank_1``,
  ``rank_5``, ``rank_10``, ``tpir@fpir=1e-02``, ``tpir@fpir=1e-01`` (null without the 1:N files),
  ``probes``, ``gallery``, the settings (``flip``, ``norm_score``, ``detector_score``),
  ``features_cached``, ``extract_seconds`` (0 when cached), ``pool_seconds`` (image features to
  templates), ``score_seconds`` (pair scores and ROC), ``identify_seconds``.
* ``ijb_roc.parquet``: ``target``, ``far``, ``tar``, ``threshold`` (every point of the ROC).
* ``ijb_roc.png``: TAR against FAR per target. ``<target>_scores.npy``: the pair scores ``(P,)``
  float64 in the pair file's order (``eval_ijbc.py`` saves the same array).
* ``stage.json`` last; its inputs are the model's sha256, the protocol files' sha256 and the image
  stamps, so the same evaluation again is Skipped.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    from tasks.cli import run_command_line

    run_command_line("ijb")

import argparse
import base64
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from datasets.atomic import atomic_paths, remove_partials
from datasets.chunked_array import ChunkedArray
from datasets.hashing import file_stats, params_hash, sha256_file
from datasets.ijb import TARGETS, IjbMeta, load_meta, meta_file, read_aligned_face, target_dir
from datasets.locks import folder_lock
from tasks.evaluation.ijb import (FAR_TARGETS, FPIR_TARGETS, RANKS, identification, image_features, pair_scores,
                                  pool_templates, roc_auc, roc_curve, tar_at_far)
from tasks import cli
from tasks.evaluation.config import ExtractionConfig, IjbConfig
from tasks.evaluation.model import EvalModel, ModelSource, load_eval_model, model_digest, rows_table
from tasks.evaluation.pairs import far_key
from tasks.evaluation.plots import plot_roc
from tasks.runtime import Progress, finished, logger, publish_markdown, publish_table
from tasks.stage import code_version, commit_record, current_record, invalidate

__all__ = ["STAGE", "METRICS_FILE", "ROC_FILE", "PLOT_FILE", "IjbConfig", "IjbResult", "available_targets",
           "run_ijb", "ijb_task", "main"]

STAGE = "ijb"
METRICS_FILE = "ijb.parquet"
ROC_FILE = "ijb_roc.parquet"
PLOT_FILE = "ijb_roc.png"
FEATURES_DIR = "features"
_CODE_MODULES = ("tasks.ijb", "tasks.evaluation.ijb", "tasks.evaluation.model", "tasks.evaluation.embed", "datasets.ijb")
_FEATURE_CODE_MODULES = ("tasks.evaluation.model", "tasks.evaluation.embed", "datasets.ijb", "datasets.face_align")
_TABLE_COLUMNS = ("target", *(far_key(f) for f in FAR_TARGETS), "auc", "rank_1", "rank_5", "rank_10",
                  "tpir@fpir=1e-02", "tpir@fpir=1e-01", "pairs", "templates", "images")


@dataclass
class IjbResult:
    """Outcome of :func:`run_ijb`: one metric row per target and the written files."""

    out_dir: Path
    metrics_path: Path
    roc_path: Path
    plot_path: Path
    rows: list[dict[str, Any]]
    skipped: bool

    def summary_lines(self) -> list[str]:
        """``IJBC: TAR@FAR=1e-06 ... 1e-01: 85.41 93.02 ...`` (percent, two decimals, as eval_ijbc prints)."""
        out = []
        for r in self.rows:
            tars = " ".join("-" if r.get(far_key(f)) is None else f"{100 * r[far_key(f)]:.2f}" for f in FAR_TARGETS)
            out.append(f"{r['target']}: TAR@FAR=1e-06..1e-01: {tars}" +
                       (f"; rank-1 {100 * r['rank_1']:.2f}" if r.get("rank_1") is not None else ""))
        return out


def available_targets(root: str | os.PathLike) -> list[str]:
    """The targets whose ``meta/<target>_face_tid_mid.txt`` exists under ``root`` (``root/<TARGET>/meta`` or
    ``root/meta``)."""
    out = []
    for target in TARGETS:
        try:
            folder = target_dir(root, target)
        except FileNotFoundError:
            continue
        if meta_file(folder, target, "face_tid_mid.txt").is_file():
            out.append(target)
    return out


# --- features ---------------------------------------------------------------------------------------


def _image_stamp(meta: IjbMeta) -> str:
    stats, missing = file_stats(meta.image_dir, meta.names)
    if missing:
        raise FileNotFoundError(f"{meta.image_dir}: {len(missing)} of {len(meta)} listed images do not exist, "
                                f"e.g. {', '.join(repr(m) for m in missing[:5])}")
    return params_hash({"landmarks": sha256_file(meta.files[1]), "root": str(meta.image_dir), "files": params_hash(stats, 32)}, 32)


def _batches(meta: IjbMeta, start: int, stop: int, size: int, hw: tuple[int, int], pool: ThreadPoolExecutor,
             sizes: list[int], flip: bool) -> Iterator[np.ndarray]:
    """Aligned faces ``start..stop`` in batches of ``size`` (each followed by its mirrors when ``flip``),
    aligned on ``pool`` up to two batches ahead; appends each batch's image count to ``sizes``."""
    def load(lo: int) -> np.ndarray:
        hi = min(lo + size, stop)
        return np.stack([read_aligned_face(meta.image_dir / meta.names[i], meta.landmarks[i], hw) for i in range(lo, hi)])

    starts = list(range(start, stop, size))
    pending = [pool.submit(load, lo) for lo in starts[:2]]
    for number in range(len(starts)):
        batch = pending[number].result()
        if number + 2 < len(starts):
            pending.append(pool.submit(load, starts[number + 2]))
        sizes.append(len(batch))
        yield np.concatenate([batch, np.ascontiguousarray(batch[:, :, ::-1])]) if flip else batch


def _extract(model: EvalModel, meta: IjbMeta, target: Path, key: str, cfg: IjbConfig) -> None:
    """Write the raw features of ``meta``'s images to ``target`` (``(N, 2D)`` float32 ``.npy``, or ``(N, D)``
    without flip), resuming a run with the same ``key`` at its last finished chunk."""
    n = len(meta)
    store = ChunkedArray(target, n, key)
    if store.done:
        logger().info("ijb: resuming %s features at %d of %d", meta.target, store.done, n)
    half = max(1, cfg.batch_size // 2) if cfg.flip else cfg.batch_size
    # one forward pass per batch of images + mirrors; the mirrors' raw embeddings come back unfused
    forward = cfg.model_copy(update={"flip": False, "batch_size": 2 * half if cfg.flip else half})
    progress = Progress(f"ijb-embed-{meta.target}", total=n, description=f"ijb: embed {meta.target}")
    with ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="ijb-align") as pool:
        pos = store.done
        while pos < n:
            stop = min(pos + cfg.chunk_images, n)
            sizes: list[int] = []
            emb = model.embed(_batches(meta, pos, stop, half, model.image_size, pool, sizes, cfg.flip), forward)
            raw = emb.fused * emb.raw_norms[:, :1]  # raw = unit vector x its norm
            if cfg.flip:
                parts, at = [], 0
                for b in sizes:
                    parts.append(np.concatenate([raw[at:at + b], raw[at + b:at + 2 * b]], axis=1))
                    at += 2 * b
                raw = np.concatenate(parts)
            if raw.shape[0] != stop - pos:
                raise RuntimeError(f"ijb: {raw.shape[0]} features for {meta.target} images {pos}..{stop - 1}")
            store.write(pos, raw)
            pos = stop
            progress.update(pos)
    store.finish()


def _features(model: ModelSource, digest: str, loaded: list[EvalModel | None], meta: IjbMeta, stamp: str, folder: Path,
              cfg: IjbConfig, force: bool) -> tuple[Path, float, bool]:
    """``(features file, seconds the extraction took, cached)``; loads the model into ``loaded[0]`` when needed."""
    settings = cfg.model_dump(mode="json", include=set(ExtractionConfig.model_fields) - {"batch_size"})
    key = params_hash({"model": digest, "images": stamp, "settings": settings,
                       "code": code_version(*_FEATURE_CODE_MODULES)}, 16)
    path = folder / f"{meta.target}-{key}.npy"
    if path.is_file() and not force:
        logger().info("ijb: %s features cached in %s", meta.target, path)
        return path, 0.0, True
    folder.mkdir(parents=True, exist_ok=True)
    if force:
        path.with_name(path.name + ".progress.json").unlink(missing_ok=True)
    if loaded[0] is None:
        loaded[0] = load_eval_model(model, cfg, digest=digest)
        lm = loaded[0]
        logger().info("ijb: %s (%s, %s input %dx%d)", lm.name, lm.kind, lm.normalize, *lm.image_size)
    start = time.perf_counter()
    _extract(loaded[0], meta, path, key, cfg)
    return path, time.perf_counter() - start, False


# --- evaluation -------------------------------------------------------------------------------------


def _evaluate(meta: IjbMeta, raw: np.ndarray, cfg: IjbConfig) -> tuple[dict[str, Any], pa.Table, np.ndarray]:
    start = time.perf_counter()
    feats = image_features(raw, meta.scores, flip=cfg.flip, norm_score=cfg.norm_score, detector_score=cfg.detector_score)
    template_ids, template_feats = pool_templates(feats, meta.templates, meta.medias)
    pool_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = pair_scores(template_ids, template_feats, meta.t1, meta.t2)
    try:
        fpr, tpr, thresholds = roc_curve(meta.labels, scores)
    except ValueError as exc:
        raise ValueError(f"{meta.files[2]}: {exc}") from None
    tars = tar_at_far(fpr, tpr, FAR_TARGETS)
    row: dict[str, Any] = {"target": meta.target, "images": len(meta), "templates": len(template_ids),
                           "pairs": len(scores), "genuine": int(meta.labels.sum()),
                           "impostor": int(len(scores) - meta.labels.sum()),
                           **{far_key(f): tars[float(f)] for f in FAR_TARGETS}, "auc": roc_auc(fpr, tpr)}
    score_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ident = None
    if cfg.identification and meta.identification is not None:
        im = meta.identification
        probe = template_feats[np.searchsorted(template_ids, im.probe_templates)]
        gallery = template_feats[np.searchsorted(template_ids, im.gallery_templates)]
        try:
            ident = identification(probe, im.probe_subjects, gallery, im.gallery_subjects, RANKS, FPIR_TARGETS)
        except ValueError as exc:
            raise ValueError(f"{im.files[0]}: {exc}") from None
    row.update({f"rank_{k}": None if ident is None else ident.cmc[k] for k in RANKS})
    row.update({f"tpir@fpir={f:.0e}": None if ident is None else ident.tpir[float(f)] for f in FPIR_TARGETS})
    row.update({"probes": None if ident is None else ident.probes, "gallery": None if ident is None else ident.gallery,
                "pool_seconds": pool_seconds, "score_seconds": score_seconds,
                "identify_seconds": time.perf_counter() - start})
    roc = pa.table({"target": [meta.target] * len(fpr), "far": fpr, "tar": tpr, "threshold": thresholds})
    return row, roc, scores


def run_ijb(model: ModelSource, root: str | os.PathLike, out_dir: str | os.PathLike, targets: Sequence[str] | None = None,
            cfg: IjbConfig | None = None, *, force: bool = False) -> IjbResult:
    """Evaluate ``model`` (checkpoint or ``.onnx`` path, or an ``nn.Module``) on the IJB ``targets`` under
    ``root`` (default: every target there) into ``out_dir`` (see the module docstring). Protocol files
    are read and checked before any image is. Skipped when the record matches; ``force`` redoes
    extraction and evaluation. Holds ``out_dir``'s lock (:func:`datasets.locks.folder_lock`) while it
    runs (not ``features_dir``'s, a cache that other output folders may share)."""
    cfg = cfg or IjbConfig()
    out = Path(out_dir).resolve()
    with folder_lock(out, STAGE):  # a second ijb into out_dir fails at once (FolderBusy)
        return _run_ijb_locked(model, root, out, targets, cfg, force=force)


def _run_ijb_locked(model: ModelSource, root: str | os.PathLike, out: Path, targets: Sequence[str] | None, cfg: IjbConfig,
                    *, force: bool) -> IjbResult:
    root = Path(root).expanduser().resolve()
    targets = list(targets) if targets else available_targets(root)
    if not targets:
        raise FileNotFoundError(f"{root}: no IJB target (expected {' or '.join(f'{t}/meta' for t in TARGETS)})")
    metas = [load_meta(root, t) for t in dict.fromkeys(targets)]
    stamps = {m.target: _image_stamp(m) for m in metas}
    digest = model_digest(model)
    inputs = {"model": digest, **{f"images:{t}": s for t, s in stamps.items()},
              **{f"file:{p.name}": sha256_file(p) for m in metas for p in m.files}}
    params = {"config": cfg.model_dump(mode="json", exclude={"features_dir", "decode_threads", "chunk_images", "batch_size"}),
              "targets": [m.target for m in metas]}
    code = code_version(*_CODE_MODULES)
    paths = (out / METRICS_FILE, out / ROC_FILE, out / PLOT_FILE)
    if force:
        invalidate(out)
    elif current_record(out, STAGE, params, inputs, code) is not None:
        rows = pq.read_table(out / METRICS_FILE).to_pylist()
        logger().info("ijb: %s is up to date", out)
        return IjbResult(out, *paths, rows=rows, skipped=True)
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)
    folder = Path(cfg.features_dir).resolve() if cfg.features_dir else out / FEATURES_DIR

    loaded: list[EvalModel | None] = [None]
    rows, rocs, outputs = [], [], [METRICS_FILE, ROC_FILE, PLOT_FILE]
    described: dict[str, Any] | None = None
    for meta in metas:
        path, extract_seconds, cached = _features(model, digest, loaded, meta, stamps[meta.target], folder, cfg, force)
        row, roc, scores = _evaluate(meta, np.load(path), cfg)
        if loaded[0] is not None:
            described = loaded[0].describe()
        rows.append({**row, "flip": cfg.flip, "norm_score": cfg.norm_score, "detector_score": cfg.detector_score,
                     "features_cached": cached, "extract_seconds": extract_seconds})
        rocs.append(roc)
        name = f"{meta.target.lower()}_scores.npy"
        with atomic_paths(out / name) as (tmp,):
            with open(tmp, "wb") as fh:
                np.save(fh, scores)
        outputs.append(name)
        logger().info("ijb: %s: %d images, %d templates, %d pairs; extract %.1f s%s, pool %.2f s, score %.2f s",
                      meta.target, len(meta), row["templates"], row["pairs"], extract_seconds,
                      " (cached)" if cached else "", row["pool_seconds"], row["score_seconds"])
    model_columns = described or {"model": Path(str(model)).name if not hasattr(model, "state_dict") else type(model).__name__,
                                  "model_sha256": digest}
    rows = [{**model_columns, **r} for r in rows]
    with atomic_paths(out / METRICS_FILE) as (tmp,):
        pq.write_table(rows_table(rows), tmp)
    with atomic_paths(out / ROC_FILE) as (tmp,):
        pq.write_table(pa.concat_tables(rocs), tmp)
    curves = {r.column("target")[0].as_py(): (r.column("far").to_numpy(), r.column("tar").to_numpy()) for r in rocs}
    plot_roc(curves, out / PLOT_FILE, title=f"IJB {rows[0]['model']} ({digest[:12]})")
    summary = {r["target"]: {far_key(f): r[far_key(f)] for f in FAR_TARGETS} for r in rows}
    commit_record(out, STAGE, params, inputs, code, outputs, summary=summary)
    for r in IjbResult(out, *paths, rows=rows, skipped=False).summary_lines():
        logger().info("ijb: %s", r)
    return IjbResult(out, *paths, rows=rows, skipped=False)


def metrics_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of the ``ijb-metrics`` table artifact: percentages with two decimals, as eval_ijbc prints them."""
    out = []
    for r in rows:
        item: dict[str, Any] = {"model": r["model"]}
        for k in _TABLE_COLUMNS:
            v = r.get(k)
            item[k] = round(100 * v, 2) if isinstance(v, float) and k not in ("pairs", "templates", "images") else v
        out.append(item)
    return out


def _markdown(result: IjbResult) -> str:
    data = base64.b64encode(result.plot_path.read_bytes()).decode("ascii")
    head = "| target | " + " | ".join(f"{f:.0e}" for f in FAR_TARGETS) + " | AUC |"
    lines = ["### IJB 1:1 verification: TAR (%) at FAR", "", head, "|" + " --- |" * (len(FAR_TARGETS) + 2)]
    for r in result.rows:
        lines.append(f"| {r['target']} | " + " | ".join(f"{100 * r[far_key(f)]:.2f}" for f in FAR_TARGETS) +
                     f" | {100 * r['auc']:.2f} |")
    return "\n".join([*lines, "", f"![ROC](data:image/png;base64,{data})"])


@task(name="ijb", cache_policy=NO_CACHE)
def ijb_task(model: str, root: str, out_dir: str, targets: list[str] | None = None, cfg: IjbConfig | None = None,
             force: bool = False) -> IjbResult:
    """:func:`run_ijb`; publishes ``ijb-metrics`` (table) and ``ijb-roc`` (plot); Skipped when up to date."""
    result = run_ijb(model, root, out_dir, targets, cfg, force=force)
    name = result.rows[0]["model"] if result.rows else str(model)
    publish_table("ijb-metrics", metrics_table(result.rows), description=f"{name}: IJB TAR@FAR (%), CMC, TPIR@FPIR")
    publish_markdown("ijb-roc", _markdown(result), description=f"{name}: IJB ROC per target")
    return finished(result)


def run_command(args: argparse.Namespace) -> int:
    """``facepipe ijb`` / ``python -m tasks.ijb`` with parsed arguments."""
    cfg = cli.config_from_args(args, IjbConfig)
    result = run_ijb(cli.existing_model(args.model), args.root, args.out_dir, args.target, cfg, force=args.force)
    print("\n".join(result.summary_lines()))
    print(json.dumps({"metrics": str(result.metrics_path), "plot": str(result.plot_path), "skipped": result.skipped}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("ijb", run_command, argv)

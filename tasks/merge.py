"""Merge stage: several packed datasets into one, relabelled, optionally de-duplicated (spec 3).

Input: packed dataset folders (``train.rec``, ``train.idx``, ``property``; InsightFace or im2rec
layout), in order; an optional ``labels.csv`` (``label,identity``, as :mod:`tasks.pack` writes it)
names their identities. An identity is a class label of a dataset.

Modes (``dedup``):

* ``"none"``: plain concatenation (dataset_merge.py without a model): every identity of every
  dataset becomes its own new identity.
* ``"name"``: identities with the same name (``labels.csv``) in several datasets become one new
  identity; its images are gathered, in dataset order, into one contiguous run. Identities
  without a name (a dataset without ``labels.csv``) are never merged.
* ``"model"``: dataset_merge.py's de-duplication with an embedding model. Identity centre =
  mean of the L2-normalised embeddings of its images (no flip), L2-normalised again. Every
  identity of the first dataset is kept; an identity of a later dataset is dropped when its
  centre has cosine >= ``param1`` (0.3) with any identity kept from an *earlier* dataset
  (identities of one dataset are never compared with each other).

Exclusion (any mode, needs ``model``): every kept identity whose centre has cosine >= ``param2``
(0.4) with an exclusion vector is removed. Exclusion vectors: the identity centres of a packed
dataset folder, or each image of a verification ``.bin`` (the non-flipped images, embedded one by
one). As in dataset_merge.py the overlap check comes first, the exclusion is applied to the
identities it kept.

Models: a ``.onnx`` file (:class:`tasks.evaluation.embed.OnnxEmbedder`), a training checkpoint, an
arcface_torch ``backbone.pth`` or an MXNet ``prefix,epoch`` (``tasks.checkpoint.load_embedder``), or, from Python, any torch module / callable mapping a
normalised ``(B, 3, H, W)`` float32 batch to ``(B, D)`` embeddings (``embedder=``).

Output (``out_dir``), as dataset_merge.py writes it: kept identities renumbered 0, 1, ... in
acceptance order (dataset order, then label order); their image records copied with the payload
bytes unchanged, new keys ``1..N`` and the new label (``label_format``: scalar, flag 0, as
dataset_merge.py; or ``[label, aligned]``); then the identity records; record 0 written last;
``property`` = ``K,H,W``; ``labels.csv`` with the names; ``manifest.parquet`` with one row per
input identity: ``kept``, ``merged`` (same name as an earlier one; its images went there),
``duplicate`` or ``excluded`` with the cosine and the identity or exclusion vector it collided
with; ``stage.json`` last.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    from tasks.cli import run_command_line

    run_command_line("merge")

import argparse
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from datasets.atomic import remove_partials
from datasets.errors import FormatError
from datasets.face_codec import decode_face
from datasets.hashing import params_hash
from datasets.locks import folder_lock
from datasets.manifest import MANIFEST_FILE, status_counts, write_manifest
from datasets.rec_layout import (
    IDX_FILE,
    LABELS_FILE,
    PROPERTY_FILE,
    REC_FILE,
    InsightFaceRecWriter,
    RecIndex,
    read_labels,
    read_rec_index,
    write_labels,
)
from datasets.recordio import MXRecordIO, unpack
from datasets.verification_bin import decode_bin
from tasks.evaluation.embed import OnnxEmbedder, extract_embeddings
from tasks.evaluation.config import ExtractionConfig
from tasks.evaluation.model import load_eval_model, model_digest
from tasks import cli
from tasks.configs import MergeConfig
from tasks.runtime import Progress, finished, logger
from tasks.stage import code_version, commit_record, current_record, invalidate

__all__ = ["STAGE", "EXTRA_COLUMNS", "MergeConfig", "MergeResult", "load_embedding_model", "identity_centres",
           "run_merge", "merge_task", "main"]

STAGE = "merge"
_CODE_MODULES = ("tasks.merge", "tasks.evaluation.embed", "datasets.rec_layout", "datasets.recordio", "datasets.face_codec",
                 "datasets.normalization")
_CHUNK_IMAGES = 4096  # images decoded and embedded per extract_embeddings call
_SIM_ROWS = 4096  # centre rows per similarity block

EXTRA_COLUMNS: dict[str, pa.DataType] = {
    "dataset": pa.int32(),
    "label": pa.int64(),
    "identity": pa.string(),
    "images": pa.int64(),
    "new_label": pa.int64(),
    "cosine": pa.float32(),
    "collided_with": pa.string(),
}

Embedder = Callable[[Any], Any]


@dataclass
class MergeResult:
    """Outcome of :func:`run_merge`. ``counts``: identities per manifest status."""

    out_dir: Path
    rec_path: Path
    idx_path: Path
    property_path: Path
    manifest_path: Path
    images: int
    identities: int
    image_size: tuple[int, int]
    counts: dict[str, int]
    skipped: bool


# --- models ---------------------------------------------------------------------------------------


def load_embedding_model(model: str | os.PathLike) -> Embedder:
    """A callable embedding model from any model file :func:`tasks.evaluation.model.load_eval_model` takes."""
    return load_eval_model(model).embedder


def _model_fingerprint(model: Embedder, path: str | None) -> str | None:
    """Digest identifying the model's weights, or None when it cannot be told (never skip then)."""
    if path:
        return model_digest(path)
    if isinstance(model, torch.nn.Module):
        return model_digest(model)
    if isinstance(model, OnnxEmbedder):
        return model_digest(model.path)
    return None


# --- datasets -------------------------------------------------------------------------------------


@dataclass
class _Dataset:
    """One input dataset: its index, classes (sorted labels) and the positions (into ``rec.keys``)
    of each class's images in key order."""

    number: int
    folder: Path
    rec: RecIndex
    names: dict[int, str]
    classes: np.ndarray
    members: list[np.ndarray]

    @property
    def image_size(self) -> tuple[int, int]:
        assert self.rec.property is not None
        return self.rec.property.height, self.rec.property.width

    def name_of(self, label: int) -> str:
        return self.names.get(int(label), f"{self.folder.name}#{int(label)}")

    def item_id(self, label: int) -> str:
        return f"{self.number}:{int(label)}"


def _open_dataset(number: int, folder: str | os.PathLike) -> _Dataset:
    path = Path(folder).resolve()
    rec = read_rec_index(path)
    if rec.property is None:
        raise FormatError(path / PROPERTY_FILE, "property file does not exist", "'num_classes,height,width' beside train.rec")
    table = read_labels(path / LABELS_FILE) if (path / LABELS_FILE).is_file() else {}
    order = np.argsort(rec.labels, kind="stable")
    classes, starts = np.unique(rec.labels[order], return_index=True)
    members = np.split(order, starts[1:]) if len(order) else []
    return _Dataset(number, path, rec, {label: name for name, label in table.items()}, classes, members)


def _stamp(paths: Sequence[Path]) -> str:
    items = []
    for p in paths:
        if p.exists():
            st = p.stat()
            items.append([str(p), st.st_size, st.st_mtime_ns])
        else:
            items.append([str(p), -1, -1])
    return params_hash(items, 32)


def _dataset_stamp(folder: Path) -> str:
    return _stamp([folder / REC_FILE, folder / IDX_FILE, folder / PROPERTY_FILE, folder / LABELS_FILE])


# --- embeddings -----------------------------------------------------------------------------------


def _image_batches(ds: _Dataset, positions: np.ndarray, batch: int) -> Iterator[np.ndarray]:
    """Decoded RGB images ``(b, H, W, 3) uint8`` of ``positions`` (into ``ds.rec.keys``), in order."""
    size = ds.image_size
    with MXRecordIO(ds.rec.rec_path, "r") as reader:
        for start in range(0, len(positions), batch):
            images = []
            for pos in positions[start:start + batch]:
                _header, payload = unpack(reader.read_at(int(ds.rec.offsets[pos])))
                images.append(decode_face(payload, ds.rec.rec_path, f"record key {int(ds.rec.keys[pos])}", size))
            yield np.stack(images)


def identity_centres(ds_folder: str | os.PathLike, model: Embedder, *, batch_size: int = 64,
                     normalize: str = "arcface", device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """``(labels (K,) int64, centres (K, D) float32)`` of a packed dataset: per class the mean of
    its images' L2-normalised embeddings (no flip), L2-normalised."""
    ds = _open_dataset(0, ds_folder)
    return ds.classes, _centres(ds, model, batch_size, normalize, device)


def _centres(ds: _Dataset, model: Embedder, batch_size: int, normalize: str, device: str) -> np.ndarray:
    owner = np.empty(len(ds.rec.keys), np.int64)
    for i, members in enumerate(ds.members):
        owner[members] = i
    order = np.concatenate(ds.members) if ds.members else np.zeros(0, np.int64)
    sums: np.ndarray | None = None
    for start in range(0, len(order), _CHUNK_IMAGES):
        chunk = order[start:start + _CHUNK_IMAGES]
        emb = extract_embeddings(model, _image_batches(ds, chunk, batch_size), batch_size=batch_size, flip=False,
                                 device=device, normalize=normalize).fused
        if sums is None:
            sums = np.zeros((len(ds.members), emb.shape[1]), np.float64)
        np.add.at(sums, owner[chunk], emb.astype(np.float64))
    if sums is None:
        return np.zeros((0, 0), np.float32)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    return (sums / np.maximum(norms, 1e-12)).astype(np.float32)


def _best_match(centres: np.ndarray, others: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``centres``: the largest cosine with a row of ``others`` and its index."""
    best = np.full(len(centres), -np.inf, np.float32)
    which = np.full(len(centres), -1, np.int64)
    if len(others) == 0 or len(centres) == 0:
        return best, which
    for start in range(0, len(centres), _SIM_ROWS):
        sims = centres[start:start + _SIM_ROWS] @ others.T
        which[start:start + len(sims)] = sims.argmax(axis=1)
        best[start:start + len(sims)] = sims.max(axis=1)
    return best, which


def _exclusion_vectors(paths: Sequence[str], model: Embedder, cfg: MergeConfig, size: tuple[int, int]
                       ) -> tuple[np.ndarray, list[str]]:
    """Exclusion vectors ``(E, D)`` and a description of each."""
    vectors, names = [], []
    for entry in paths:
        path = Path(entry).resolve()
        if path.is_dir():
            ds = _open_dataset(-1, path)
            vectors.append(_centres(ds, model, cfg.batch_size, cfg.normalize, cfg.device))
            names += [f"{path.name} identity {ds.name_of(lab)!r} (label {int(lab)})" for lab in ds.classes]
        elif path.suffix.lower() == ".bin":
            images, _issame = decode_bin(path, size)
            vectors.append(extract_embeddings(model, images, batch_size=cfg.batch_size, flip=False, device=cfg.device,
                                              normalize=cfg.normalize).fused)
            names += [f"{path.name} image {i}" for i in range(len(images))]
        else:
            raise FormatError(path, "exclusion source is neither a packed dataset folder nor a .bin file",
                              "a folder with train.rec/train.idx/property, or a verification .bin")
    vectors = [v for v in vectors if v.size]
    return (np.concatenate(vectors) if vectors else np.zeros((0, 0), np.float32)), names


# --- the stage ------------------------------------------------------------------------------------


def _check_config(cfg: MergeConfig, embedder: Embedder | None) -> None:
    if cfg.needs_embeddings() and embedder is None and not cfg.model:
        what = "dedup='model'" if cfg.dedup == "model" else "exclude"
        raise ValueError(f"merge: {what} needs an embedding model (MergeConfig.model: a .onnx file or a checkpoint)")


def run_merge(
    datasets: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    cfg: MergeConfig | None = None,
    *,
    embedder: Embedder | None = None,
    force: bool = False,
) -> MergeResult:
    """Merge the packed ``datasets`` (in order) into ``out_dir`` (see the module docstring).

    ``embedder`` overrides ``cfg.model`` with a loaded model. Skipped (``skipped=True``) when the
    stage record matches (same dataset files by size and mtime, parameters, model, code); a
    model without a fingerprint (a plain callable) is never skipped. ``force`` redoes it. Holds
    ``out_dir``'s lock (:func:`datasets.locks.folder_lock`) while it runs.
    """
    cfg = cfg or MergeConfig()
    out = Path(out_dir).resolve()
    with folder_lock(out, STAGE):  # a second merge into out_dir fails at once (FolderBusy)
        return _run_merge_locked(datasets, out, cfg, embedder=embedder, force=force)


def _run_merge_locked(datasets: Sequence[str | os.PathLike], out: Path, cfg: MergeConfig, *, embedder: Embedder | None,
                      force: bool) -> MergeResult:
    _check_config(cfg, embedder)
    if not datasets:
        raise ValueError("merge: no datasets given")
    sets = [_open_dataset(i, d) for i, d in enumerate(datasets)]
    sizes = {ds.image_size for ds in sets}
    if len(sizes) > 1:
        detail = ", ".join(f"{ds.folder}: {ds.image_size[0]}x{ds.image_size[1]}" for ds in sets)
        raise ValueError(f"merge: datasets have different image sizes ({detail})")
    size = sets[0].image_size

    model = None
    if cfg.needs_embeddings():
        if embedder is not None:
            model = embedder
        else:
            loaded = load_eval_model(cfg.model, ExtractionConfig(normalize=cfg.normalize))  # type: ignore[arg-type]
            model = loaded.embedder
            cfg = cfg.model_copy(update={"normalize": loaded.normalize})
    if cfg.normalize is None:
        cfg = cfg.model_copy(update={"normalize": "arcface"})
    params = {"config": cfg.model_dump(mode="json"), "datasets": [str(ds.folder) for ds in sets]}
    inputs = {f"dataset{ds.number}": _dataset_stamp(ds.folder) for ds in sets}
    for i, ex in enumerate(cfg.exclude):
        p = Path(ex).resolve()
        inputs[f"exclude{i}"] = _dataset_stamp(p) if p.is_dir() else _stamp([p])
    fingerprint = _model_fingerprint(model, None if embedder is not None else cfg.model) if model is not None else "none"
    code = code_version(*_CODE_MODULES)
    if fingerprint is not None:
        inputs["model"] = fingerprint
    if force:
        invalidate(out)
    elif fingerprint is not None:
        record = current_record(out, STAGE, params, inputs, code)
        if record is not None:
            logger().info("merge: %s is up to date (%s)", out, record.summary.get("counts"))
            return _result(out, record.summary, skipped=True)
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)

    rows = _decide(sets, cfg, model)
    _write(sets, rows, out, size, cfg)
    manifest = pd.DataFrame(rows)
    manifest["params_hash"] = params_hash(params)
    write_manifest(out / MANIFEST_FILE, manifest, stage=STAGE, extra=EXTRA_COLUMNS)
    kept = manifest[manifest["new_label"] >= 0]
    summary = {"counts": status_counts(manifest), "images": int(kept["images"].sum()),
               "identities": int(kept["new_label"].nunique()), "image_size": list(size)}
    commit_record(out, STAGE, params, inputs if fingerprint is not None else {**inputs, "model": "unknown"}, code,
                  [REC_FILE, IDX_FILE, PROPERTY_FILE, LABELS_FILE, MANIFEST_FILE], summary=summary)
    logger().info("merge: %d datasets -> %d identities, %d images in %s (%s)", len(sets), summary["identities"],
                  summary["images"], out, summary["counts"])
    return _result(out, summary, skipped=False)


def _decide(sets: list[_Dataset], cfg: MergeConfig, model: Embedder | None) -> list[dict[str, Any]]:
    """One manifest row per input identity, with its status and new label."""
    total = sum(len(ds.rec.keys) for ds in sets)
    progress = Progress("merge-embed", total=total, description="merge: embed identities") if model is not None else None
    embedded = 0
    rows: list[dict[str, Any]] = []
    kept_centres: list[np.ndarray] = []
    kept_rows: list[int] = []  # row numbers of kept identities, in kept_centres order
    by_name: dict[str, int] = {}  # name -> row number of its first (kept) identity
    all_centres: dict[int, np.ndarray] = {}
    for ds in sets:
        centres = None
        if model is not None:
            centres = _centres(ds, model, cfg.batch_size, cfg.normalize, cfg.device)
            embedded += len(ds.rec.keys)
            if progress is not None:
                progress.update(embedded)
        earlier = np.concatenate(kept_centres) if kept_centres else np.zeros((0, 0), np.float32)
        if cfg.dedup == "model" and ds.number > 0 and centres is not None:
            best, which = _best_match(centres, earlier)
        else:
            best, which = np.full(len(ds.classes), -np.inf, np.float32), np.full(len(ds.classes), -1, np.int64)
        new_rows = []
        for i, label in enumerate(ds.classes):
            name = ds.name_of(label)
            row = {"item_id": ds.item_id(label), "source_path": str(ds.folder), "source_sha256": "",
                   "status": "kept", "reason": "", "output_path": REC_FILE, "dataset": ds.number, "label": int(label),
                   "identity": name, "images": len(ds.members[i]), "new_label": -1, "cosine": np.nan,
                   "collided_with": ""}
            if best[i] >= cfg.param1:
                other = rows[kept_rows[which[i]]]
                row.update(status="duplicate", output_path="", cosine=float(best[i]), collided_with=other["item_id"],
                           reason=f"cosine {best[i]:.4f} >= param1 {cfg.param1} with {other['item_id']} ({other['identity']!r})")
            elif cfg.dedup == "name" and label in ds.names and name in by_name:
                first = rows[by_name[name]]
                row.update(status="merged", collided_with=first["item_id"],
                           reason=f"same name as {first['item_id']}; its images join that identity")
            rows.append(row)
            number = len(rows) - 1
            if row["status"] == "kept":
                new_rows.append((number, i))
                if cfg.dedup == "name" and label in ds.names:
                    by_name.setdefault(name, number)
        if centres is not None:
            for number, i in new_rows:
                all_centres[number] = centres[i]
            kept_centres.append(centres[[i for _, i in new_rows]] if new_rows else np.zeros((0, centres.shape[1]), np.float32))
        kept_rows += [number for number, _ in new_rows]

    if cfg.exclude and model is not None:
        vectors, names = _exclusion_vectors(cfg.exclude, model, cfg, sets[0].image_size)
        numbers = [n for n, r in enumerate(rows) if r["status"] == "kept"]
        if numbers and len(vectors):
            best, which = _best_match(np.stack([all_centres[n] for n in numbers]), vectors)
            for n, b, w in zip(numbers, best, which):
                if b >= cfg.param2:
                    rows[n].update(status="excluded", output_path="", cosine=float(b), collided_with=names[w],
                                   reason=f"cosine {b:.4f} >= param2 {cfg.param2} with {names[w]}")
        by_id = {r["item_id"]: r for r in rows}
        for row in rows:  # identities merged into an excluded one go with it
            if row["status"] == "merged":
                first = by_id[row["collided_with"]]
                if first["status"] == "excluded":
                    row.update(status="excluded", output_path="", reason=f"merged into {first['item_id']}, which is excluded")

    new_label = 0
    first_of: dict[str, int] = {}
    for row in rows:
        if row["status"] == "kept":
            row["new_label"] = new_label
            first_of[row["item_id"]] = new_label
            new_label += 1
    for row in rows:
        if row["status"] == "merged":
            row["new_label"] = first_of[row["collided_with"]]
    return rows


def _write(sets: list[_Dataset], rows: list[dict[str, Any]], out: Path, size: tuple[int, int], cfg: MergeConfig) -> None:
    """Copy the records of the kept identities (and those merged into them) into ``out``."""
    members = {ds.item_id(label): (ds, ds.members[i]) for ds in sets for i, label in enumerate(ds.classes)}
    groups: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    for row in rows:
        if row["new_label"] >= 0:
            groups.setdefault(row["new_label"], []).append(row["item_id"])
            names.setdefault(row["new_label"], row["identity"])
    if not groups:
        raise ValueError("merge: every identity was dropped or excluded; nothing to write")
    readers = {ds.number: MXRecordIO(ds.rec.rec_path, "r") for ds in sets}
    try:
        with InsightFaceRecWriter(out, image_size=size, label_format=cfg.label_format, num_classes=len(groups),
                                  meta_last=True) as writer:
            for label in sorted(groups):
                for item_id in groups[label]:
                    ds, positions = members[item_id]
                    for pos in positions:
                        writer.add_record(readers[ds.number].read_at(int(ds.rec.offsets[pos])), label=label)
    finally:
        for reader in readers.values():
            reader.close()
    uses = Counter(names.values())  # concatenation can bring one name twice: tell them apart
    write_labels(out / LABELS_FILE, {(name if uses[name] == 1 else f"{name}#{label}"): label for label, name in names.items()})


def _result(out: Path, summary: dict, skipped: bool) -> MergeResult:
    return MergeResult(out_dir=out, rec_path=out / REC_FILE, idx_path=out / IDX_FILE, property_path=out / PROPERTY_FILE,
                       manifest_path=out / MANIFEST_FILE, images=int(summary["images"]),
                       identities=int(summary["identities"]), image_size=tuple(summary["image_size"]),
                       counts=dict(summary["counts"]), skipped=skipped)


@task(name="merge", cache_policy=NO_CACHE)
def merge_task(datasets: Sequence[str], out_dir: str | os.PathLike, cfg: MergeConfig | None = None,
               force: bool = False) -> MergeResult:
    """:func:`run_merge`; Skipped in the UI when up to date."""
    return finished(run_merge(datasets, out_dir, cfg, force=force))


def run_command(args: argparse.Namespace) -> int:
    """``facepipe merge`` / ``python -m tasks.merge`` with parsed arguments."""
    cfg = cli.config_from_args(args, MergeConfig)
    result = run_merge([d for d in args.include.split(",") if d], args.output, cfg, force=args.force)
    print(json.dumps({"rec": str(result.rec_path), "images": result.images, "identities": result.identities,
                      "counts": result.counts, "skipped": result.skipped}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("merge", run_command, argv)

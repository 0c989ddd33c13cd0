"""MegaFace stage: an embedding model on FaceScrub-style probes against distractors (spec 6).

Image sets (:class:`ImageSet`), probes and distractors alike:

* an image list (``facescrub_lst``, ``megaface_lst``): one path per line relative to ``root``
  (default: the list's folder), images already aligned to the model's input size (112x112), read
  with OpenCV as ``gen_megaface.py`` does (Pillow for formats OpenCV cannot read); never resized. A
  probe's identity is its folder name (``<name>/<file>``).
* an InsightFace ``.rec`` set (dataset folder or ``.rec`` path): image ``i`` is named
  ``<label>/<key>.jpg``; a probe's identity is its label's name in ``labels.csv`` beside the
  ``.rec`` when there is one, else the label.

Steps: extract flip-fused features (:mod:`tasks.evaluation.embed`) in chunks, decoding on threads, into
``features/probes.npy`` and ``features/distractors.npy`` (float32 ``(N, D)`` ``.npy``, written through
a memory map, so 1,000,000 distractors never sit in memory as images; an interrupted extraction
resumes at its last finished chunk); optional noise removal with InsightFace's lists
(:func:`tasks.evaluation.megaface.remove_noises`, 513-d features); rank-N identification over the distractor
sizes (the first N distractors of the list; sizes beyond the list are replaced by the list's length)
and TAR at ``far`` (and at ``roc_fars``) from one pass (:mod:`tasks.evaluation.megaface`).

Output (``out_dir``): ``megaface.parquet`` (one row per distractor size: ``distractors``,
``rank_1`` ... ``rank_10``, ``tar@far=1e-06`` with ``far_achieved``, counts, model digest,
``extract_seconds`` (feature extraction, probes and distractors) and ``seconds`` (evaluation)),
``cmc_<probe_set>_megaface_<algo>_<size>_1.json`` per size in the devkit's output shape
``{"cmc": [[ranks], [rates]], "roc": [[fars], [tars]]}`` (achieved FARs, ascending), ``features/``
with its own ``stage.json`` (reused when only evaluation settings or noise lists change), and
``stage.json`` last. ``devkit_dir``: the evaluated features (513-d after noise removal, else raw) as
devkit feature files ``<devkit_dir>/<probe_set>/<path>_<algo>.bin`` and
``<devkit_dir>/megaface/<path>_<algo>.bin`` (:mod:`datasets.megaface`), so the closed-source devkit
can run on them; that folder gets its own ``stage.json``.

Inputs of the records: the model file's sha256; per image list its sha256, root and every image's
size and mtime (a ``.rec``: its ``.idx`` sha256 and the ``.rec``'s size and mtime); the noise lists'
sha256.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    from tasks.cli import run_command_line

    run_command_line("megaface")

import argparse
import collections
import itertools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Literal, Sequence

import cv2
import numpy as np
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from datasets.atomic import atomic_paths, atomic_write_text, remove_partials
from datasets.chunked_array import ChunkedArray
from datasets.errors import FormatError
from datasets.face_codec import decode_face
from datasets.hashing import file_stats, params_hash, sha256_file
from datasets.image_size import parse_image_size
from datasets.images import decode_image
from datasets.locks import folder_lock
from datasets.megaface import feature_path, read_image_list, read_noise_list, write_feature
from datasets.rec_dataset import RecFaceDataset
from datasets.rec_layout import LABELS_FILE, PROPERTY_FILE, read_labels, rec_paths
from tasks.evaluation.config import ExtractionConfig, ImageSet, MegaFaceConfig
from tasks.evaluation.model import EvalModel, ModelSource, load_eval_model, model_digest, rows_table
from tasks.evaluation.megaface import identification, noisy_distractors, noisy_probes, remove_noises, verification_roc
from tasks import cli
from tasks.runtime import Progress, finished, logger, publish_table
from tasks.stage import code_version, commit_record, current_record, invalidate
from tasks.evaluation.pairs import far_key

__all__ = ["STAGE", "FEATURES_STAGE", "DEVKIT_STAGE", "METRICS_FILE", "ImageSet", "MegaFaceConfig", "ImageSource",
           "MegaFaceResult", "open_image_set", "run_megaface", "cmc_file_name", "megaface_task", "main"]

STAGE = "megaface"
FEATURES_STAGE = "megaface-features"
DEVKIT_STAGE = "megaface-devkit"
METRICS_FILE = "megaface.parquet"
FEATURES_DIR = "features"
PROBES_FILE, DISTRACTORS_FILE = "probes.npy", "distractors.npy"
_CODE_MODULES = ("tasks.megaface", "tasks.evaluation.megaface", "tasks.evaluation.model", "tasks.evaluation.embed", "datasets.megaface")
_FEATURE_CODE_MODULES = ("tasks.evaluation.model", "tasks.evaluation.embed", "datasets.normalization")


@dataclass
class ImageSource:
    """An opened image set: ``names`` (relative paths), ``identities`` (one per image), ``stamp`` (a
    digest of the set's files) and ``read(i, (H, W))`` -> image ``i`` as ``(H, W, 3)`` uint8 RGB."""

    what: str
    source: Path
    names: list[str]
    identities: list[str]
    stamp: str
    read: Callable[[int, tuple[int, int]], np.ndarray]

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class MegaFaceResult:
    """Outcome of :func:`run_megaface`: metric rows (one per distractor size) and the written files."""

    out_dir: Path
    metrics_path: Path
    json_paths: list[Path]
    rows: list[dict[str, Any]]
    skipped: bool
    features_skipped: bool
    devkit_dir: Path | None


# --- image sets -------------------------------------------------------------------------------------


def _read_list_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    data = path.read_bytes()
    try:
        rgb = decode_face(data, path)
    except FormatError:
        rgb = decode_image(path, data).pixels  # what OpenCV cannot read (GIF, ...), or Pillow names the reason
    if rgb.shape[:2] != tuple(size):
        raise FormatError(path, f"image is {rgb.shape[0]}x{rgb.shape[1]}",
                          f"{size[0]}x{size[1]} aligned faces (the model's input size; MegaFace images are not resized)")
    return rgb


def _list_source(spec: ImageSet, what: str, need_identity: bool) -> ImageSource:
    path = Path(spec.path).resolve()
    root = Path(spec.root).resolve() if spec.root else path.parent
    names = read_image_list(path)
    if not names:
        raise FormatError(path, f"{what} image list is empty", "one relative image path per line")
    stats, missing = file_stats(root, names)
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} of {len(names)} listed {what} images do not exist under {root}, "
                                f"e.g. {', '.join(repr(m) for m in missing[:5])}")
    identities = [PurePosixPath(n).parent.name for n in names]
    if need_identity:
        flat = [n for n, i in zip(names, identities) if not i]
        if flat:
            raise FormatError(path, f"{what} {flat[0]!r} is not in an identity folder ({len(flat)} such lines)",
                              "<identity>/<file> per line")
    stamp = params_hash({"list": sha256_file(path), "root": str(root), "files": params_hash(stats, 32)}, 32)
    return ImageSource(what, path, names, identities, stamp, lambda i, size: _read_list_image(root / names[i], size))


def _rec_source(path: Path, what: str) -> ImageSource:
    rec_path, idx_path, prop_path = rec_paths(path)
    dataset = RecFaceDataset(path, normalize=None)
    keys, labels = dataset.index.keys, dataset.index.labels
    label_names = {label: name for name, label in read_labels(rec_path.parent / LABELS_FILE).items()} \
        if (rec_path.parent / LABELS_FILE).is_file() else {}
    names = [f"{int(label)}/{int(key)}.jpg" for key, label in zip(keys.tolist(), labels.tolist())]
    identities = [label_names.get(int(label), str(int(label))) for label in labels.tolist()]
    if not names:
        raise FormatError(rec_path, f"{what} set holds no images", "an InsightFace .rec with image records")
    st = rec_path.stat()
    stamp = params_hash({"idx": sha256_file(idx_path), "rec": [str(rec_path), st.st_size, st.st_mtime_ns],
                         "property": sha256_file(prop_path) if prop_path.is_file() else ""}, 32)
    prop = dataset.index.property

    def read(i: int, size: tuple[int, int]) -> np.ndarray:
        if prop is not None and (prop.height, prop.width) != tuple(size):
            raise FormatError(rec_path.parent / PROPERTY_FILE, f"images are {prop.height}x{prop.width}",
                              f"{size[0]}x{size[1]}, the model's input size")
        dataset.image_size = tuple(size)
        return dataset.decode(i)

    return ImageSource(what, rec_path, names, identities, stamp, read)


def open_image_set(spec: ImageSet | str | os.PathLike, what: str = "probe", *, need_identity: bool = False) -> ImageSource:
    """Open an image list or a ``.rec`` set (see the module docstring). Raises naming the file for
    an empty list, missing images (a few named) and, with ``need_identity``, a path without folder."""
    spec = spec if isinstance(spec, ImageSet) else ImageSet(path=os.fspath(spec))
    path = Path(spec.path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} set not found (expected an image list or a .rec set)")
    if path.is_dir() or path.suffix == ".rec":
        return _rec_source(path, what)
    return _list_source(spec, what, need_identity)


# --- features ---------------------------------------------------------------------------------------


def _decoded_batches(images: ImageSource, start: int, batch_size: int, size: tuple[int, int], threads: int
                     ) -> Iterator[np.ndarray]:
    """``(b, H, W, 3)`` uint8 batches of images ``start ...``, each decoded on a pool thread, up to
    ``2 * threads`` batches ahead."""
    n = len(images)

    def load(lo: int) -> np.ndarray:
        return np.stack([images.read(i, size) for i in range(lo, min(lo + batch_size, n))])

    starts = iter(range(start, n, batch_size))
    with ThreadPoolExecutor(threads, thread_name_prefix=f"megaface-decode-{images.what}") as pool:
        pending = collections.deque(pool.submit(load, lo) for lo in itertools.islice(starts, 2 * threads))
        try:
            while pending:
                batch = pending.popleft().result()
                nxt = next(starts, None)
                if nxt is not None:
                    pending.append(pool.submit(load, nxt))
                yield batch
        finally:
            for future in pending:
                future.cancel()


def _embed_set(model: EvalModel, images: ImageSource, target: Path, key: str, cfg: MegaFaceConfig) -> None:
    """Write the features of ``images`` to ``target`` (``.npy``, float32 ``(N, D)``), resuming a run with
    the same ``key`` at its last finished chunk."""
    n = len(images)
    store = ChunkedArray(target, n, key)
    done = store.done
    if done:
        logger().info("megaface: resuming %s features at %d of %d", images.what, done, n)
    per_chunk = max(1, cfg.chunk_images // cfg.batch_size)
    progress = Progress(f"megaface-embed-{images.what}", total=n, description=f"megaface: embed {images.what}s")
    batches = _decoded_batches(images, done, cfg.batch_size, model.image_size, cfg.decode_threads)
    try:
        pos = done
        while pos < n:
            stop = min(pos + per_chunk * cfg.batch_size, n)
            emb = model.embed(itertools.islice(batches, math.ceil((stop - pos) / cfg.batch_size)), cfg).fused
            if emb.shape[0] != stop - pos:
                raise RuntimeError(f"megaface: {emb.shape[0]} features for {images.what}s {pos}..{stop - 1}")
            store.write(pos, emb)
            pos = stop
            progress.update(pos)
    finally:
        try:
            batches.close()
        except ValueError:  # still running in a reader thread after an error; it ends with that thread
            pass
    store.finish()


def _features(model: ModelSource, digest: str, probes: ImageSource, distractors: ImageSource, folder: Path,
              cfg: MegaFaceConfig, force: bool) -> tuple[dict[str, Any], float, bool]:
    """Make ``folder/probes.npy`` and ``folder/distractors.npy`` current; ``(model description, seconds the
    extraction took, skipped)``."""
    params = {"extraction": cfg.model_dump(mode="json", include=set(ExtractionConfig.model_fields))}
    inputs = {"model": digest, "probes": probes.stamp, "distractors": distractors.stamp}
    code = code_version(*_FEATURE_CODE_MODULES)
    if force:
        invalidate(folder)
        for name in (PROBES_FILE, DISTRACTORS_FILE):
            (folder / f"{name}.progress.json").unlink(missing_ok=True)  # no resume either
    else:
        record = current_record(folder, FEATURES_STAGE, params, inputs, code)
        if record is not None:
            logger().info("megaface: features in %s are up to date", folder)
            return record.summary["model"], float(record.summary["seconds"]), True
    folder.mkdir(parents=True, exist_ok=True)
    remove_partials(folder)
    loaded = load_eval_model(model, cfg, digest=digest)
    logger().info("megaface: %s (%s, %s input %dx%d): %d probes, %d distractors", loaded.name, loaded.kind,
                  loaded.normalize, *loaded.image_size, len(probes), len(distractors))
    key = params_hash({"params": params, "inputs": inputs, "code": code}, 32)
    start = time.perf_counter()
    _embed_set(loaded, probes, folder / PROBES_FILE, key, cfg)
    _embed_set(loaded, distractors, folder / DISTRACTORS_FILE, key, cfg)
    summary = {"model": loaded.describe(), "seconds": time.perf_counter() - start}
    commit_record(folder, FEATURES_STAGE, params, inputs, code, [PROBES_FILE, DISTRACTORS_FILE], summary=summary)
    return summary["model"], summary["seconds"], False


# --- evaluation -------------------------------------------------------------------------------------


def _eval_sizes(requested: Sequence[int], available: int) -> list[int]:
    """Requested sizes that fit; the list's length stands in for the ones that do not."""
    sizes = sorted({int(s) for s in requested if 0 < int(s) <= available})
    if not sizes or any(int(s) > available for s in requested):
        sizes = sorted({*sizes, available})
    return sizes


def cmc_file_name(probe_set: str, algo: str, size: int) -> str:
    """The devkit's result name: ``cmc_facescrub_megaface_<algo>_<size>_1.json``."""
    return f"cmc_{probe_set}_megaface_{algo}_{size}_1.json"


def _write_devkit(folder: Path, probes: ImageSource, probe_feats: np.ndarray, distractors: ImageSource,
                  distractor_feats: np.ndarray, cfg: MegaFaceConfig, size: tuple[int, int]) -> int:
    """Write one devkit feature file per image; returns the number of files."""
    suffix_size = size if cfg.devkit_size_suffix else None
    sets = [(folder / cfg.probe_set, probes.names, probe_feats), (folder / "megaface", distractors.names, distractor_feats)]
    blocks = [(root, names, feats, lo, min(lo + 512, len(names))) for root, names, feats in sets for lo in range(0, len(names), 512)]

    def write(block: tuple) -> int:
        root, names, feats, lo, hi = block
        for i in range(lo, hi):
            write_feature(feature_path(root, names[i], cfg.algo, suffix_size), feats[i])
        return hi - lo

    total = len(probes) + len(distractors)
    progress = Progress("megaface-devkit", total=total, description="megaface: devkit feature files")
    done = 0
    with ThreadPoolExecutor(max(4, cfg.decode_threads)) as pool:  # one fsync per file: threads overlap them
        for number, count in enumerate(pool.map(write, blocks), 1):
            done += count
            if number % 20 == 0 or done == total:
                progress.update(done)
    return total


def run_megaface(
    model: ModelSource,
    probes: ImageSet | str | os.PathLike,
    distractors: ImageSet | str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: MegaFaceConfig | None = None,
    *,
    force: bool = False,
) -> MegaFaceResult:
    """Evaluate ``model`` (checkpoint or ``.onnx`` path, or an ``nn.Module``) on MegaFace-style sets into
    ``out_dir`` (see the module docstring). Noise lists are checked against the sets before any
    feature is extracted. Skipped when the record matches; ``force`` redoes extraction and evaluation.
    Holds ``out_dir``'s lock (:func:`datasets.locks.folder_lock`) while it runs.
    """
    cfg = cfg or MegaFaceConfig()
    out = Path(out_dir).resolve()
    with folder_lock(out, STAGE):  # a second megaface into out_dir fails at once (FolderBusy)
        return _run_megaface_locked(model, probes, distractors, out, cfg, force=force)


def _run_megaface_locked(model: ModelSource, probes: ImageSet | str | os.PathLike, distractors: ImageSet | str | os.PathLike,
                         out: Path, cfg: MegaFaceConfig, *, force: bool) -> MegaFaceResult:
    probe_set = open_image_set(probes, "probe", need_identity=True)
    distractor_set = open_image_set(distractors, "distractor")
    probe_noise = read_noise_list(cfg.probe_noise) if cfg.probe_noise else set()
    distractor_noise = read_noise_list(cfg.distractor_noise) if cfg.distractor_noise else set()
    try:
        noisy_p = noisy_probes(probe_set.names, probe_noise, strict=cfg.strict_noise)
        noisy_d = noisy_distractors(distractor_set.names, distractor_noise, strict=cfg.strict_noise)
    except ValueError as exc:
        lists = " / ".join(p for p in (cfg.probe_noise, cfg.distractor_noise) if p)
        raise ValueError(f"{lists}: {exc}") from None

    digest = model_digest(model)
    inputs = {"model": digest, "probes": probe_set.stamp, "distractors": distractor_set.stamp,
              "probe_noise": sha256_file(cfg.probe_noise) if cfg.probe_noise else "",
              "distractor_noise": sha256_file(cfg.distractor_noise) if cfg.distractor_noise else ""}
    params = {"config": cfg.model_dump(mode="json", exclude={"devkit_dir", "decode_threads", "chunk_images"})}
    code = code_version(*_CODE_MODULES)
    devkit = Path(cfg.devkit_dir).resolve() if cfg.devkit_dir else None
    if force:
        invalidate(out)
        if devkit is not None:
            invalidate(devkit)
    else:
        record = current_record(out, STAGE, params, inputs, code)
        devkit_ok = devkit is None or current_record(devkit, DEVKIT_STAGE, params, inputs, code) is not None
        if record is not None and devkit_ok:
            rows = pq.read_table(out / METRICS_FILE).to_pylist()
            logger().info("megaface: %s is up to date (rank-1 %s)", out, {r["distractors"]: round(r["rank_1"], 5) for r in rows if "rank_1" in r})
            return MegaFaceResult(out, out / METRICS_FILE, [out / n for n in record.outputs if n.endswith(".json")], rows,
                                  skipped=True, features_skipped=True, devkit_dir=devkit)
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)
    description, extract_seconds, features_skipped = _features(model, digest, probe_set, distractor_set, out / FEATURES_DIR, cfg, force)

    start = time.perf_counter()
    probe_feats = np.load(out / FEATURES_DIR / PROBES_FILE)
    distractor_feats = np.load(out / FEATURES_DIR / DISTRACTORS_FILE, mmap_mode="c")  # copy-on-write: torch wants writable arrays
    if probe_noise or distractor_noise:
        probe_feats, distractor_feats = remove_noises(
            probe_feats, probe_set.names, probe_set.identities, distractor_feats, distractor_set.names,
            probe_noise, distractor_noise, cfg.noise_seed, strict=cfg.strict_noise)
    if devkit is not None:
        count = _write_devkit(devkit, probe_set, probe_feats, distractor_set, distractor_feats, cfg,
                              tuple(parse_image_size(description["image_size"])))
        commit_record(devkit, DEVKIT_STAGE, params, inputs, code, [], summary={"files": count})
    sizes = _eval_sizes(cfg.sizes, len(distractor_set))
    ident = identification(probe_feats, probe_set.identities, distractor_feats, sizes, cfg.ranks,
                           metric=cfg.metric, device=cfg.device)
    roc = verification_roc(probe_feats, probe_set.identities, distractor_feats, sorted({cfg.far, *cfg.roc_fars}),
                           sizes, metric=cfg.metric, device=cfg.device)
    seconds = time.perf_counter() - start

    rows, json_names = [], []
    for size in ident.sizes:
        main_hit = roc[size][float(cfg.far)]
        rows.append({**description, "probe_set": cfg.probe_set, "algo": cfg.algo, "distractors": size,
                     "probes": len(probe_set), "probe_identities": ident.n_identities, "pairs": ident.n_pairs,
                     **{f"rank_{r}": float(v) for r, v in zip(ident.ranks, ident.cmc[size])},
                     far_key(cfg.far): None if main_hit is None else main_hit.tar,
                     "far_achieved": None if main_hit is None else main_hit.far,
                     "noisy_probes": int(noisy_p.sum()), "noisy_distractors": int(noisy_d[:size].sum()),
                     "metric": cfg.metric, "flip": cfg.flip, "precision": cfg.precision, "extract_seconds": extract_seconds,
                     "seconds": seconds})
        points = sorted((hit.far, hit.tar) for hit in roc[size].values() if hit is not None)
        doc = {"cmc": [list(ident.ranks), [float(v) for v in ident.cmc[size]]],
               "roc": [[p[0] for p in points], [p[1] for p in points]]}
        name = cmc_file_name(cfg.probe_set, cfg.algo, size)
        atomic_write_text(out / name, json.dumps(doc))
        json_names.append(name)
        logger().info("megaface: %d distractors: rank-1 %.5f, TAR@FAR=%g %s", size, rows[-1]["rank_1"] if 1 in ident.ranks else float("nan"),
                      cfg.far, "n/a" if main_hit is None else f"{main_hit.tar:.5f}")
    with atomic_paths(out / METRICS_FILE) as (tmp,):
        pq.write_table(rows_table(rows), tmp)
    summary = {"rank_1": {r["distractors"]: r.get("rank_1") for r in rows}, "notes": list(ident.notes)}
    commit_record(out, STAGE, params, inputs, code, [METRICS_FILE, *json_names], summary=summary)
    return MegaFaceResult(out, out / METRICS_FILE, [out / n for n in json_names], rows, skipped=False,
                          features_skipped=features_skipped, devkit_dir=devkit)


def _table_rows(rows: Sequence[dict[str, Any]], far: str) -> list[dict[str, Any]]:
    return [{"model": r["model"], "model_kind": r.get("model_kind"), "distractors": r["distractors"], "rank_1": round(r["rank_1"], 5) if "rank_1" in r else None,
             far: None if r.get(far) is None else round(r[far], 5), "probes": r["probes"], "pairs": r["pairs"]}
            for r in rows]


@task(name="megaface", cache_policy=NO_CACHE)
def megaface_task(model: str, probes: ImageSet | str, distractors: ImageSet | str, out_dir: str,
                  cfg: MegaFaceConfig | None = None, force: bool = False) -> MegaFaceResult:
    """:func:`run_megaface`; publishes the ``megaface-metrics`` table; Skipped when up to date."""
    cfg = cfg or MegaFaceConfig()
    result = run_megaface(model, probes, distractors, out_dir, cfg, force=force)
    name = result.rows[0]["model"] if result.rows else str(model)
    publish_table("megaface-metrics", _table_rows(result.rows, far_key(cfg.far)),
                  description=f"{name}: MegaFace rank-1 identification and TAR@FAR per distractor count")
    return finished(result)


def run_command(args: argparse.Namespace) -> int:
    """``facepipe megaface`` / ``python -m tasks.megaface`` with parsed arguments."""
    cfg = cli.config_from_args(args, MegaFaceConfig)
    result = run_megaface(cli.existing_model(args.model), ImageSet(path=args.probes, root=args.probe_root),
                          ImageSet(path=args.distractors, root=args.distractor_root), args.out_dir, cfg, force=args.force)
    print(json.dumps({"metrics": str(result.metrics_path), "skipped": result.skipped,
                      "rank_1": {r["distractors"]: r.get("rank_1") for r in result.rows}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("megaface", run_command, argv)

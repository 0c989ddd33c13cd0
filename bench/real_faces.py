"""Real faces: a trained model against classical baselines on people it never saw (``faces_dev``).

    python bench/real_faces.py                                   # preset small-real, 3 folds x 3 seeds
    python bench/real_faces.py --preset cpu-demo --seeds 0 --folds 1,2 --set max_steps=200

Data: ``../shared/data/faces_dev`` (the Yale Face Database, 15 people x 10-11 greyscale GIFs; its
README holds the licence: the photos are read from there and never copied into the repository).
The real align stage (:func:`tasks.alignment.run_align`: MTCNN, 5-point similarity warp to 112x112,
GIFs decoded by :mod:`datasets.images`) runs once into ``--scratch`` (cached by its stage record).

Protocol, fixed before any measurement:

* identities sorted by name; fold ``f`` (1..3) holds people ``5(f-1)+1 .. 5f`` out as **unseen** test
  people and trains on the other 10, so every person is unseen exactly once (``--people-seed N``
  shuffles the people first: other groups, to check that a recipe is not tuned to this split);
* pairs over the 5 unseen people: every same-person pair (~240) and as many different-person pairs
  drawn at random (seed 0, fixed per fold), shuffled; InsightFace's 10-fold accuracy
  (:func:`tasks.evaluation.pairs.evaluate_verification`: threshold chosen on 9 folds, applied to the 10th);
* the model: ``tasks.training.train`` with the preset on the 10 train people (packed with the real
  ``.rec`` writer at the preset's image size), flip-fused embeddings of the unseen people;
* baselines on the same pairs and protocol, fit on the train people only, on the aligned faces as
  greyscale 56x56 vectors: raw-pixel cosine; eigenfaces (PCA, every component the ~100 train images
  give, cosine after centring); whitened eigenfaces (the same, each component divided by its
  standard deviation). Keeping all components is the strongest setting of the whitened baseline on
  these folds (k = 20, 50, 80, all gave 0.75, 0.81, 0.85, 0.87 on average): the baseline is not
  handicapped (``--pca-k`` chooses fewer).

Printed and written to ``bench/results/real_faces.json``: accuracy +- std per method per fold and
seed, the mean over folds and seeds, the model's margin over each baseline, wall times, and the model's
embeddings whitened on the train people (:func:`whiten`, the eigenface step on the model's output:
``model_whitened``, a finding, not the preset's model); a ROC plot
of the model against the baselines (pairs of all folds pooled, first seed) in
``bench/results/real_faces_roc.png``. Folds can run in separate processes (``--folds 1 --output
real_faces_f1`` ...) and be summarised together (``--combine real_faces_f1,real_faces_f2,real_faces_f3``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FACES_DEV = REPO.parent / "shared" / "data" / "faces_dev"
DEFAULT_SCRATCH = Path(os.environ.get("FACEPIPE_SCRATCH", Path.home() / ".cache" / "facepipe" / "real_faces"))
FOLDS = 3
BASELINE_SIZE = (56, 56)
BASELINES = ("raw_pixels", "eigenfaces", "whitened_eigenfaces")


@dataclass
class Faces:
    """Aligned faces: ``images`` ``(N, 112, 112, 3)`` uint8 RGB, ``labels`` ``(N,)`` int, ``people`` names."""

    images: np.ndarray
    labels: np.ndarray
    people: list[str]
    files: list[str]


def load_aligned(raw_dir: Path = FACES_DEV, scratch: Path = DEFAULT_SCRATCH) -> Faces:
    """Align ``raw_dir`` with the real align stage into ``scratch/aligned`` (once) and load the faces."""
    import pandas as pd

    from tasks.alignment import AlignConfig, run_align

    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: faces_dev is not there (see bench/real_faces.py)")
    out = scratch / "aligned"
    result = run_align(raw_dir, out, AlignConfig(device="cpu"))
    manifest = pd.read_parquet(result.manifest_path)
    ok = manifest[manifest.status == "ok"].sort_values("source_path")
    people = sorted(ok.identity.unique())
    images = np.stack([cv2.imread(str(out / p))[:, :, ::-1] for p in ok.output_path])
    labels = np.array([people.index(i) for i in ok.identity])
    return Faces(images, labels, people, list(ok.source_path))


def shuffle_people(faces: Faces, seed: int) -> Faces:
    """``faces`` with its people in a random order (``seed``), so that the folds' contiguous blocks group
    other people together: a check that a recipe is not tuned to the fixed split."""
    order = np.random.default_rng(seed).permutation(len(faces.people))  # new position -> old person
    new_label = np.argsort(order)  # old person -> new position
    return Faces(faces.images, new_label[faces.labels], [faces.people[i] for i in order], faces.files)


def fold_people(n_people: int, fold: int, folds: int = FOLDS) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` person indices of ``fold`` (1-based): contiguous blocks of sorted names are unseen."""
    per = n_people // folds
    test = np.arange((fold - 1) * per, fold * per if fold < folds else n_people)
    return np.setdiff1d(np.arange(n_people), test), test


def balanced_pairs(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All same-label pairs of ``labels`` plus as many random different-label pairs, shuffled.

    Returns ``(pairs (P, 2) int indices into labels, issame (P,) bool)``."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    i, j = np.triu_indices(n, 1)
    same = labels[i] == labels[j]
    pos = np.stack([i[same], j[same]], 1)
    neg_all = np.stack([i[~same], j[~same]], 1)
    neg = neg_all[rng.choice(len(neg_all), size=len(pos), replace=False)]
    pairs = np.concatenate([pos, neg])
    issame = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = rng.permutation(len(pairs))
    return pairs[order], issame[order]


def pair_embeddings(emb: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """``(N, D)`` L2-normalised embeddings -> ``(2P, D)`` in the pair layout of ``tasks.evaluation.pairs``."""
    return emb[pairs.reshape(-1)]


def _grey_vectors(images: np.ndarray, size: tuple[int, int] = BASELINE_SIZE) -> np.ndarray:
    grey = [cv2.resize(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), size[::-1], interpolation=cv2.INTER_AREA) for im in images]
    return np.stack(grey).reshape(len(images), -1).astype(np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def baseline_embeddings(method: str, train_images: np.ndarray, test_images: np.ndarray, k: int = 0) -> np.ndarray:
    """L2-normalised ``(N_test, D)`` embeddings of a classical baseline fit on ``train_images`` only.

    ``raw_pixels``: the greyscale 56x56 pixels; ``eigenfaces``: centred on the train mean, projected on the
    first ``k`` principal components of the train images (0: all, i.e. N_train - 1); ``whitened_eigenfaces``: the same divided by
    each component's standard deviation."""
    test = _grey_vectors(test_images)
    if method == "raw_pixels":
        return _unit(test)
    train = _grey_vectors(train_images)
    mean = train.mean(0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    k = len(s) - 1 if k <= 0 else min(k, len(s) - 1)
    proj = (test - mean) @ vt[:k].T
    if method == "whitened_eigenfaces":
        proj = proj / (s[:k] / np.sqrt(len(train) - 1))
    elif method != "eigenfaces":
        raise ValueError(f"baseline {method!r} is not one of {', '.join(BASELINES)}")
    return _unit(proj)


def whiten(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """``test`` embeddings ``(N, D)`` PCA-whitened with the train people's embeddings ``train``
    (:func:`models.whitening.fit_whitening`), L2-normalised: the whitened-eigenfaces step applied to the
    model's output."""
    import torch

    from models.whitening import fit_whitening

    w = fit_whitening(torch.from_numpy(np.asarray(train, np.float64)))
    return _unit(((torch.from_numpy(np.asarray(test, np.float32)) - w.mean) @ w.proj).double().numpy())


def pack_train(faces: Faces, people: np.ndarray, out: Path, image_size: tuple[int, int]) -> Path:
    """Pack the faces of ``people`` (labels 0..len-1) at ``image_size`` into ``out`` (InsightFace layout)."""
    from datasets.rec_layout import InsightFaceRecWriter

    marker = out / "packed.json"
    stamp = {"people": [faces.people[p] for p in people], "image_size": list(image_size), "n": int(np.isin(faces.labels, people).sum())}
    if marker.exists() and json.loads(marker.read_text()) == stamp:
        return out
    out.mkdir(parents=True, exist_ok=True)
    h, w = image_size
    with InsightFaceRecWriter(out, image_size=(h, w)) as writer:
        for new_label, person in enumerate(people):
            for im in faces.images[faces.labels == person]:
                if im.shape[:2] != (h, w):
                    im = cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA)
                ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(im[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])
                writer.add(new_label, jpeg.tobytes())
    marker.write_text(json.dumps(stamp))
    return out


def train_model(preset: str | Path, dataset: Path, output: Path, seed: int, overrides: dict[str, Any] | None = None):
    """Train ``preset`` on ``dataset`` into ``output`` (a fresh run); returns ``(TrainResult, TrainConfig)``."""
    import shutil

    from tasks.training.config import load_config
    from tasks.training.trainer import train

    if output.exists():
        shutil.rmtree(output)
    opts = {"dataset": str(dataset), "output": str(output), "seed": seed, "val_targets": [], "ckpt": 3,
            "device": "cpu", **(overrides or {})}
    cfg = load_config(preset_path(preset), opts)
    return train(cfg), cfg


def preset_path(preset: str | Path) -> Path:
    p = Path(preset)
    return p if p.suffix in (".yaml", ".yml") else REPO / "configs" / f"{preset}.yaml"


def model_embeddings(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    """Flip-fused, L2-normalised embeddings of ``images`` (112x112 RGB, resized to the model's input)."""
    from tasks.checkpoint import load_embedder
    from tasks.evaluation.embed import extract_embeddings

    module, meta = load_embedder(checkpoint)
    h, w = meta["image_size"]
    if images.shape[1:3] != (h, w):
        images = np.stack([cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA) for im in images])
    return extract_embeddings(module, images, batch_size=128, flip=True, device="cpu",
                              normalize=meta.get("normalize", "arcface")).fused


def verify(emb: np.ndarray, pairs: np.ndarray, issame: np.ndarray):
    from tasks.evaluation.pairs import evaluate_verification

    return evaluate_verification(pair_embeddings(emb, pairs), issame, nfolds=10, far_targets=(1e-1, 1e-2))


def run_fold(faces: Faces, fold: int, preset: str, seeds: list[int], scratch: Path, overrides: dict[str, Any],
             k: int, log=print) -> dict[str, Any]:
    """Baselines and the model (one run per seed) on ``fold``; accuracies, times and ROC inputs."""
    from tasks.training.config import load_config

    train_p, test_p = fold_people(len(faces.people), fold)
    test_idx = np.flatnonzero(np.isin(faces.labels, test_p))
    train_idx = np.flatnonzero(np.isin(faces.labels, train_p))
    pairs, issame = balanced_pairs(faces.labels[test_idx], seed=0)
    out: dict[str, Any] = {"fold": fold, "train_people": [faces.people[p] for p in train_p],
                           "test_people": [faces.people[p] for p in test_p], "train_images": len(train_idx),
                           "pairs": len(pairs), "same": int(issame.sum()), "methods": {}, "model_runs": [], "roc": {}}
    for method in BASELINES:
        emb = baseline_embeddings(method, faces.images[train_idx], faces.images[test_idx], k=k)
        res = verify(emb, pairs, issame)
        out["methods"][method] = {"accuracy": res.accuracy, "std": res.accuracy_std}
        out["roc"][method] = _roc(emb, pairs, issame)
        log(f"fold {fold} {method:20s} {res.accuracy:.4f} +- {res.accuracy_std:.4f}")
    size = load_config(preset_path(preset), {k2: v for k2, v in overrides.items()}).image_hw
    data = pack_train(faces, train_p, scratch / f"fold{fold}-{size[0]}x{size[1]}", size)
    for seed in seeds:
        started = time.perf_counter()
        result, cfg = train_model(preset, data, scratch / "runs" / f"fold{fold}-seed{seed}", seed, overrides)
        train_s = time.perf_counter() - started
        emb = model_embeddings(result.last_checkpoint, faces.images[test_idx])
        res = verify(emb, pairs, issame)
        whitened = verify(whiten(model_embeddings(result.last_checkpoint, faces.images[train_idx]), emb), pairs, issame)
        run = {"seed": seed, "accuracy": res.accuracy, "std": res.accuracy_std, "train_s": round(train_s, 1),
               "steps": result.step, "final_loss": result.final_loss, "whitened_accuracy": whitened.accuracy}
        out["model_runs"].append(run)
        if seed == seeds[0]:
            out["roc"]["model"] = _roc(emb, pairs, issame)
        log(f"fold {fold} model seed {seed:<3d}       {res.accuracy:.4f} +- {res.accuracy_std:.4f}  "
            f"({result.step} steps, {train_s:.0f} s, loss {result.final_loss:.3f}); whitened {whitened.accuracy:.4f}")
    out["config"] = cfg.model_dump(mode="json", exclude={"dataset", "output", "seed"})
    return out


def _roc(emb: np.ndarray, pairs: np.ndarray, issame: np.ndarray) -> dict[str, list]:
    e = pair_embeddings(emb, pairs)
    return {"dist": np.sum((e[0::2] - e[1::2]) ** 2, 1).round(5).tolist(), "issame": issame.astype(int).tolist()}


def summarize(folds: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over folds (baselines) and over folds x seeds (model), spread and margins."""
    summary: dict[str, Any] = {}
    for method in BASELINES:
        accs = [f["methods"][method]["accuracy"] for f in folds]
        summary[method] = {"accuracy": float(np.mean(accs)), "per_fold": accs}
    runs = [r for f in folds for r in f["model_runs"]]
    if all("whitened_accuracy" in r for r in runs):
        summary["model_whitened"] = {"accuracy": float(np.mean([r["whitened_accuracy"] for r in runs])),
                                     "per_fold": [float(np.mean([r["whitened_accuracy"] for r in f["model_runs"]]))
                                                  for f in folds]}
    per_seed = {}
    for r in runs:
        per_seed.setdefault(r["seed"], []).append(r["accuracy"])
    seed_means = [float(np.mean(v)) for v in per_seed.values()]
    summary["model"] = {"accuracy": float(np.mean([r["accuracy"] for r in runs])),
                        "std_over_seeds": float(np.std(seed_means)), "per_seed": {str(s): float(np.mean(v)) for s, v in per_seed.items()},
                        "per_fold": [float(np.mean([r["accuracy"] for r in f["model_runs"]])) for f in folds],
                        "min_run": float(min(r["accuracy"] for r in runs)), "max_run": float(max(r["accuracy"] for r in runs)),
                        "train_s_max": max(r["train_s"] for r in runs), "train_s_mean": float(np.mean([r["train_s"] for r in runs]))}
    summary["margins"] = {m: summary["model"]["accuracy"] - summary[m]["accuracy"] for m in BASELINES}
    return summary


def _merge_folds(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries of the same fold from separate runs (e.g. one process per seed) -> one entry per fold."""
    merged: dict[int, dict[str, Any]] = {}
    for part in sorted(parts, key=lambda f: (f["fold"], min(r["seed"] for r in f["model_runs"]))):
        if part["fold"] not in merged:
            merged[part["fold"]] = part
        else:
            merged[part["fold"]]["model_runs"] += part["model_runs"]
    return [merged[k] for k in sorted(merged)]


def plot_roc(folds: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.evaluation.pairs import roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    for name in ("model", *BASELINES):
        dist = np.concatenate([np.asarray(f["roc"][name]["dist"]) for f in folds])
        same = np.concatenate([np.asarray(f["roc"][name]["issame"], bool) for f in folds])
        far, tar, _ = roc_curve(dist, same)
        ax.plot(far, tar, label=name.replace("_", " "), lw=2 if name == "model" else 1.2)
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _parse_set(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = yaml.safe_load(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small-real", help="configs/<name>.yaml or a YAML path")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--folds", default="1,2,3")
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="override a preset option")
    parser.add_argument("--people-seed", type=int, default=0,
                        help="0: folds of people sorted by name (the protocol); N: people shuffled with seed N first")
    parser.add_argument("--pca-k", type=int, default=0, help="eigenface components (0: all)")
    parser.add_argument("--raw-dir", type=Path, default=FACES_DEV)
    parser.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH, help="aligned faces, packed folds, runs")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--output", default="real_faces", help="result name under bench/results/ ('' = none)")
    parser.add_argument("--combine", default="", metavar="NAME,NAME",
                        help="summarise earlier results (bench/results/NAME.json, e.g. one per fold) instead of running")
    args = parser.parse_args(argv)
    if args.people_seed < 0:
        parser.error(f"--people-seed {args.people_seed}: must be 0 (the protocol's split) or a positive seed")
    import torch

    torch.set_num_threads(args.threads)
    from bench.machine import RESULTS, machine, write_result

    if not args.raw_dir.is_dir():
        print(f"skipped: {args.raw_dir} is absent (faces_dev is read from ../shared/data, never bundled)")
        return 0
    print(json.dumps(machine()))
    seeds = [int(s) for s in args.seeds.split(",")]
    folds = [int(f) for f in args.folds.split(",")]
    overrides = _parse_set(args.set)
    started = time.perf_counter()
    if args.combine:  # several partial runs (e.g. one process per fold) -> one result
        parts = [json.loads((RESULTS / f"{name}.json").read_text()) for name in args.combine.split(",")]
        results = _merge_folds([f for p in parts for f in p["per_fold"]])
        seeds = sorted({r["seed"] for f in results for r in f["model_runs"]})
        folds = [f["fold"] for f in results]
        overrides, args.preset, wall = parts[0]["overrides"], parts[0]["preset"], sum(p["wall_s"] for p in parts)
    else:
        faces = load_aligned(args.raw_dir, args.scratch)
        if args.people_seed:
            faces = shuffle_people(faces, args.people_seed)
        print(f"aligned: {len(faces.images)} faces of {len(faces.people)} people ({time.perf_counter() - started:.1f} s)")
        results = [run_fold(faces, f, args.preset, seeds, args.scratch, overrides, args.pca_k) for f in folds]
        wall = time.perf_counter() - started
    summary = summarize(results)
    print(f"\npreset {args.preset} {overrides or ''}; seeds {seeds}; folds {folds}; {wall:.0f} s in all"
          + (" (sum of the combined runs)" if args.combine else ""))
    print(f"{'method':22s} {'accuracy':>9s}   per fold")
    for name in ("model", "model_whitened", *BASELINES):
        if name not in summary:
            continue
        s = summary[name]
        extra = f"  +- {s['std_over_seeds']:.4f} over seeds (runs {s['min_run']:.3f}-{s['max_run']:.3f})" if name == "model" else ""
        print(f"{name:22s} {s['accuracy']:9.4f}   {' '.join(f'{a:.4f}' for a in s['per_fold'])}{extra}")
    print("margins: " + ", ".join(f"model - {m} = {v:+.4f}" for m, v in summary["margins"].items()))
    print(f"training time per run: mean {summary['model']['train_s_mean']:.0f} s, max {summary['model']['train_s_max']:.0f} s "
          f"({args.threads} threads)")
    if args.output:
        RESULTS.mkdir(parents=True, exist_ok=True)
        roc_path = RESULTS / f"{args.output}_roc.png"
        plot_roc(results, roc_path, f"faces_dev unseen people, {args.preset}, folds {','.join(map(str, folds))} pooled, "
                                    f"seed {seeds[0]}")
        path = write_result(args.output, {"preset": args.preset, "overrides": overrides, "seeds": seeds, "folds": folds,
                                          "people_seed": args.people_seed,
                                          "pca_k": args.pca_k, "threads": args.threads, "wall_s": round(wall, 1),
                                          "load_average_1min_end": round(os.getloadavg()[0], 2),
                                          "summary": summary, "per_fold": results})
        print(f"wrote {path} and {roc_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""IJB evaluation timing: the generated test set end to end, and the engine at IJB-C size.

1. The known-answer set of the tests (``tests/ijb_data.py``: 32 loose crops, 15 templates, 105
   pairs, 9 probes) through :func:`tasks.ijb.run_ijb`, with the tests' pixel-block model and with
   an untrained MobileFaceNet ``y1`` (112x112, the real per-image cost): extraction (decode, align,
   image + mirror forward) and pooling / scoring / 1:N reported separately.
2. The metric engine (:mod:`tasks.evaluation.ijb`) on random features of IJB-C's size (469,375
   images, 23,124 templates, 15,658,489 pairs, D = 512; ``--scale`` shrinks it): image features,
   template pooling, pair scores, ROC + TAR@FAR; and ``eval_ijbc.py``'s per-template loop
   (``image2template_feature``, re-stated) on the first ``--ref-templates`` templates, extrapolated.

Run: ``python bench/ijb.py [--scale 1.0] [--ref-templates 300]``; writes bench/results/ijb.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench.machine import machine, write_result  # noqa: E402
from tasks.evaluation.ijb import FAR_TARGETS, image_features, pair_scores, pool_templates, roc_curve, tar_at_far  # noqa: E402


def generated_set(model_name: str) -> dict:
    import torch

    from eval_data import CodeEmbedder
    from ijb_data import write_ijb
    from models.backbone import get_backbone
    from tasks.ijb import IjbConfig, run_ijb

    torch.manual_seed(0)
    model = CodeEmbedder() if model_name == "code" else get_backbone(model_name).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_ijb(Path(tmp) / "ijb")
        start = time.perf_counter()
        result = run_ijb(model, root, Path(tmp) / "out", ["IJBC"], IjbConfig(device="cpu", batch_size=64))
        wall = time.perf_counter() - start
    row = result.rows[0]
    keys = ("images", "templates", "pairs", "extract_seconds", "pool_seconds", "score_seconds", "identify_seconds")
    return {"model": model_name, **{k: row[k] for k in keys}, "stage_wall_seconds": wall,
            "images_per_second": row["images"] / row["extract_seconds"]}


def engine(scale: float, ref_templates: int) -> dict:
    from ijb_data import reference_pool

    rng = np.random.default_rng(0)
    n, t, p, d = int(469_375 * scale), int(23_124 * scale), int(15_658_489 * scale), 512
    templates = rng.integers(0, t, n) + 1
    templates[:t] = np.arange(1, t + 1)  # every template has an image
    medias = templates * 7 + rng.integers(0, 4, n)  # a few medias per template, several frames each
    raw = rng.standard_normal((n, 2 * d), dtype=np.float32)
    scores = rng.uniform(0.1, 1.0, n).astype(np.float32)
    t1, t2 = rng.integers(1, t + 1, p), rng.integers(1, t + 1, p)
    labels = (rng.random(p) < 0.0125).astype(np.int64)  # IJB-C: 19,557 genuine of 15.7M
    out = {"images": n, "templates": t, "pairs": p, "dim": d}
    start = time.perf_counter()
    feats = image_features(raw, scores)
    out["image_features_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    ids, pooled = pool_templates(feats, templates, medias)
    out["pool_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    s = pair_scores(ids, pooled, t1, t2)
    out["pair_score_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    fpr, tpr, _ = roc_curve(labels, s)
    tar_at_far(fpr, tpr, FAR_TARGETS)
    out["roc_seconds"] = time.perf_counter() - start
    subset = ids[:ref_templates]
    start = time.perf_counter()
    ref = reference_pool(feats, templates, medias, subset)
    ref_seconds = time.perf_counter() - start
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.allclose(ref, pooled[:ref_templates], atol=1e-12)
    out["reference_pool_seconds_extrapolated"] = ref_seconds * len(ids) / len(subset)
    out["reference_pool_templates_measured"] = len(subset)
    out["pool_speedup"] = out["reference_pool_seconds_extrapolated"] / out["pool_seconds"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--ref-templates", type=int, default=300)
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, load {m['load_average_1min']}, GPU: {m['gpu']}")
    result: dict = {"generated_set": [generated_set(name) for name in ("code", "y1")]}
    for r in result["generated_set"]:
        print(f"generated set, {r['model']}: {r['images']} images: extract {r['extract_seconds']:.2f} s "
              f"({r['images_per_second']:.1f} img/s, image + mirror), pool {1e3 * r['pool_seconds']:.2f} ms, "
              f"score + ROC {1e3 * r['score_seconds']:.2f} ms, 1:N {1e3 * r['identify_seconds']:.2f} ms, "
              f"stage {r['stage_wall_seconds']:.1f} s")
    if not args.skip_engine:
        e = result["engine"] = engine(args.scale, args.ref_templates)
        print(f"engine at {e['images']} images / {e['templates']} templates / {e['pairs']} pairs: "
              f"features {e['image_features_seconds']:.1f} s, pool {e['pool_seconds']:.1f} s "
              f"(eval_ijbc loop ~{e['reference_pool_seconds_extrapolated']:.0f} s, {e['pool_speedup']:.0f}x), "
              f"pair scores {e['pair_score_seconds']:.1f} s, ROC + TAR {e['roc_seconds']:.1f} s")
    print(write_result("ijb", result))


if __name__ == "__main__":
    main()

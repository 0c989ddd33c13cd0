"""Cost of the loader augmentations: images/s of ``RecFaceDataset[i]`` (decode + augment + CHW copy) on one core.

    python bench/augment.py                              # off, each augmentation alone, all together
    python bench/augment.py --baseline /path/to/main     # also the same loop in another checkout (before the hook)

Runs the configurations interleaved (``--rounds`` times, best of each), on a ``.rec`` of 112x112 generated
faces (``datasets.synthetic``, written once under ``--data``), through the same DataLoader path the trainer
uses with augmentation (``(index, epoch)`` items). ``--baseline`` times ``dataset[i]`` of the other
checkout in a child process, so "off" can be compared with the code before the augmentation hook.
Results: ``bench/results/augment.json``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = {
    "off": {},
    "color=1": {"color": 1},
    "color=2": {"color": 2},
    "cutoff=20": {"cutoff": 20},
    "rand_scale+shift": {"rand_scale": 0.1, "rand_shift": 0.06},
    "all (small-real)": {"color": 1, "color_jitter": 0.4, "cutoff": 20, "rand_scale": 0.1, "rand_shift": 0.06},
}

_LOOP = """
import sys, time, torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
from datasets.rec_dataset import RecFaceDataset
ds = RecFaceDataset({data!r}, normalize=None)
n = {n}
for i in range(50): ds[i % len(ds)]
t = time.perf_counter()
for i in range(n): ds[i % len(ds)]
print(n / (time.perf_counter() - t))
"""


def _faces_rec(out: Path) -> Path:
    """500 generated 112x112 faces (100 identities x 5) as JPEG records, written once into ``out``."""
    import cv2

    from datasets.rec_layout import InsightFaceRecWriter
    from datasets.synthetic import SyntheticFaces

    if (out / "train.idx").exists():
        return out
    images, labels = SyntheticFaces(100, 5, image_size=(112, 112), seed=0).render_array(workers=1)
    with InsightFaceRecWriter(out, image_size=(112, 112)) as writer:
        for image, label in zip(images, labels):
            writer.add(int(label), cv2.imencode(".jpg", np.ascontiguousarray(image[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes())
    return out


def rate(ds, n: int, tagged: bool) -> float:
    for i in range(50):
        ds[(i, 0)] if tagged else ds[i]
    start = time.perf_counter()
    for i in range(n):
        ds[(i % len(ds), 1)] if tagged else ds[i % len(ds)]
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="images per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline", type=Path, help="another checkout to time 'off' in (e.g. main before this change)")
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "facepipe" / "bench-augment")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    from bench.machine import machine, write_result
    from datasets.augment import Augmenter
    from datasets.rec_dataset import RecFaceDataset
    data = _faces_rec(args.data)
    sets = {name: RecFaceDataset(data, normalize=None, augment=Augmenter(**opts, seed=0) if opts else None)
            for name, opts in CONFIGS.items()}
    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, ds in sets.items():
            best[name] = max(best.get(name, 0.0), rate(ds, args.n, tagged=ds.augment is not None))
        if args.baseline:
            out = subprocess.run([sys.executable, "-c", _LOOP.format(repo=str(args.baseline.resolve()), data=str(data), n=args.n)],
                                 capture_output=True, text=True, check=True, cwd=args.baseline)
            best["off (baseline checkout)"] = max(best.get("off (baseline checkout)", 0.0), float(out.stdout.strip()))
    print(json.dumps(machine()))
    ref = best.get("off (baseline checkout)", best["off"])
    rows = [{"config": name, "images_per_s": round(v, 1), "relative_to_baseline": round(v / ref, 3)} for name, v in best.items()]
    for r in rows:
        print(f"{r['config']:26s} {r['images_per_s']:9.1f} images/s  x{r['relative_to_baseline']:.3f}")
    path = write_result("augment", {"args": {k: str(v) for k, v in vars(args).items()}, "results": rows,
                                    "note": "one core, 112x112 JPEG records, best of the rounds; images/s of dataset[i]"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

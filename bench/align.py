"""Detection + alignment throughput: our align stage against the plain per-photo loop.

    python bench/align.py [--device cpu|cuda|auto] [--rounds 2] [--sweep 320,480,640,800,1024,0]
                          [--refine-sweep 0,1,2,3]

* ours: ``tasks.alignment.run_align(force=True)``: hash, reduced-scale JPEG decode, downscale to
  ``max_side``, size-bucketed MTCNN batches, face choice, warp from a decode with enough
  resolution, JPEG write, manifest.
* plain: what the 2018 align scripts do for each photo: full decode, one ``MTCNN.detect`` call on
  the full-size image, the same face choice, ``warp_face`` from the full image, JPEG write.

Both sides run in the same process, alternately, ``--rounds`` times each; the best round of each
counts (the machine may be shared). Accuracy of both: landmarks found again by MTCNN on the
aligned 112x112 faces against the template points (pixels), and how far our landmarks lie from the
plain loop's in the photo (fraction of the inter-ocular distance). Prints a table and writes
``bench/results/align.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from facenet_pytorch import MTCNN  # noqa: E402

from bench.machine import machine  # noqa: E402
from datasets.face_align import TEMPLATE_112x112, choose_faces, warp_face  # noqa: E402
from datasets.images import load_image  # noqa: E402
from datasets.manifest import read_manifest  # noqa: E402
from models.face_detector import FaceDetector, resolve_device  # noqa: E402
from tasks.alignment import EXTRA_COLUMNS, STAGE, AlignConfig, run_align  # noqa: E402


def photos(raw: Path, limit: int | None) -> list[Path]:
    files = sorted(p for p in raw.rglob("*") if p.is_file() and not p.name.startswith("."))
    return files[:limit] if limit else files


def plain_loop(files: list[Path], raw: Path, out: Path, mtcnn: MTCNN, quality: int = 95) -> dict[str, np.ndarray]:
    """The per-photo reference: full decode, MTCNN on the full image, warp from it. Returns the
    chosen landmarks per relative path."""
    chosen = {}
    for path in files:
        img = cv2.cvtColor(cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        boxes, probs, points = mtcnn.detect(img, landmarks=True)
        if boxes is None:
            continue
        boxes = np.asarray(boxes, dtype=np.float64)
        i = choose_faces(boxes, np.asarray(probs, dtype=np.float64), img.shape[:2], "insightface")[0]
        landmarks = np.asarray(points[i], dtype=np.float64)
        face = warp_face(img, landmarks, (112, 112))
        rel = path.relative_to(raw)
        target = out / "images" / rel.with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(face, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        target.write_bytes(buf.tobytes())
        chosen[rel.as_posix()] = landmarks
    return chosen


def ours(raw: Path, out: Path, cfg: AlignConfig, detector: FaceDetector) -> dict[str, np.ndarray]:
    run_align(raw, out, cfg, force=True, detector=detector)
    df = read_manifest(out / "manifest.parquet", stage=STAGE, extra=EXTRA_COLUMNS)
    ok = df[df["status"] == "ok"]
    return {sp: np.asarray(lm, dtype=np.float64).reshape(5, 2) for sp, lm in zip(ok["source_path"], ok["landmarks"])}


def redetect_error(out: Path, device: torch.device, per_face: bool = False) -> dict:
    """Mean distance (112x112 px) of MTCNN landmarks on the aligned faces to the template; with
    ``per_face`` also each face's (``per_face_px``, largest first)."""
    faces = sorted((out / "images").rglob("*.jpg"))
    pad = 56
    dets = FaceDetector(device=device, max_side=0).detect([np.pad(load_image(f), ((pad, pad), (pad, pad), (0, 0))) for f in faces])
    by_face = {f.relative_to(out / "images").as_posix(): float(np.linalg.norm(d.landmarks[0] - pad - TEMPLATE_112x112, axis=1).mean())
               for f, d in zip(faces, dets) if len(d)}
    errors = list(by_face.values())
    result = {"faces": len(faces), "refound": len(errors),
              "mean_px": round(float(np.mean(errors)), 3), "median_px": round(float(np.median(errors)), 3)}
    if per_face:
        result["per_face_px"] = {k: round(v, 2) for k, v in sorted(by_face.items(), key=lambda kv: -kv[1])}
    return result


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict:
    common = sorted(set(a) & set(b))
    rel = [np.linalg.norm(a[k] - b[k], axis=1).mean() / np.linalg.norm(b[k][0] - b[k][1]) for k in common]
    return {"photos": len(common), "mean_iod_fraction": round(float(np.mean(rel)), 4), "max_iod_fraction": round(float(np.max(rel)), 4)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", type=Path, default=ROOT / "sample" / "faces" / "raw")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--max-side", type=int, default=AlignConfig().max_side)
    parser.add_argument("--batch-size", type=int, default=AlignConfig().batch_size)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads for both sides (0: torch's default)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos")
    parser.add_argument("--sweep", default="", help="comma-separated max_side values to time and check (0: none)")
    parser.add_argument("--refine-sweep", default="", help="comma-separated refine_passes values to time and check")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "align.json")
    args = parser.parse_args()

    device = resolve_device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    files = photos(args.raw, args.limit)
    work = Path(tempfile.mkdtemp(prefix="bench-align-"))
    raw = work / "raw"
    for f in files:
        (raw / f.relative_to(args.raw)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, raw / f.relative_to(args.raw))
    cfg = AlignConfig(device=device.type, max_side=args.max_side, batch_size=args.batch_size)
    info = {**machine(), "device": str(device)}
    print(f"machine: {info}")
    print(f"{len(files)} photos from {args.raw}, device {device}, max_side {cfg.max_side}, batch {cfg.batch_size}")

    mtcnn = MTCNN(keep_all=True, select_largest=False, device=device)
    detector = cfg.make_detector()
    plain_times, our_times = [], []
    plain_marks = our_marks = {}
    for r in range(args.rounds):
        shutil.rmtree(work / "plain", ignore_errors=True)
        t0 = time.perf_counter()
        plain_marks = plain_loop(files, args.raw, work / "plain", mtcnn)
        plain_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        our_marks = ours(raw, work / "ours", cfg, detector)
        our_times.append(time.perf_counter() - t0)
        print(f"round {r + 1}: plain {plain_times[-1]:.2f} s, ours {our_times[-1]:.2f} s")
    n = len(files)
    plain_ips, our_ips = n / min(plain_times), n / min(our_times)
    result = {
        "benchmark": "align",
        "machine": info,
        "photos": n,
        "device": str(device),
        "config": cfg.model_dump(mode="json"),
        "plain_images_per_s": round(plain_ips, 3),
        "ours_images_per_s": round(our_ips, 3),
        "speedup": round(our_ips / plain_ips, 2),
        "plain_seconds": [round(t, 3) for t in plain_times],
        "ours_seconds": [round(t, 3) for t in our_times],
        "landmark_error_plain": redetect_error(work / "plain", device, per_face=True),
        "landmark_error_ours": redetect_error(work / "ours", device, per_face=True),
        "ours_vs_plain_landmarks": agreement(our_marks, plain_marks),
    }
    print(f"plain loop: {plain_ips:.2f} images/s   ours: {our_ips:.2f} images/s   speedup x{result['speedup']}")
    for side in ("plain", "ours"):
        err = result[f"landmark_error_{side}"]
        print(f"re-detected landmarks vs template (px), {side}: mean {err['mean_px']}, median {err['median_px']}, "
              f"{err['refound']}/{err['faces']} found again; largest: {dict(list(err['per_face_px'].items())[:5])}")
    print(f"our landmarks vs plain, fraction of inter-ocular distance: {result['ours_vs_plain_landmarks']}")

    for key, field, values in (("max_side_sweep", "max_side", args.sweep), ("refine_sweep", "refine_passes", args.refine_sweep)):
        sweep = []
        for value in [int(v) for v in values.split(",") if v.strip()]:
            c = cfg.model_copy(update={field: value})
            out = work / f"sweep-{field}-{value}"
            t0 = time.perf_counter()
            marks = ours(raw, out, c, c.make_detector())
            seconds = time.perf_counter() - t0
            entry = {field: value, "images_per_s": round(n / seconds, 3), "faces": len(marks),
                     "landmark_error": redetect_error(out, device), "vs_plain": agreement(marks, plain_marks)}
            sweep.append(entry)
            print(f"{field} {value:>5}: {entry['images_per_s']:.2f} images/s, re-detected {entry['landmark_error']}, "
                  f"vs plain {entry['vs_plain']}")
        if sweep:
            result[key] = sweep

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

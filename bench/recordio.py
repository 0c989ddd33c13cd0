"""RecordIO reading: ours (datasets.recordio / RecFaceDataset) vs MXNet 1.9.1 and arcface_torch's path.

    python bench/recordio.py [--records 20000] [--repeats 3] [--device cpu|cuda]

Builds once (cached under ``data/bench/recordio-<N>/``) an InsightFace-layout ``train.rec`` of N
112x112 JPEG records (quality 95, 4-9 KB: crops of the real photos in sample/faces with
random scale, rotation, colour and noise), then measures in one run, on that file, one process:

1. raw ``read_idx`` + ``unpack`` records/s, random key order: ours vs ``mxnet.recordio`` (run in
   the MXNet venv of tests/mxnet_env.py);
2. training-ready images/s (flip + normalise, one core): ours (``RecFaceDataset``, float32 and
   uint8 + :func:`normalize_batch` on ``--device``) vs arcface_torch's ``MXFaceDataset`` path:
   ``mx.recordio.unpack`` + ``mx.image.imdecode`` (timed in the MXNet venv) plus ToPILImage /
   RandomHorizontalFlip / ToTensor / Normalize (torchvision, timed here on the same decoded
   images, since the MXNet venv has no torch); per-image times are added.

Prints a table with ratios and the machine, and writes ``bench/results/recordio.json``.
Targets: raw >= 3x MXNet, images >= 2x arcface_torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import mxnet_env  # noqa: E402
from bench.machine import machine  # noqa: E402
from datasets.normalization import normalize_batch  # noqa: E402
from datasets.rec_dataset import RecFaceDataset  # noqa: E402
from datasets.rec_layout import InsightFaceRecWriter, read_rec_index  # noqa: E402
from datasets.recordio import MXIndexedRecordIO, unpack  # noqa: E402

FACES = Path(os.environ.get("FACEPIPE_FACES", ROOT / "sample" / "faces"))
RESULTS = ROOT / "bench" / "results" / "recordio.json"
BUILD_VERSION = 1  # bump when the generator changes


# --- data -------------------------------------------------------------------------------------

def _sources() -> list[np.ndarray]:
    paths = sorted((FACES / "raw").glob("*/*.jpg")) + sorted((FACES / "multi").glob("*.jpg"))
    images = []
    for p in paths:
        img = cv2.imread(str(p))
        if img is not None:
            scale = 480 / max(img.shape[:2])
            images.append(cv2.resize(img, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else img)
    if not images:  # no photos: procedural textures
        rng = np.random.default_rng(0)
        images = [cv2.GaussianBlur(rng.integers(0, 256, (320, 320, 3), dtype=np.uint8), (0, 0), s) for s in (1, 2, 3, 5)]
    return images


def _face_like(rng: np.random.Generator, sources: list[np.ndarray]) -> np.ndarray:
    """One 112x112 BGR image: a random crop, rotation, colour jitter and sensor noise."""
    src = sources[int(rng.integers(len(sources)))]
    h, w = src.shape[:2]
    side = int(rng.integers(min(h, w) // 4, min(h, w) + 1))
    cy, cx = rng.uniform(side / 2, h - side / 2), rng.uniform(side / 2, w - side / 2)
    m = cv2.getRotationMatrix2D((cx, cy), rng.uniform(-20, 20), 112 / side)
    m[:, 2] += (56 - cx, 56 - cy)
    img = cv2.warpAffine(src, m, (112, 112), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    img = img.astype(np.float32) * rng.uniform(0.7, 1.3, 3) + rng.uniform(-25, 25)
    img += rng.normal(0, rng.uniform(0, 7), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def build(records: int) -> Path:
    out = ROOT / "data" / "bench" / f"recordio-{records}"
    stamp = out / "BUILT"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == BUILD_VERSION:
        return out
    print(f"building {records} JPEG records in {out} (once) ...", flush=True)
    rng = np.random.default_rng(2018)
    sources = _sources()
    with InsightFaceRecWriter(out, label_format="array") as writer:
        for i in range(records):
            ok, jpg = cv2.imencode(".jpg", _face_like(rng, sources), [cv2.IMWRITE_JPEG_QUALITY, 95])
            writer.add(i // 20, jpg.tobytes())  # 20 images per identity
    sizes = (out / "train.rec").stat().st_size / records
    stamp.write_text(json.dumps({"version": BUILD_VERSION, "records": records, "mean_record_bytes": sizes}))
    return out


# --- measurements -----------------------------------------------------------------------------

CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _best_rate(fn, n: int, repeats: int, clock: str) -> float:
    """Items per second of the fastest of ``repeats`` runs of ``fn`` (CPU or wall clock)."""
    now = CLOCKS[clock]
    best = float("inf")
    for _ in range(repeats):
        t = now()
        fn()
        best = min(best, now() - t)
    return n / best


def ours_raw(root: Path, order: list[int], repeats: int, clock: str) -> float:
    rec = MXIndexedRecordIO(root / "train.idx", root / "train.rec", "r")

    def run():
        read, up = rec.read_idx, unpack
        for k in order:
            up(read(k))

    return _best_rate(run, len(order), repeats, clock)


def ours_images(root: Path, order: list[int], repeats: int, clock: str, device: str) -> dict[str, float]:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    as_float = RecFaceDataset(root, flip=True, normalize="arcface")
    as_uint8 = RecFaceDataset(root, flip=True, normalize=None)
    positions = [k - 1 for k in order]  # image keys 1..N are items 0..N-1

    def float_path():
        for i in positions:
            as_float[i]

    def uint8_path():
        batch = []
        for i in positions:
            batch.append(as_uint8[i][0])
            if len(batch) == 256:
                normalize_batch(torch.stack(batch).to(device, non_blocking=True), "arcface")
                batch = []
        if batch:
            normalize_batch(torch.stack(batch).to(device), "arcface")
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return {"float32": _best_rate(float_path, len(order), repeats, clock),
            "uint8+normalize_batch": _best_rate(uint8_path, len(order), repeats, clock)}


def torchvision_transforms_rate(root: Path, order: list[int], repeats: int, clock: str) -> float:
    """ToPILImage / RandomHorizontalFlip / ToTensor / Normalize on decoded RGB images (arcface_torch)."""
    from torchvision import transforms

    torch.set_num_threads(1)
    tf = transforms.Compose([transforms.ToPILImage(), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])])
    ds = RecFaceDataset(root, normalize=None)
    sample = [ds.decode(k - 1) for k in order[:2000]]

    def run():
        for img in sample:
            tf(img)

    return _best_rate(run, len(sample), repeats, clock)


MXNET_SCRIPT = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
import mxnet as mx
idx, rec_path, order_path, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
clock = time.process_time if sys.argv[5] == "cpu" else time.perf_counter
order = json.load(open(order_path))
rec = mx.recordio.MXIndexedRecordIO(idx, rec_path, "r")
def best(fn):
    b = float("inf")
    for _ in range(repeats):
        t = clock(); fn(); b = min(b, clock() - t)
    return len(order) / b
def raw():
    for k in order:
        mx.recordio.unpack(rec.read_idx(k))
def decode():  # MXFaceDataset.__getitem__ up to the torchvision transforms
    for k in order:
        header, img = mx.recordio.unpack(rec.read_idx(k))
        label = header.label
        if not isinstance(label, float):
            label = label[0]
        mx.image.imdecode(img).asnumpy()
print(json.dumps({"raw": best(raw), "unpack+imdecode": best(decode), "version": mx.__version__}))
"""


def mxnet_rates(root: Path, order: list[int], repeats: int, clock: str) -> dict:
    order_path = root / "order.json"
    order_path.write_text(json.dumps(order))
    out = mxnet_env.run_script(MXNET_SCRIPT, str(root / "train.idx"), str(root / "train.rec"), str(order_path), str(repeats), clock, timeout=1800)
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="where normalize_batch runs for the uint8 path (cpu, cuda)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                    help="cpu: process CPU time (robust on a shared machine; the default), wall: elapsed time")
    args = ap.parse_args(argv)
    root = build(args.records)
    index = read_rec_index(root)
    order = np.random.default_rng(0).permutation(index.keys).tolist()
    mean_kb = (root / "train.rec").stat().st_size / len(order) / 1024
    sizes_kb = np.diff(np.sort(index.offsets)) / 1024
    p5, p50, p95 = np.percentile(sizes_kb, [5, 50, 95]).round(1).tolist()

    ours_raw_rate = ours_raw(root, order, args.repeats, args.clock)
    ours_img = ours_images(root, order, args.repeats, args.clock, args.device)
    tv_rate = torchvision_transforms_rate(root, order, args.repeats, args.clock)
    try:
        mx = mxnet_rates(root, order, args.repeats, args.clock)
    except mxnet_env.MXNetUnavailable as exc:
        print(f"MXNet unavailable, reference rows skipped: {exc}")
        mx = None

    rows = [("raw read_idx+unpack (records/s)", ours_raw_rate, mx and mx["raw"], "mxnet.recordio", 3.0)]
    if mx:
        arcface = 1.0 / (1.0 / mx["unpack+imdecode"] + 1.0 / tv_rate)
        rows.append(("images/s/core, float32 (flip+normalise)", ours_img["float32"], arcface, "arcface_torch MXFaceDataset", 2.0))
        rows.append((f"images/s/core, uint8 + normalize_batch on {args.device}", ours_img["uint8+normalize_batch"], arcface, "arcface_torch MXFaceDataset", 2.0))
    info = {**machine(), "opencv": cv2.__version__}
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, GPU: {info['gpu'] or 'none'}; "
          f"{len(order)} records, mean {mean_kb:.1f} KB (5/50/95%: {p5}/{p50}/{p95} KB); one process, random key order, best of {args.repeats}, "
          f"{args.clock} clock; load average {os.getloadavg()[0]:.1f}")
    print(f"{'measure':52} {'ours':>10} {'reference':>10} {'ratio':>7}  target  reference")
    result_rows = []
    for name, ours, ref, ref_name, target in rows:
        ratio = ours / ref if ref else None
        ok = "" if ratio is None else ("ok" if ratio >= target else "MISSED")
        print(f"{name:52} {ours:10.0f} {ref or float('nan'):10.0f} {ratio or float('nan'):6.2f}x  >={target:.0f}x {ok:6} {ref_name}")
        result_rows.append({"measure": name, "ours": ours, "reference": ref, "reference_name": ref_name, "ratio": ratio, "target": target})
    if mx:
        print(f"  arcface_torch parts: mx unpack+imdecode {mx['unpack+imdecode']:.0f}/s, torchvision transforms {tv_rate:.0f}/s")
    result = {"machine": info, "records": len(order), "mean_record_kb": mean_kb, "record_kb_p5_p50_p95": [p5, p50, p95], "repeats": args.repeats, "device": args.device,
              "clock": args.clock, "load_average": os.getloadavg()[0],
              "rows": result_rows, "mxnet": mx, "torchvision_transforms_per_s": tv_rate,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return result


if __name__ == "__main__":
    main()

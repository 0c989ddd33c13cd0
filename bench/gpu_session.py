"""One GPU session: every speed figure the project needs from a lent GPU, in one command of at most 8 minutes.

    bash bench/gpu_session.sh                 # on the GPU machine (device tool: carry [".whl"], timeout 600)
    bash bench/gpu_session.sh --smoke         # on the CPU: tiny networks, a few steps (tests/test_gpu_session.py)
    python bench/gpu_session.py --parts env,extract --budget 120

The parent process runs each part in a child process of its own (``--part NAME``) with its own time
cap, inside an overall budget; a part that fails, hangs or runs out of time is recorded as such and
the next part runs. Every part writes ``<out>/<part>.json`` as soon as it has results (the training
parts after each configuration), the parent writes ``<out>/summary.json`` with a verdict per target.
``<out>`` is ``$OUT`` when set (the device tool brings it back), else ``bench/results/gpu_session``.

Parts (in this order; caps in seconds on the GPU):

* ``env`` (40): GPU, driver, SM clock, torch, CUDA, cuDNN, CPU cores, /dev/shm; bf16 matmul peak
  (:func:`bench.train.matmul_peak_tflops`) and copy bandwidth (pinned host->device, device->host,
  device->device).
* ``sync-check`` (40): r50 batch 128 training steps 3-8 under ``torch.cuda.set_sync_debug_mode("warn")``:
  the number of synchronising calls inside the training step (want 0).
* ``train-eager`` (70) / ``train-compiled`` (130): the real trainer (:func:`tasks.training.trainer.train`)
  for r50 and r100, bf16, per-GPU batch 128 and 512, on a synthetic on-GPU batch (one uint8 batch
  resident on the device, so the loader is out of the picture) with Partial FC over 93,431 classes:
  median/min/max samples/s over the logged windows after the first, step ms, data-wait %, peak GiB,
  TFLOP/s and MFU against 989 TFLOP/s (H100/H200 dense bf16) and against the measured peak, compile
  seconds (first window minus a steady one).
* ``train-loader`` (50): r50 batch 512 from a real ``.rec`` through RecFaceDataset and the
  DataLoader at 8 and 16 workers, beside the synthetic figure.
* ``partial-fc`` (40): r50 batch 512 with 93,431 classes at sample rate 1.0 and 0.3.
* ``loader`` (30): loader-only images/s (decode, collate, pin) at 4, 8 and 16 workers.
* ``extract`` (60): r100 flip-test extraction images/s at batch 512 bf16 (:func:`bench.extract.bench_network`)
  and an LFW + CFP-FP + AgeDB-sized evaluation (12,000 + 14,000 + 12,000 images in three ``.bin``
  files): decode, extract, 10-fold metrics, timed together.
* ``align`` (60): MTCNN detection + alignment of the bundled photos (``sample/faces/raw``, resized to
  about 1.5 MP) on the GPU: our batched stage vs the plain facenet-pytorch loop
  (:mod:`bench.align`), images/s of both.

Targets (one H200): r50 >= 4,000 and r100 >= 2,200 samples/s; r100 flip extraction >= 3,000
images/s; the three verification sets <= 15 s; alignment >= 5x the plain loop. The verdict names
what limits a figure: the loader (data-wait above 10 %, or the real loader well below the synthetic
batch), the host (compiled much faster than eager: launch-bound), or compute.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, Python puts bench/ first on sys.path, where bench/models.py would hide the models package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (NVIDIA data sheet)
CLASSES = 93_431  # MS1M-RetinaFace identities
SMOKE_CLASSES = 64
TARGETS = {"r50_samples_per_s": 4000, "r100_samples_per_s": 2200, "r100_extract_images_per_s": 3000,
           "three_sets_s": 15.0, "align_speedup": 5.0, "step_host_syncs": 0}
PARTS: dict[str, int] = {"env": 40, "sync-check": 40, "train-eager": 70, "train-compiled": 130, "extract": 60, "align": 60,
                         "partial-fc": 40, "loader": 30, "train-loader": 50}
SMOKE_CAP = 60


def _print(*args: Any) -> None:
    print(*args, flush=True)


class Part:
    """Settings of one part run (``smoke``: CPU-sized) and its incremental JSON file."""

    def __init__(self, name: str, out: Path, smoke: bool, work: Path):
        self.name, self.out, self.smoke, self.work = name, out, smoke, work
        self.result: dict[str, Any] = {"part": name, "smoke": smoke, "status": "running"}
        import torch

        self.device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"

    def save(self, **fields: Any) -> None:
        self.result.update(fields)
        path = self.out / f"{self.name}.json"
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(self.result, indent=1, default=str) + "\n")
        os.replace(tmp, path)


# --- shared data -----------------------------------------------------------------------------------------------
def _face_like(rng, n: int, size: int = 112):
    """``n`` smooth random RGB images (uint8 ``(n, size, size, 3)``): JPEG sizes like face crops, made fast."""
    import cv2
    import numpy as np

    small = rng.integers(0, 256, (n, 14, 14, 3), dtype=np.uint8)
    return np.stack([cv2.resize(s, (size, size), interpolation=cv2.INTER_CUBIC) for s in small])


def rec_set(part: Part, images: int, classes: int) -> Path:
    """A packed ``.rec`` set of ``images`` JPEG 112x112 images with labels spread over ``classes`` (made once)."""
    import cv2
    import numpy as np

    from datasets.rec_layout import InsightFaceRecWriter

    folder = part.work / f"rec-{images}-{classes}"
    if (folder / "property").exists():
        return folder
    rng = np.random.default_rng(0)
    pixels = _face_like(rng, min(images, 512))
    payloads = [cv2.imencode(".jpg", pixels[i % len(pixels)], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
                for i in range(images)]
    labels = (np.arange(images) * classes // images).astype(np.int64)
    with InsightFaceRecWriter(folder, image_size=(112, 112), num_classes=classes) as writer:
        writer.add_many(labels, payloads)
    return folder


# --- env ---------------------------------------------------------------------------------------------------------
def part_env(part: Part) -> None:
    import torch

    from bench.machine import machine
    from bench.train import matmul_peak_tflops

    info: dict[str, Any] = {**machine(), "torch_cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    shm = shutil.disk_usage("/dev/shm") if os.path.exists("/dev/shm") else None
    info["dev_shm_gib"] = round(shm.total / 2**30, 1) if shm else None
    if part.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
        try:
            query = "name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
            line = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=20).stdout.strip().splitlines()[0]
            info.update(dict(zip(["smi_name", "driver", "sm_clock", "sm_clock_max", "power_limit", "temperature"],
                                 [v.strip() for v in line.split(",")])))
        except (OSError, IndexError, subprocess.SubprocessError) as exc:
            info["nvidia_smi"] = f"unavailable: {exc}"
    part.save(env=info)
    _print("env: " + json.dumps(info))
    peak = matmul_peak_tflops(part.device)
    part.save(matmul_bf16_tflops=round(peak, 1))
    _print(f"env: bf16 matmul peak {peak:.1f} TFLOP/s")
    part.save(bandwidth_gb_s=_bandwidth(part.device, part.smoke))
    _print("env: copy bandwidth GB/s " + json.dumps(part.result["bandwidth_gb_s"]))


def _bandwidth(device: str, smoke: bool) -> dict[str, float]:
    import torch

    n = (64 if smoke else 1024) * 2**20
    out: dict[str, float] = {}
    if device != "cuda":
        a = torch.empty(n, dtype=torch.uint8)
        b = torch.empty_like(a)
        t0 = time.perf_counter()
        for _ in range(5):
            b.copy_(a)
        out["host_to_host"] = round(5 * n / (time.perf_counter() - t0) / 1e9, 1)
        return out
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty_like(dev)
    for name, fn in {"host_to_device": lambda: dev.copy_(host, non_blocking=True),
                     "device_to_host": lambda: host.copy_(dev, non_blocking=True),
                     "device_to_device": lambda: dev2.copy_(dev)}.items():
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
        moved = 10 * n * (2 if name == "device_to_device" else 1)  # read + write on the device
        out[name] = round(moved / (time.perf_counter() - t0) / 1e9, 1)
    return out


# --- training ------------------------------------------------------------------------------------------------------
class _OnDeviceBatches:
    """Stands in for the trainer's DataLoader: the same uint8 batch, resident on the device, ``length`` times."""

    def __init__(self, images, labels, length: int):
        self.images, self.labels, self.length = images, labels, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            yield self.images, self.labels


def train_one(part: Part, network: str, batch: int, *, compiled: bool, workers: int, synthetic: bool,
              sample_rate: float = 1.0, classes: int | None = None) -> dict[str, Any]:
    """One configuration of the real trainer; samples/s over its logged windows (the first one is warm-up)."""
    classes = classes or (SMOKE_CLASSES if part.smoke else CLASSES)
    import numpy as np
    import torch

    from bench.train import model_flops_per_sample
    from tasks.training import trainer as trainer_mod
    from tasks.training.config import TrainConfig
    from tasks.training.distributed import distributed
    from tasks.training.record import read_metrics

    window, windows = (2, 2) if part.smoke else (10, 4)
    dataset = rec_set(part, images=64 if part.smoke else 16384, classes=classes)
    out = Path(tempfile.mkdtemp(prefix="train-", dir=part.work))
    cfg = TrainConfig(dataset=str(dataset), output=str(out), network=network, loss="arcface", per_batch_size=batch,
                      max_steps=window * windows, frequent=window, verbose=10**9, ckpt=0, val_targets=[],
                      device=part.device, amp="bf16" if part.device == "cuda" else "none",
                      compile=compiled and not part.smoke,  # inductor on the CPU would take minutes
                      num_workers=workers, sample_rate=sample_rate, lr=0.1, seed=0, epochs=10**6,
                      nan_max_consecutive=10**9)
    started = time.perf_counter()
    with distributed(cfg.resolve_device()) as ctx:
        trainer = trainer_mod._Trainer(cfg, ctx, None)
        if synthetic:
            g = torch.Generator().manual_seed(0)
            images = torch.randint(0, 256, (batch, 3, 112, 112), dtype=torch.uint8, generator=g).to(trainer.device)
            labels = torch.randint(0, classes, (batch,), generator=g).to(trainer.device)
            trainer.loader = _OnDeviceBatches(images, labels, trainer.steps_per_epoch)
        result = trainer.run()
    wall = time.perf_counter() - started
    rows = read_metrics(out).query("kind == 'train'")
    rates = rows["samples_per_s"].to_numpy()
    steady = rates[1:] if len(rates) > 1 else rates
    median = float(np.median(steady))
    flops = model_flops_per_sample(network, 512, int(classes * sample_rate))
    first_window_s = window * batch / rates[0]
    row = {"network": network, "batch": batch, "compiled": compiled, "data": "synthetic on-device" if synthetic else
           f".rec, {workers} workers", "classes": classes, "sample_rate": sample_rate,
           "samples_per_s": {"median": round(median, 1), "min": round(float(steady.min()), 1),
                             "max": round(float(steady.max()), 1)},
           "step_ms": round(1000 * batch / median, 2), "data_wait_pct": round(100 * float(result.data_wait or 0), 2),
           "peak_gib": round(float(rows["memory_gib"].max()), 2),
           "tflops": round(median * flops / 1e12, 1), "mfu_vs_989": round(median * flops / 1e12 / PEAK_BF16_TFLOPS, 4),
           "first_window_s": round(first_window_s, 2),
           "compile_s": round(max(0.0, first_window_s - window * batch / median), 1) if compiled else None,
           "steps": result.step, "wall_s": round(wall, 1)}
    shutil.rmtree(out, ignore_errors=True)
    return row


def _train_rows(part: Part, configs: list[dict[str, Any]]) -> None:
    peak = _measured_peak(part)
    rows = part.result.setdefault("rows", [])
    for spec in configs:
        try:
            row = train_one(part, **spec)
            if peak:
                row["mfu_vs_measured"] = round(row["tflops"] / peak, 4)
        except Exception as exc:  # one configuration failing (e.g. out of memory) keeps the others
            row = {**{k: v for k, v in spec.items()}, "error": f"{type(exc).__name__}: {exc}"[:500]}
            traceback.print_exc()
        rows.append(row)
        part.save(rows=rows)
        _print(f"{part.name}: " + json.dumps(row))
        _free()


def _measured_peak(part: Part) -> float | None:
    try:
        return float(json.loads((part.out / "env.json").read_text())["matmul_bf16_tflops"])
    except (OSError, KeyError, ValueError):
        return None


def _free() -> None:
    import gc

    import torch

    gc.collect()
    torch._dynamo.reset()  # compiled graphs of the last configuration are not reused (and not counted)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _nets(part: Part) -> list[str]:
    return ["m05"] if part.smoke else ["r50", "r100"]


def _batches(part: Part) -> list[int]:
    return [8] if part.smoke else [512, 128]


def part_sync_check(part: Part) -> None:
    """Count host synchronisations inside the trainer's step (CUDA: sync debug mode; CPU: nothing to count)."""
    import warnings

    import torch

    from tasks.training import trainer as trainer_mod

    if part.device != "cuda":
        part.save(sync_warnings=None, note="no CUDA: see tests/test_train_step_sync.py for the CPU count")
        return
    step = trainer_mod._Trainer._train_step
    messages: list[str] = []

    def strict(self, images, labels):
        if self.step < 2:  # first steps: allocations, cuDNN autotuning
            return step(self, images, labels)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                return step(self, images, labels)
        finally:
            torch.cuda.set_sync_debug_mode(0)
            messages.extend(str(w.message).splitlines()[0] for w in caught)

    trainer_mod._Trainer._train_step = strict
    try:
        row = train_one(part, "r50", 128, compiled=False, workers=0, synthetic=True, sample_rate=0.3)
    finally:
        trainer_mod._Trainer._train_step = step
    part.save(sync_warnings=len(messages), first=sorted(set(messages))[:10], steps_checked=row["steps"] - 2)
    _print(f"sync-check: {len(messages)} synchronising calls in {row['steps'] - 2} steps")


def part_train_eager(part: Part) -> None:
    _train_rows(part, [dict(network=n, batch=b, compiled=False, workers=0, synthetic=True)
                       for n in _nets(part) for b in _batches(part)])


def part_train_compiled(part: Part) -> None:
    order = [("r100", 512), ("r50", 512), ("r100", 128), ("r50", 128)] if not part.smoke else [("m05", 8)]
    _train_rows(part, [dict(network=n, batch=b, compiled=True, workers=0, synthetic=True) for n, b in order])


def part_train_loader(part: Part) -> None:
    net, batch = ("m05", 8) if part.smoke else ("r50", 512)
    workers = [1] if part.smoke else [8, 16]
    _train_rows(part, [dict(network=net, batch=batch, compiled=False, workers=w, synthetic=False) for w in workers])


def part_partial_fc(part: Part) -> None:
    net, batch = ("m05", 8) if part.smoke else ("r50", 512)
    _train_rows(part, [dict(network=net, batch=batch, compiled=False, workers=0, synthetic=True, sample_rate=r)
                       for r in (1.0, 0.3)])


def part_loader(part: Part) -> None:
    from torch.utils.data import DataLoader

    from datasets.rec_dataset import RecFaceDataset

    dataset = RecFaceDataset(rec_set(part, images=64 if part.smoke else 16384,
                                     classes=SMOKE_CLASSES if part.smoke else CLASSES), normalize=None)
    batch = 8 if part.smoke else 512
    rows = []
    for workers in ([1] if part.smoke else [4, 8, 16]):
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                            pin_memory=part.device == "cuda", persistent_workers=False, prefetch_factor=4)
        it = iter(loader)
        next(it)  # workers started
        t0 = time.perf_counter()
        count = 0
        for images, _ in it:
            count += images.shape[0]
            if time.perf_counter() - t0 > (1 if part.smoke else 6):
                break
        rate = count / (time.perf_counter() - t0)
        rows.append({"workers": workers, "batch": batch, "images_per_s": round(rate, 1)})
        part.save(rows=rows)
        _print(f"loader: {workers} workers {rate:,.0f} images/s")
        del it, loader


# --- extraction and evaluation -------------------------------------------------------------------------------------
def part_extract(part: Part) -> None:
    import numpy as np
    import torch

    from bench.extract import bench_network
    from datasets.verification_bin import decode_bin, write_bin
    from models import get_backbone
    from tasks.evaluation.embed import extract_embeddings
    from tasks.evaluation.pairs import evaluate_verification

    device = torch.device(part.device)
    net = "m05" if part.smoke else "r100"
    rng = np.random.default_rng(1)
    images = _face_like(rng, 64 if part.smoke else 4096)
    row = bench_network(net, images, [16 if part.smoke else 512], ref_batch=10, ref_images=16 if part.smoke else 1000,
                        device=device, bf16=device.type == "cuda", repeat=1 if part.smoke else 2)
    part.save(extraction=row)
    sizes = {"lfw": 12_000, "cfp_fp": 14_000, "agedb_30": 12_000}
    if part.smoke:
        sizes = {k: 40 for k in sizes}
    pool = _face_like(rng, 256)
    bins = {}
    for name, n in sizes.items():
        pairs = n // 2
        path = part.work / f"{name}.bin"
        write_bin(path, [pool[i % len(pool)] for i in range(n)], [i % 2 == 0 for i in range(pairs)])
        bins[name] = path
    model = get_backbone(net).eval().to(device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    extract_embeddings(model, images[:512], batch_size=512, device=device, amp_dtype=amp)  # warm-up, autotune
    timings = {}
    started = time.perf_counter()
    for name, path in bins.items():
        t0 = time.perf_counter()
        imgs, issame = decode_bin(path, (112, 112))
        t1 = time.perf_counter()
        emb = extract_embeddings(model, imgs, batch_size=512, device=device, amp_dtype=amp).fused
        t2 = time.perf_counter()
        evaluate_verification(emb, issame)
        t3 = time.perf_counter()
        timings[name] = {"images": len(imgs), "decode_s": round(t1 - t0, 2), "extract_s": round(t2 - t1, 2),
                         "metrics_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2)}
        _print(f"extract: {name} " + json.dumps(timings[name]))
    part.save(three_sets={"network": net, "sets": timings, "total_s": round(time.perf_counter() - started, 2)})


# --- alignment ------------------------------------------------------------------------------------------------------
def part_align(part: Part) -> None:
    import cv2
    import numpy as np
    import torch
    from facenet_pytorch import MTCNN

    from bench.align import ours, photos, plain_loop
    from tasks.alignment import AlignConfig

    device = torch.device(part.device)
    source = photos(ROOT / "sample" / "faces" / "raw", 3 if part.smoke else None)
    raw = part.work / "align-raw"
    megapixels = 0.1 if part.smoke else 1.5
    copies = 1 if part.smoke else 4
    sizes = []
    for copy in range(copies):  # every photo resized to about ``megapixels`` (upscaled if smaller), as JPEG
        for path in source:
            img = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
            scale = (megapixels * 1e6 / (img.shape[0] * img.shape[1])) ** 0.5
            img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)), interpolation=cv2.INTER_AREA)
            target = raw / f"c{copy}" / path.parent.name / (path.stem + ".jpg")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes())
            sizes.append(img.shape[0] * img.shape[1] / 1e6)
    files = photos(raw, None)
    cfg = AlignConfig(device=device.type)
    mtcnn = MTCNN(keep_all=True, select_largest=False, device=device)
    detector = cfg.make_detector()
    part.save(photos=len(files), megapixels_mean=round(float(np.mean(sizes)), 2), config=cfg.model_dump(mode="json"))
    plain_loop(files[:2], raw, part.work / "align-warm", mtcnn)  # weights on the device, kernels chosen
    times: dict[str, list[float]] = {"plain": [], "ours": []}
    for _ in range(1 if part.smoke else 2):
        shutil.rmtree(part.work / "align-plain", ignore_errors=True)
        t0 = time.perf_counter()
        found_plain = plain_loop(files, raw, part.work / "align-plain", mtcnn)
        times["plain"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        found_ours = ours(raw, part.work / "align-ours", cfg, detector)
        times["ours"].append(time.perf_counter() - t0)
        plain_ips, our_ips = len(files) / min(times["plain"]), len(files) / min(times["ours"])
        part.save(plain_images_per_s=round(plain_ips, 2), ours_images_per_s=round(our_ips, 2),
                  speedup=round(our_ips / plain_ips, 2), faces={"plain": len(found_plain), "ours": len(found_ours)},
                  seconds={k: [round(v, 2) for v in vs] for k, vs in times.items()})
        _print(f"align: plain {plain_ips:.1f} photos/s, ours {our_ips:.1f} photos/s, x{our_ips / plain_ips:.2f}")


RUNNERS: dict[str, Callable[[Part], None]] = {
    "env": part_env, "sync-check": part_sync_check, "train-eager": part_train_eager, "train-compiled": part_train_compiled,
    "train-loader": part_train_loader, "partial-fc": part_partial_fc, "loader": part_loader,
    "extract": part_extract, "align": part_align,
}


def run_part(name: str, out: Path, smoke: bool, work: Path) -> int:
    """Child process: run one part, its JSON written as it goes; status ok or failed at the end."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format=f"%(asctime)s {name}: %(message)s", force=True)
    if smoke:
        import torch

        torch.set_num_threads(1)
    part = Part(name, out, smoke, work)
    part.save()
    try:
        RUNNERS[name](part)
    except Exception as exc:
        traceback.print_exc()
        part.save(status="failed", error=f"{type(exc).__name__}: {exc}"[:1000])
        return 1
    part.save(status="ok")
    return 0


# --- parent: schedule, verdicts --------------------------------------------------------------------------------------
def _load(out: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}


def _best_train(parts: dict[str, dict[str, Any]], network: str) -> dict[str, Any] | None:
    rows = [r for p in ("train-eager", "train-compiled") for r in parts.get(p, {}).get("rows", [])
            if r.get("network") == network and "samples_per_s" in r]
    return max(rows, key=lambda r: r["samples_per_s"]["median"], default=None)


def verdicts(parts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per target: the figure, pass/fail, and what limits it."""
    out = []
    loader_rows = [r for r in parts.get("train-loader", {}).get("rows", []) if "samples_per_s" in r]
    for network, key in (("r50", "r50_samples_per_s"), ("r100", "r100_samples_per_s")):
        best = _best_train(parts, network)
        if best is None:
            out.append({"target": key, "value": None, "verdict": "not measured"})
            continue
        value = best["samples_per_s"]["median"]
        eager = [r for r in parts.get("train-eager", {}).get("rows", []) if r.get("network") == network
                 and r.get("batch") == best["batch"] and "samples_per_s" in r]
        limit = "compute"
        if best.get("data_wait_pct", 0) > 10:
            limit = "loader"
        elif best["compiled"] and eager and value > 1.3 * eager[0]["samples_per_s"]["median"]:
            limit = "compute (eager was host/launch-bound: compile pays)"
        elif not best["compiled"]:
            limit = "host/launch (eager) or compute; see train-compiled"
        if network == "r50" and loader_rows:
            real = max(r["samples_per_s"]["median"] for r in loader_rows)
            if real < 0.9 * value:
                limit += f"; with the real .rec loader {real:.0f} samples/s: loader-bound"
        out.append({"target": key, "value": value, "want": TARGETS[key], "pass": value >= TARGETS[key],
                    "config": f"{network} batch {best['batch']} {'compiled' if best['compiled'] else 'eager'}",
                    "limit": limit, "mfu_vs_989": best.get("mfu_vs_989")})
    ext = parts.get("extract", {})
    rate = None
    if ext.get("extraction"):
        rate = max((e["images_per_s"] for e in ext["extraction"]["ours"]), default=None)
    out.append({"target": "r100_extract_images_per_s", "value": None if rate is None else round(rate, 1),
                "want": TARGETS["r100_extract_images_per_s"], "pass": None if rate is None else rate >= 3000,
                "limit": "compute (two bf16 forwards per image)"})
    sets = ext.get("three_sets")
    if sets:
        decode = sum(s["decode_s"] for s in sets["sets"].values())
        total = sets["total_s"]
        out.append({"target": "three_sets_s", "value": total, "want": TARGETS["three_sets_s"], "pass": total <= 15.0,
                    "limit": "host (.bin decode)" if decode > total / 2 else "compute (extraction)"})
    else:
        out.append({"target": "three_sets_s", "value": None, "verdict": "not measured"})
    syncs = parts.get("sync-check", {}).get("sync_warnings")
    out.append({"target": "step_host_syncs", "value": syncs, "want": 0, "pass": None if syncs is None else syncs == 0,
                "limit": "host (the step waits for the GPU)" if syncs else "none"})
    align = parts.get("align", {})
    if align.get("speedup") is not None:
        out.append({"target": "align_speedup", "value": align["speedup"], "want": TARGETS["align_speedup"],
                    "pass": align["speedup"] >= 5.0,
                    "limit": "host (JPEG decode/resize, per-photo Python) unless the GPU batches are large"})
    else:
        out.append({"target": "align_speedup", "value": None, "verdict": "not measured"})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny networks and sets, few steps")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all parts (default 450; smoke 300)")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT, else bench/results/gpu_session")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # child process: run this one part
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "bench" / "results" / ("gpu_session_smoke" if args.smoke else "gpu_session"))
    out.mkdir(parents=True, exist_ok=True)
    if args.part:
        return run_part(args.part, out, args.smoke, args.work)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    budget = args.budget or (300.0 if args.smoke else 450.0)
    deadline = time.monotonic() + budget
    work = Path(tempfile.mkdtemp(prefix="facepipe-gpu-session-"))
    _print(f"gpu session: parts {', '.join(names)}; budget {budget:.0f} s; results in {out}")
    summary: dict[str, Any] = {"smoke": args.smoke, "budget_s": budget, "parts": {}}
    try:
        for name in names:
            left = deadline - time.monotonic()
            cap = min(SMOKE_CAP if args.smoke else PARTS[name], left - 5)
            if cap < 10:
                summary["parts"][name] = {"status": "skipped", "reason": f"no time left ({left:.0f} s)"}
                _print(f"== {name}: skipped, {left:.0f} s left")
                continue
            _print(f"== {name} (cap {cap:.0f} s, {left:.0f} s left)")
            started = time.monotonic()
            cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--part", name, "--out", str(out), "--work", str(work)]
            if args.smoke:
                cmd.append("--smoke")
            proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
            try:
                rc = proc.wait(timeout=cap)
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
                status = f"timed out after {cap:.0f} s (results so far kept)"
            took = time.monotonic() - started
            summary["parts"][name] = {"status": status, "seconds": round(took, 1)}
            _print(f"== {name}: {status} in {took:.0f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {name: _load(out, name) for name in names}
    summary["verdicts"] = verdicts(results)
    summary["env"] = results.get("env", {}).get("env")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    _print("\nverdicts" + (" (smoke run on the CPU: not a speed claim)" if args.smoke else "") + ":")
    for v in summary["verdicts"]:
        if v.get("value") is None:
            _print(f"  {v['target']}: not measured")
        else:
            mark = "PASS" if v.get("pass") else "FAIL"
            want = "<=" if v["target"] in ("three_sets_s", "step_host_syncs") else ">="
            _print(f"  {v['target']}: {v['value']} (want {want} "
                   f"{v['want']}) {mark}; limited by {v.get('limit')}" + (f"; {v['config']}" if v.get("config") else ""))
    failed = [n for n, p in summary["parts"].items() if p["status"] != "ok"]
    _print(f"parts not ok: {', '.join(failed)}" if failed else "all parts ok")
    return 1 if failed and args.smoke else 0


if __name__ == "__main__":
    sys.exit(main())

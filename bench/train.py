"""Training throughput: samples/s, model FLOPs utilisation (MFU) and data-wait share of the real trainer.

    python bench/train.py --device cuda                      # r50 and r100, batch 128 and 512, bf16
    python bench/train.py --smoke                            # CPU smoke run: tiny steps, r50 only

Every configuration runs ``tasks.training.trainer.train`` itself (real ``.rec`` data through RecFaceDataset and the
DataLoader, normalisation and mirroring on the device, channels_last, bf16 autocast, Partial FC ArcFace
over the set's identities, SGD), on a synthetic training set of generated identities packed with the
real writer (``datasets.synthetic_set``, cached under ``--data``). Reported per configuration:

* ``samples_per_s``: images per second per device (median of the logged windows after the first);
* ``data_wait``: share of step time spent waiting for the loader (near 0 = the loader keeps up);
* ``mfu``: achieved model FLOPs / peak, where model FLOPs per sample = 3 x the backbone's forward FLOPs
  (``models.summarize``: convolutions and matmuls; backward ~ 2 x forward) + 6 x emb x classes for the
  classifier, and the peak is a bf16 matmul measured on the same device in the same run.

Reference printed beside ours (different hardware, read the ratio with that in mind): arcface_torch's
published A100 figures at batch 128 per GPU, FP16 + TF32: ~675 (r50) and ~462 (r100) samples/s per GPU
(insightface ``benchmarks/train/nvidia_a100.md``, see ../shared/research/perf-anchors.md 1.1).
Results: ``bench/results/train.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import machine, write_result  # noqa: E402

REFERENCE = {"name": "arcface_torch (insightface benchmarks/train/nvidia_a100.md)", "device": "A100 80GB",
             "batch_per_gpu": 128, "precision": "fp16 + tf32", "samples_per_s_per_gpu": {"r50": 675, "r100": 462}}


def matmul_peak_tflops(device: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """Best bf16 matmul throughput on ``device`` in TFLOP/s (square matrices, a few repeats)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    repeats = 20 if device == "cuda" else 3
    best = float("inf")
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best / 1e12


def model_flops_per_sample(network: str, emb_size: int, classes: int) -> float:
    from models import get_backbone, summarize

    forward = summarize(get_backbone(network))["gflops"] * 1e9
    return 3 * forward + 6 * emb_size * classes


def run_one(network: str, batch: int, args, dataset: Path, classes: int, peak: float) -> dict:
    from tasks.training.trainer import train
    from tasks.training.config import TrainConfig

    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        cfg = TrainConfig(dataset=str(dataset), output=out, network=network, loss="arcface", per_batch_size=batch,
                          max_steps=args.warmup_steps + args.steps, frequent=args.window, verbose=10**9, ckpt=0,
                          val_targets=[], device=args.device, amp=args.amp, channels_last=True, compile=args.compile,
                          num_workers=args.workers, lr=0.1, seed=0, nan_max_consecutive=10**9)
        result = train(cfg)
    flops = model_flops_per_sample(network, 512, classes)
    rate = result.samples_per_s or 0.0
    row = {"network": network, "batch_per_device": batch, "amp": args.amp, "samples_per_s": round(rate, 1),
           "data_wait": None if result.data_wait is None else round(result.data_wait, 4),
           "model_gflops_per_sample": round(flops / 1e9, 2), "achieved_tflops": round(rate * flops / 1e12, 2),
           "mfu": round(rate * flops / 1e12 / peak, 4) if peak else None, "steps": result.step, "wall_s": round(result.wall_s, 1)}
    ref = REFERENCE["samples_per_s_per_gpu"].get(network)
    if ref:
        row["reference_samples_per_s"] = ref
        row["ratio_vs_reference"] = round(rate / ref, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--networks", default="r50,r100")
    parser.add_argument("--batches", default="128,512", help="per-device batch sizes")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "fp16", "none"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per configuration")
    parser.add_argument("--warmup-steps", type=int, default=20, help="untimed steps first (one log window)")
    parser.add_argument("--identities", type=int, default=3000, help="synthetic training identities")
    parser.add_argument("--images", type=int, default=4, help="images per identity")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes")
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache" / "facepipe" / "bench-train",
                        help="where the synthetic .rec is made (reused when up to date)")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run: r50, batch 4, 2+2 steps, 64 identities")
    parser.add_argument("--output", default="train", help="result name under bench/results/")
    args = parser.parse_args()
    if args.smoke:
        args.networks, args.batches, args.steps, args.warmup_steps = "r50", "4", 2, 2
        args.identities, args.images, args.workers = 64, 2, 1
    args.window = args.warmup_steps
    if args.steps % args.window:
        parser.error("--steps must be a multiple of --warmup-steps (both are log windows)")
    info = machine()
    print(json.dumps(info))
    from datasets.synthetic_set import write_synthetic_set

    started = time.perf_counter()
    data = write_synthetic_set(args.data / f"ids{args.identities}x{args.images}", identities=args.identities,
                               images_per_identity=args.images, image_size=(112, 112), held_out_identities=20,
                               held_out_images=2, pairs=20, workers=max(1, (os.cpu_count() or 1) // 2))
    print(f"data: {data.images} images of {data.identities} identities in {data.folder} "
          f"({'reused' if data.skipped else f'made in {time.perf_counter() - started:.0f} s'})")
    peak = matmul_peak_tflops(args.device)
    if args.device == "cpu":  # CPUs without bf16 units run bf16 matmuls slower than float32 ones
        peak = max(peak, matmul_peak_tflops(args.device, torch.float32))
    print(f"peak matmul on {args.device}: {peak:.2f} TFLOP/s")
    rows = []
    for network in args.networks.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            row = run_one(network, batch, args, data.folder, data.identities, peak)
            rows.append(row)
            print(json.dumps(row))
    print(f"\n{'network':8} {'batch':>5} {'samples/s':>10} {'MFU':>7} {'data-wait':>9} {'ref A100':>9} {'ratio':>6}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        wait = f"{100 * r['data_wait']:.1f}%" if r["data_wait"] is not None else "-"
        print(f"{r['network']:8} {r['batch_per_device']:>5} {r['samples_per_s']:>10.1f} {mfu:>7} {wait:>9} "
              f"{r.get('reference_samples_per_s', '-'):>9} {r.get('ratio_vs_reference', '-'):>6}")
    path = write_result(args.output, {"args": {k: str(v) for k, v in vars(args).items()}, "peak_bf16_tflops": round(peak, 2),
                                      "reference": REFERENCE, "results": rows,
                                      "note": "CPU smoke run: checks the pipeline, not a speed claim" if args.smoke else ""})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

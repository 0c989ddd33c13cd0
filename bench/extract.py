"""Feature extraction with the flip test: ``tasks.evaluation.embed.extract_embeddings`` against InsightFace's loop.

Reference: the pattern of InsightFace's ``verification.py`` ``test()`` as arcface_torch calls it
during training (``CallBackVerification``: ``verification.test(data_set, backbone, 10, 10)``, i.e.
``batch_size=10``): the images are decoded beforehand into float32 NCHW 0..255 tensors, one of the
originals and one of their mirrors (as ``load_bin`` builds ``data_list``, not timed); then for
each of the two, batch after batch: slice the window ``[end - 10, end)``, copy it to the device
(synchronous), normalise ``((x / 255) - 0.5) / 0.5``, one fp32 forward, ``.cpu().numpy()`` (waits
for the device); no overlap of copies, compute and transfers. The two passes are summed and
L2-normalised at the end.

Ours: ``extract_embeddings(model, uint8 (N, H, W, 3), batch_size=256|512)``: uint8 batches to the
device from pinned memory without blocking, normalised there, channels_last, mirrored on the device,
bf16 autocast on CUDA (fp32 on CPU), results fetched without a per-batch synchronisation; the
uint8 -> float conversion is inside our timing, not the reference's.

Same model (random weights, eval mode), same images (random pixels: speed does not depend on them).
Images/s counts input images; each costs two forwards (image and mirror). ``agreement`` is the
smallest cosine between our and the reference's fused embeddings (1.0 in fp32; bf16 a little less).

Run: ``python bench/extract.py`` (CPU smoke: y1 and r50 on a few images) or
``python bench/extract.py --device cuda`` (r50, r100, y1 at batch 256 and 512, bf16).
Writes bench/results/extract.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine, write_result  # noqa: E402
from models import get_backbone  # noqa: E402
from tasks.evaluation.embed import extract_embeddings  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def reference_extract(model: torch.nn.Module, data_list: list[torch.Tensor], batch_size: int, device: torch.device) -> np.ndarray:
    """InsightFace ``test()``: ``data_list`` = [originals, mirrors], float32 ``(N, 3, H, W)`` 0..255 on the
    host; returns the fused ``(N, D)`` embeddings (sum of both passes, L2-normalised)."""
    passes = []
    for data in data_list:
        n = data.shape[0]
        embeddings = None
        ba = 0
        while ba < n:
            bb = min(ba + batch_size, n)
            count = bb - ba
            window = data[max(bb - batch_size, 0):bb].to(device)
            img = ((window / 255) - 0.5) / 0.5
            out = model(img).detach().cpu().numpy()
            if embeddings is None:
                embeddings = np.zeros((n, out.shape[1]), np.float32)
            embeddings[ba:bb] = out[out.shape[0] - count:]
            ba = bb
        passes.append(embeddings)
    total = passes[0] + passes[1]
    return total / np.linalg.norm(total, axis=1, keepdims=True)


def _best(fn, repeat: int, device: torch.device) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_network(code: str, images: np.ndarray, batch_sizes: list[int], ref_batch: int, ref_images: int,
                  device: torch.device, bf16: bool, repeat: int) -> dict:
    model = get_backbone(code).eval().to(device)
    params = sum(p.numel() for p in model.parameters())
    amp = torch.bfloat16 if bf16 else None
    # reference input as load_bin builds it: float32 NCHW 0..255, originals and mirrors
    ref_src = torch.from_numpy(np.ascontiguousarray(images[:ref_images].transpose(0, 3, 1, 2))).float()
    data_list = [ref_src, ref_src.flip(3).contiguous()]
    reference_extract(model, [d[:ref_batch] for d in data_list], ref_batch, device)  # warm-up
    ref_s, ref_emb = _best(lambda: reference_extract(model, data_list, ref_batch, device), repeat, device)
    ref_rate = ref_images / ref_s
    row = {"network": code, "params_m": params / 1e6, "reference": {"batch_size": ref_batch, "images": ref_images,
           "precision": "fp32", "seconds": ref_s, "images_per_s": ref_rate}, "ours": []}
    print(f"{code}: {params / 1e6:.1f} M params; reference batch {ref_batch} fp32: {ref_rate:,.1f} images/s "
          f"({ref_images} images, {ref_s:.2f} s)")
    for batch in batch_sizes:
        extract_embeddings(model, images[:batch], batch_size=batch, device=device, amp_dtype=amp)  # warm-up / autotune
        ours_s, ours = _best(lambda: extract_embeddings(model, images, batch_size=batch, device=device, amp_dtype=amp),
                             repeat, device)
        rate = images.shape[0] / ours_s
        agreement = float(np.min(np.sum(ours.fused[:ref_images] * ref_emb, axis=1)))
        entry = {"batch_size": batch, "images": int(images.shape[0]), "precision": "bf16" if bf16 else "fp32",
                 "seconds": ours_s, "images_per_s": rate, "ratio": rate / ref_rate, "agreement_min_cosine": agreement}
        if device.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        row["ours"].append(entry)
        print(f"  ours batch {batch} {entry['precision']}: {rate:,.1f} images/s ({images.shape[0]} images, "
              f"{ours_s:.2f} s), x{rate / ref_rate:.1f} vs reference; min cosine to reference {agreement:.5f}")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--networks", help="comma-separated codes (default: cuda r50,r100,y1; cpu y1,r50)")
    parser.add_argument("--batch-sizes", default="256,512")
    parser.add_argument("--images", type=int, help="images for ours (default: cuda 8192, cpu 16)")
    parser.add_argument("--ref-images", type=int, help="images for the reference (default: cuda 2048, cpu 16)")
    parser.add_argument("--ref-batch", type=int, default=10, help="reference batch size (arcface_torch: 10)")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--repeat", type=int, help="timed repetitions, best kept (default: cuda 3, cpu 1)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    torch.backends.cudnn.benchmark = True  # both sides
    networks = (args.networks or ("r50,r100,y1" if cuda else "y1,r50")).split(",")
    n = args.images or (8192 if cuda else 16)
    n_ref = min(args.ref_images or (2048 if cuda else 16), n)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    bf16 = cuda and not args.fp32
    repeat = args.repeat or (3 if cuda else 1)
    images = np.random.default_rng(0).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)

    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, GPU: {m['gpu']}; device {device}")
    rows = [bench_network(code.strip(), images, batches, args.ref_batch, n_ref, device, bf16, repeat) for code in networks]
    result = {"device": str(device), "images": n, "reference_images": n_ref, "flip": True, "networks": rows,
              "note": "images/s counts input images (two forwards each: image and mirror)"}
    print(f"wrote {write_result('extract', result)}")
    return result


if __name__ == "__main__":
    main()

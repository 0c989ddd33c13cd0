"""Backbones: size, compute and speed of every network code, plus channels_last / torch.compile / ONNX checks.

    python bench/models.py [--codes r50,y1] [--batches 1,32] [--repeats 3]
                           [--device cuda --dtype bf16 --train-batch 128]
                           [--channels-last] [--compile] [--onnx]

For each code: parameters, fp32 size, MACs and GFLOPs at 112x112 (``models.summarize``), and CPU
forward latency (fp32, eval) at each batch size. Side by side, in the same run and measured the same
way, the reference is facenet-pytorch's ``InceptionResnetV1`` (the FaceNet embedder already in our
stack; 160x160 input, 512-d): every latency is also printed as a ratio to it. Parameters and MACs are
compared with the published figures (arcface_torch README: r18 2.6, r50 6.3, r100 12.1 GMACs, printed
there as "GFLOPs"; mbf 0.45; MobileFaceNet paper: y1 0.99M params, 0.221 GMACs).

``--device cuda --dtype bf16``: forward and forward+backward samples/s under autocast, channels_last.
``--channels-last``: eval output equal to contiguous + a train step (every code; the suite tests one per
family). ``--compile``: ``torch.compile`` (inductor) output equals eager, and compile seconds.
``--onnx``: dynamo export (opset 18), onnxruntime output equal to torch (L2-normalised embeddings within
1e-4). Prints the machine and writes ``bench/results/models.json``.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.machine import best_time, machine, write_result  # noqa: E402
from models import get_backbone, network_codes, summarize  # noqa: E402
from models_helpers import calibrate_batch_norm  # noqa: E402

PUBLISHED = {  # code -> (params in millions or None, GMACs, source)
    "r18": (None, 2.6, "arcface_torch README"), "r50": (43.6, 6.3, "arcface_torch README / flops.py"),
    "r100": (65.2, 12.1, "arcface_torch README / flops.py"), "mbf": (None, 0.45, "arcface_torch README"),
    "y1": (0.99, 0.221, "MobileFaceNet paper (Chen et al. 2018)"),
}


def _reference_model():
    from facenet_pytorch import InceptionResnetV1

    return InceptionResnetV1(pretrained=None).eval(), (160, 160)


def cpu_latency(model, image_size, batch: int, repeats: int) -> float:
    """Best wall time in milliseconds of one eval forward of ``batch`` images, after warm-up calls
    (the first calls create oneDNN primitives and allocations and can take 10x longer)."""
    x = torch.randn(batch, 3, *image_size)
    with torch.inference_mode():
        warm, _ = best_time(lambda: model(x), 1)
        if warm < 10:
            best_time(lambda: model(x), 2)
        seconds, _ = best_time(lambda: model(x), 1 if warm > 10 else repeats)  # very slow cases: one run
    return seconds * 1e3


def gpu_throughput(model, image_size, dtype: torch.dtype, batch: int, steps: int = 10) -> dict:
    """Samples/s of forward (inference) and forward+backward (train mode) under autocast on CUDA."""
    model = model.to("cuda", memory_format=torch.channels_last)
    x = torch.randn(batch, 3, *image_size, device="cuda").contiguous(memory_format=torch.channels_last)
    out = {}
    for mode in ("forward", "forward_backward"):
        model.train(mode == "forward_backward")

        def step():
            with torch.autocast("cuda", dtype=dtype):
                if mode == "forward":
                    with torch.inference_mode():
                        return model(x)
                y = model(x)
            y.float().square().mean().backward()
            return y

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        out[f"{mode}_samples_s"] = batch * steps / (time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return out


def check_channels_last(code: str, device: str) -> dict:
    model = calibrate_batch_norm(get_backbone(code)).to(device)
    x = torch.randn(2, 3, 112, 112, device=device)
    with torch.no_grad():
        want = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    cos = F.cosine_similarity(got, want, dim=1).min().item()
    model.train()
    model(x.contiguous(memory_format=torch.channels_last)).square().mean().backward()
    finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    ok = cos > 1 - 1e-5 and finite
    return {"ok": ok, "min_cosine": cos, "finite_grads": finite}


def check_compile(code: str, device: str) -> dict:
    model = calibrate_batch_norm(get_backbone(code)).to(device)
    x = torch.randn(2, 3, 112, 112, device=device)
    with torch.no_grad():
        want = model(x)
        compiled = torch.compile(model)
        start = time.perf_counter()
        got = compiled(x)
        seconds = time.perf_counter() - start
    diff = (F.normalize(got, dim=1) - F.normalize(want, dim=1)).abs().max().item()
    return {"ok": diff < 1e-3, "max_normalized_diff": diff, "compile_s": round(seconds, 1)}


def check_onnx(code: str) -> dict:
    import onnxruntime

    model = calibrate_batch_norm(get_backbone(code))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        want = model(x)
    start = time.perf_counter()
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False,
                                dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}})
    seconds = time.perf_counter() - start
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    diff = (F.normalize(got, dim=1) - F.normalize(want, dim=1)).abs().max().item()
    raw = ((got - want).abs().max() / want.abs().max()).item()
    return {"ok": diff <= 1e-4, "max_normalized_diff": diff, "max_relative_diff": raw, "export_s": round(seconds, 1)}


def _run_check(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # a failing code is a result, not a crash of the benchmark
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                "trace": traceback.format_exc(limit=3)[-600:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", default=",".join(network_codes()), help="comma-separated network codes")
    parser.add_argument("--batches", default="1,32", help="CPU latency batch sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--train-batch", type=int, default=128, help="GPU batch size")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--onnx", action="store_true")
    parser.add_argument("--output", default="models", help="result name under bench/results/")
    args = parser.parse_args()
    codes = [c.strip() for c in args.codes.split(",") if c.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no GPU here")
    info = machine()
    print(f"machine: {info}")

    reference, ref_size = _reference_model()
    ref = {"name": "facenet_pytorch.InceptionResnetV1", "image_size": ref_size, **summarize(reference, ref_size)}
    if not args.no_latency:
        ref["cpu_latency_ms"] = {b: cpu_latency(reference, ref_size, b, args.repeats) for b in batches}
    if args.device == "cuda":
        ref["gpu"] = gpu_throughput(reference, ref_size, dtype, args.train_batch)
    print(f"reference {ref['name']} {ref_size}: {ref['params'] / 1e6:.1f}M params, {ref['macs'] / 1e9:.2f} GMACs, "
          + " ".join(f"b{b} {ms:.1f} ms" for b, ms in ref.get("cpu_latency_ms", {}).items()))

    results = {}
    header = f"{'code':6s} {'params M':>9s} {'MB':>7s} {'GMACs':>7s} {'GFLOPs':>7s} {'published':>16s}"
    header += "".join(f" {'b%d ms' % b:>9s} {'x ref':>6s}" for b in ([] if args.no_latency else batches))
    print(header)
    for code in codes:
        model = get_backbone(code).eval()
        row = summarize(model)
        line = (f"{code:6s} {row['params'] / 1e6:9.2f} {row['size_mb']:7.1f} {row['macs'] / 1e9:7.3f} "
                f"{row['gflops']:7.2f}")
        if code in PUBLISHED:
            params_m, gmacs, source = PUBLISHED[code]
            row["published"] = {"params_m": params_m, "gmacs": gmacs, "source": source,
                                "macs_ratio": row["macs"] / 1e9 / gmacs}
            line += f" {row['macs'] / 1e9 / gmacs:8.3f}x {gmacs:5.2f}G"
        else:
            line += " " * 17
        if not args.no_latency:
            row["cpu_latency_ms"] = {}
            for b in batches:
                ms = cpu_latency(model, (112, 112), b, args.repeats)
                row["cpu_latency_ms"][b] = ms
                ratio = ms / ref["cpu_latency_ms"][b]
                row.setdefault("latency_ratio_vs_reference", {})[b] = ratio
                line += f" {ms:9.1f} {ratio:6.2f}"
        if args.device == "cuda":
            row["gpu"] = {"dtype": args.dtype, "batch": args.train_batch,
                          **gpu_throughput(model, (112, 112), dtype, args.train_batch)}
            gpu = row["gpu"]
            line += f"  gpu fwd {gpu['forward_samples_s']:.0f}/s fwd+bwd {gpu['forward_backward_samples_s']:.0f}/s"
        del model
        checks = {}
        if args.channels_last:
            checks["channels_last"] = _run_check(check_channels_last, code, args.device)
        if args.compile:
            checks["compile"] = _run_check(check_compile, code, args.device)
        if args.onnx:
            checks["onnx"] = _run_check(check_onnx, code)
        if checks:
            row["checks"] = checks
            line += "  " + " ".join(f"{k}:{'ok' if v['ok'] else 'FAIL'}" for k, v in checks.items())
        print(line, flush=True)
        results[code] = row
        if args.device == "cuda":
            torch.cuda.empty_cache()

    failed = {k: [c for c, r in results.items() if not r.get("checks", {}).get(k, {"ok": True})["ok"]]
              for k in ("channels_last", "compile", "onnx")}
    summary = {k: ("not run" if not getattr(args, k) else (f"all {len(codes)} pass" if not v else f"fail: {v}"))
               for k, v in failed.items()}
    print(f"checks: {summary}")
    path = write_result(args.output, {"args": vars(args), "reference": ref, "results": results, "checks": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

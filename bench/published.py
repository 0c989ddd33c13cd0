"""Published models at full size: arcface_torch iresnet50/100/200 and mbf, MXNet LResNet50/100E-IR and y1 at 112x112.

    python bench/published.py [--arcface iresnet50,iresnet100,mbf] [--mxnet r50,r100,y1]

For each network: the original toolchain's network (arcface_torch: the restatement in
``tests/published_refs.py``; MXNet: the 2018 symbol of ``tests/test_mxnet_models.py`` run by real
MXNet 1.9.1 in its venv) with random weights, saved as it saves (``torch.save`` of the state dict,
fp16 too; ``mx.model.save_checkpoint``), then loaded here with ``tasks.checkpoint.load_embedder``:
load seconds (the reference side: ``torch.load`` + ``load_state_dict`` into the original network, in
the same run) and the largest embedding difference relative to the largest embedding value. The suite
runs the small networks (r18, 32x32); this runs the sizes people download. Writes
``bench/results/published.json``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.machine import machine, write_result  # noqa: E402
from published_refs import IResNet, MobileFaceNet, randomize  # noqa: E402
from tasks.checkpoint import load_embedder  # noqa: E402

ARCFACE = {"iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3), "iresnet200": (6, 26, 60, 6)}


def _reference(name: str) -> torch.nn.Module:
    if name == "mbf":
        return randomize(MobileFaceNet(512, (1, 4, 6, 2), 2), seed=11)
    return randomize(IResNet(ARCFACE[name], 512), seed=11)


def arcface(name: str, tmp: Path, half: bool) -> dict:
    ref = _reference(name)
    state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in ref.state_dict().items()}
    path = tmp / f"{name}{'-fp16' if half else ''}.pth"
    torch.save(state, path)
    if half:
        ref.load_state_dict({k: v.float() for k, v in state.items()})
    start = time.perf_counter()
    model, meta = load_embedder(path)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    ref_s = time.perf_counter() - start
    x = torch.rand(4, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        want, got = ref.eval()(x), model(x)
    rel = float((want - got).abs().max() / want.abs().max())
    return {"network": name, "fp16": half, "file_mb": round(path.stat().st_size / 2**20, 1), "load_s": round(ours_s, 2),
            "reference_load_s": round(ref_s, 2), "max_rel_diff": rel, "ours": meta["network"], "conversion": meta["conversion"]}


def mxnet(kind: str, tmp: Path) -> dict:
    import mxnet_env
    from test_mxnet_models import NET_SCRIPT

    prefix = tmp / f"model-{kind}"
    mxnet_env.run_script(NET_SCRIPT, kind, str(prefix), "112", timeout=1800)
    io = np.load(f"{prefix}-io.npz")
    start = time.perf_counter()
    model, meta = load_embedder(f"{prefix},0")
    ours_s = time.perf_counter() - start
    x = (torch.from_numpy(io["pixels"]).permute(0, 3, 1, 2).float() - 127.5) * 0.0078125
    with torch.no_grad():
        got = model(x).numpy()
    want = io["emb"]
    size = sum(p.stat().st_size for p in tmp.glob(f"model-{kind}-0000.params"))
    return {"network": kind, "file_mb": round(size / 2**20, 1), "load_s": round(ours_s, 2),
            "max_rel_diff": float(np.abs(got - want).max() / np.abs(want).max()), "ours": meta["network"],
            "conversion": meta["conversion"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arcface", default="iresnet50,iresnet100,mbf")
    parser.add_argument("--mxnet", default="r50,r100,y1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(machine())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.arcface.split(",")):
            for half in (False, True):
                rows.append(arcface(name, Path(tmp), half))
                print(rows[-1], flush=True)
                for f in Path(tmp).glob("*.pth"):
                    f.unlink()
        for kind in filter(None, args.mxnet.split(",")):
            rows.append(mxnet(kind, Path(tmp)))
            print(rows[-1], flush=True)
            for f in Path(tmp).glob("model-*"):
                f.unlink()
    print(write_result("published", {"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

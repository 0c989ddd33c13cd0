"""Packing aligned faces into train.rec: ours (tasks.pack) vs face2rec2.py's loop on MXNet 1.9.1.

    python bench/pack.py [--identities 300] [--images 20] [--repeats 3]

Builds once (cached under ``data/bench/pack-<I>x<M>/``) ``I`` generated identities of ``M`` aligned
112x112 JPEG faces each (datasets.synthetic), runs them through the align stage's
``already_aligned`` import and the lst stage, then measures on the same ``train.lst``:

1. ours: :func:`tasks.pack.run_pack` (verbatim payloads, size check of every image, sha256 of every
   payload, manifest with offsets, atomic replace), forced to rebuild each repeat;
2. the reference: face2rec2.py's single-process path (``--num-thread 1``: read the list, read each
   aligned image's bytes, ``mx.recordio.pack`` with ``[label, aligned]``, ``write_idx``; then record
   0 and the identity records), written here after the spec, run in the MXNet venv of
   tests/mxnet_env.py.

Both use the wall clock; the page cache is warm for both (each side reads the files once before
timing), and every timed repeat of either side starts without a previous ``train.rec`` (removed
before the clock starts: replacing or truncating a 35 MB file costs 10-50 ms here, paid by neither).
The machine is shared, so the two sides alternate over ``--rounds`` rounds of ``--repeats`` runs
each and each keeps its best run; the CPU time of a run (``process_time``: all threads of the
process; ours also runs a writer and a manifest thread) is reported beside the wall clock, as it
suffers less from the neighbours. The two ``train.rec``/``train.idx`` are compared byte for byte.
Prints images/s, the ratio, the machine and its load; writes ``bench/results/pack.json``. Packing is
CPU and disk work: there is no ``--device``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mxnet_env  # noqa: E402
from bench.machine import machine, write_result  # noqa: E402
from datasets.synthetic import SyntheticFaces, write_identity_folders  # noqa: E402
from tasks.alignment import AlignConfig, run_align  # noqa: E402

BUILD_VERSION = 1

REFERENCE = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
import mxnet as mx
lst_path, out_dir, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])

def entries():
    with open(lst_path) as fh:
        for line in fh:
            cols = line.rstrip("\n").split("\t")
            if len(cols) >= 3:
                yield cols[1], int(cols[2]), int(cols[0])

def face2rec2():
    rec = mx.recordio.MXIndexedRecordIO(out_dir + "/train.idx", out_dir + "/train.rec", "w")
    runs, key, last, start = [], 1, None, 1
    for path, label, aligned in entries():
        if label != last:
            if last is not None:
                runs.append((start, key))
            last, start = label, key
        with open(path, "rb") as fh:
            img = fh.read()
        rec.write_idx(key, mx.recordio.pack(mx.recordio.IRHeader(0, [label, aligned], key, 0), img))
        key += 1
    runs.append((start, key))
    rec.write_idx(0, mx.recordio.pack(mx.recordio.IRHeader(0, [float(key), float(key + len(runs))], 0, 0), b""))
    for i, (s, e) in enumerate(runs):
        rec.write_idx(key + i, mx.recordio.pack(mx.recordio.IRHeader(0, [float(s), float(e)], key + i, 0), b""))
    rec.close()
    return key - 1

for path, _, _ in entries():  # warm the page cache
    open(path, "rb").read()
best = cpu = float("inf")
for _ in range(repeats):
    for name in ("train.rec", "train.idx"):  # start like the first run, not with a truncation
        if os.path.exists(out_dir + "/" + name):
            os.remove(out_dir + "/" + name)
    t, c = time.perf_counter(), time.process_time()
    n = face2rec2()
    best, cpu = min(best, time.perf_counter() - t), min(cpu, time.process_time() - c)
print(json.dumps({"images": n, "seconds": best, "cpu_seconds": cpu, "mxnet": mx.__version__}))
"""


def build(identities: int, images: int) -> Path:
    """Generated faces -> align import -> lst; returns the lst-stage folder (cached)."""
    from tasks.lst import run_lst  # a stage (it imports prefect): only when this benchmark runs

    root = ROOT / "data" / "bench" / f"pack-{identities}x{images}"
    stamp = root / "BUILT"
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == BUILD_VERSION:
        return root / "lst"
    print(f"generating {identities} x {images} faces in {root} (once) ...", flush=True)
    faces = SyntheticFaces(num_identities=identities, images_per_identity=images, seed=2018)
    write_identity_folders(root / "faces", faces)
    aligned = run_align(root / "faces", root / "aligned", AlignConfig(already_aligned=True)).out_dir
    run_lst([aligned], root / "lst")
    stamp.write_text(json.dumps({"version": BUILD_VERSION}))
    return root / "lst"


def main(argv: list[str] | None = None) -> dict:
    from tasks.pack import run_pack  # the stage under test (it imports prefect)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--identities", type=int, default=300)
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two sides (best run of each kept)")
    args = ap.parse_args(argv)
    lst = build(args.identities, args.images)
    work = lst.parent / "runs"
    shutil.rmtree(work, ignore_errors=True)
    (work / "reference").mkdir(parents=True)

    load = os.getloadavg()
    run_pack(lst, work / "ours")  # warm the page cache and the imports
    ref_best = ref_cpu = best = cpu = float("inf")
    for _ in range(args.rounds):
        ref = json.loads(mxnet_env.run_script(REFERENCE, str(lst / "train.lst"), str(work / "reference"),
                                              str(args.repeats), timeout=3600).strip().splitlines()[-1])
        ref_best, ref_cpu = min(ref_best, ref["seconds"]), min(ref_cpu, ref["cpu_seconds"])
        for _ in range(args.repeats):
            shutil.rmtree(work / "ours")
            start, start_cpu = time.perf_counter(), time.process_time()
            result = run_pack(lst, work / "ours", force=True)
            best, cpu = min(best, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    identical = all((work / "ours" / n).read_bytes() == (work / "reference" / n).read_bytes()
                    for n in ("train.rec", "train.idx"))
    ours_rate, ref_rate = result.images / best, ref["images"] / ref_best
    out = {
        "images": result.images, "identities": result.identities,
        "rec_bytes": (work / "ours" / "train.rec").stat().st_size,
        "ours_images_per_s": round(ours_rate, 1), "face2rec2_mxnet_images_per_s": round(ref_rate, 1),
        "speedup": round(ours_rate / ref_rate, 3), "byte_identical": identical, "mxnet": ref["mxnet"],
        "ours_cpu_ms": round(cpu * 1e3, 1), "face2rec2_cpu_ms": round(ref_cpu * 1e3, 1),
        "cpu_ratio": round(ref_cpu / cpu, 3),
        "repeats": args.repeats, "rounds": args.rounds, "clock": "wall",
        "load_average_1_5_15_min": [round(v, 2) for v in load],
    }
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, GPU {info.get('gpu')}, load average {load[0]:.2f} (shared)")
    print(f"pack {result.images} faces ({result.identities} identities, {out['rec_bytes'] / 1e6:.1f} MB):")
    print(f"  ours (tasks.pack)          {ours_rate:10.0f} images/s")
    print(f"  face2rec2 loop, MXNet {ref['mxnet']} {ref_rate:10.0f} images/s")
    print(f"  ratio ours / reference     {out['speedup']:10.2f}x   train.rec and train.idx byte-identical: {identical}")
    print(f"  CPU time a run             ours {out['ours_cpu_ms']:.0f} ms, face2rec2 {out['face2rec2_cpu_ms']:.0f} ms "
          f"({out['cpu_ratio']:.2f}x)")
    path = write_result("pack", out)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

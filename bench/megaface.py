"""MegaFace identification: ours (``tasks.evaluation.megaface``) against a FaceX-Zoo-style reference.

``reference_identification`` restates the evaluator that FaceX-Zoo ships as a Python copy of the
devkit protocol (``test_protocol/megaface/megaface_evaluator.py``, formats-spec 6.4): the full
probe x distractor score matrix by one ``np.dot``, the rank-r distractor score per probe by
``argpartition``, then Python loops over identities and (gallery, query) pairs. Scores are dot
products of normalised features, so ours runs with ``metric="cosine"`` for the side-by-side check.

Synthetic set: 3,530 probes of 80 identities (the devkit's FaceScrub probe set size), D = 512.
Run: ``python bench/megaface.py [--distractors 100000] [--device cuda]``; writes bench/results/megaface.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine, write_result  # noqa: E402
from tasks.evaluation.megaface import identification, verification_tar_at_far  # noqa: E402


def reference_identification(probe_feats: np.ndarray, probe_ids, distractor_feats: np.ndarray, ranks=(1,)) -> dict[int, float]:
    """Rank-r rates ``{r: rate}`` with FaceX-Zoo's loops (dot-product scores, ties count for the match)."""
    id2index: dict = {}
    for index, identity in enumerate(probe_ids):
        id2index.setdefault(identity, []).append(index)
    score = np.dot(probe_feats, distractor_feats.T)
    intra = {identity: np.dot(probe_feats[idx], probe_feats[idx].T) for identity, idx in id2index.items()}
    rates = {}
    for rank in ranks:
        kth = np.take(np.argpartition(score, -rank, axis=1), -rank, axis=1)
        kth_score = [score[i][kth[i]] for i in range(len(probe_feats))]
        tp = count = 0
        for identity, intra_score in intra.items():
            m = intra_score.shape[0]
            for gallery in range(m):
                for query in range(m):
                    if query == gallery:
                        continue
                    if intra_score[gallery][query] >= kth_score[id2index[identity][query]]:
                        tp += 1
                    count += 1
        rates[rank] = tp / count
    return rates


def synthetic_megaface(n_distractors: int, dim: int = 512, n_ids: int = 80, n_probes: int = 3530, seed: int = 0):
    """Unit float32 probes ``(n_probes, dim)`` of ``n_ids`` identities (centre + per-image noise of varying
    strength, so rank-1 falls as distractors are added) and ``(n_distractors, dim)`` random distractors."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.integers(0, n_ids, n_probes))
    centres = rng.standard_normal((n_ids, dim)).astype(np.float32)
    scale = np.exp(rng.normal(0.3, 0.35, (n_probes, 1))).astype(np.float32)
    probes = centres[ids] + scale * rng.standard_normal((n_probes, dim), dtype=np.float32)
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    distractors = np.empty((n_distractors, dim), np.float32)
    for start in range(0, n_distractors, 100_000):
        block = rng.standard_normal((min(100_000, n_distractors - start), dim), dtype=np.float32)
        distractors[start:start + block.shape[0]] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return probes, [f"id{i:03d}" for i in ids], distractors


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distractors", type=int, default=100_000)
    parser.add_argument("--reference-max", type=int, default=100_000,
                        help="run the reference only up to this many distractors (it holds the full score matrix)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    probes, ids, distractors = synthetic_megaface(args.distractors, args.dim)
    gen_s = time.perf_counter() - t0
    sizes = tuple(s for s in (10, 100, 1000, 10000, 100000, 1000000) if s <= args.distractors) or (args.distractors,)
    if sizes[-1] != args.distractors:
        sizes += (args.distractors,)

    def timed(fn):
        start = time.perf_counter()
        out = fn()
        if args.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    identification(probes[:64], ids[:64], distractors[:1000], sizes=(1000,), device=args.device)  # warm-up
    ours_s, ours = timed(lambda: identification(probes, ids, distractors, sizes=sizes, ranks=(1, 5, 10),
                                                metric="cosine", device=args.device))
    euclid_s, euclid = timed(lambda: identification(probes, ids, distractors, sizes=(args.distractors,), ranks=(1,),
                                                    metric="euclidean", device=args.device))
    tar_s, tar = timed(lambda: verification_tar_at_far(probes, ids, distractors, 1e-6, device=args.device))

    result = {
        "probes": len(probes), "identities": len(set(ids)), "distractors": args.distractors, "dim": args.dim,
        "device": args.device, "generate_s": gen_s,
        "rank1_cosine": {str(k): v for k, v in ours.rank1().items()},
        "rank1_euclidean_all": euclid.rank1()[args.distractors],
        "tar@far=1e-6": None if tar is None else tar.tar,
        "ours_s": {"identification_all_sizes_ranks_1_5_10": ours_s, "identification_largest_rank1": euclid_s,
                   "tar_at_far_1e-6": tar_s},
        "pairs_per_s": ours.n_pairs * args.distractors / ours_s,
    }
    n_ref = min(args.distractors, args.reference_max)
    if n_ref > 0:
        ours_ref_s, ours_ref = timed(lambda: identification(probes, ids, distractors[:n_ref], sizes=(n_ref,),
                                                            ranks=(1, 5, 10), metric="cosine", device=args.device))
        ref_s, ref = timed(lambda: reference_identification(probes, ids, distractors[:n_ref], ranks=(1, 5, 10)))
        agree = all(abs(ours_ref.cmc[n_ref][i] - ref[r]) == 0 for i, r in enumerate((1, 5, 10)))
        result["reference"] = {"distractors": n_ref, "ours_s": ours_ref_s, "reference_s": ref_s,
                               "ratio": ref_s / ours_ref_s, "rank1_ours": ours_ref.rank1()[n_ref],
                               "rank1_reference": ref[1], "identical_cmc": agree}
    m = machine()
    print(f"machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu']}; device {args.device}")
    print(f"{len(probes)} probes ({len(set(ids))} ids, {ours.n_pairs:,} gallery/query pairs) x {args.distractors:,} distractors, dim {args.dim}")
    print("rank-1 (cosine) by size: " + ", ".join(f"{k:,}: {v:.4f}" for k, v in ours.rank1().items()))
    print(f"ours: all sizes, ranks 1/5/10 {ours_s:.2f} s; euclidean rank-1 at {args.distractors:,} {euclid_s:.2f} s; "
          f"TAR@FAR=1e-6 {tar_s:.2f} s (TAR {result['tar@far=1e-6']})")
    if "reference" in result:
        r = result["reference"]
        print(f"vs reference at {r['distractors']:,} distractors: ours {r['ours_s']:.2f} s, reference {r['reference_s']:.2f} s, "
              f"x{r['ratio']:.1f}, identical CMC: {r['identical_cmc']}")
    print(f"wrote {write_result('megaface', result)}")
    return result


if __name__ == "__main__":
    main()

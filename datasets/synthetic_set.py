"""A packed training set of generated identities (``datasets.synthetic``), for demos, tests and benchmarks.

    python -m datasets.synthetic_set data/synth56 --identities 200 --images 10 --image-size 56,56

writes, with the project's real writers:

* ``train.rec`` / ``train.idx`` / ``property``: ``identities x images`` JPEG faces (quality 95) in the
  InsightFace layout (:class:`datasets.rec_layout.InsightFaceRecWriter`), labels 0..identities-1;
* ``<val_name>.bin``: a verification pack (:func:`datasets.verification_bin.write_bin`) of ``pairs``
  LFW-style pairs (10 folds, half same / half different) over *held-out* identities: another range of
  the generator's identity numbers (from ``held_out_first``), never seen in training;
* ``synthetic.json``: the parameters, the generator code's digest and the output sizes, written last
  (commit point); an existing set with the same parameters and generator code is reused, so
  benchmarks and tests pay for rendering once per folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from datasets.rec_layout import REC_FILES, InsightFaceRecWriter
from datasets.synthetic import SyntheticFaces, make_pairs
from datasets.verification_bin import write_bin
from datasets.atomic import atomic_write_text
from datasets.face_codec import encode_jpeg
from datasets.hashing import sha256_bytes
from datasets.image_size import parse_image_size

__all__ = ["SyntheticSet", "write_synthetic_set", "main"]

STAMP_FILE = "synthetic.json"


@dataclass(frozen=True)
class SyntheticSet:
    """Where a synthetic set lies; ``val_bin`` is the held-out verification pack."""

    folder: Path
    val_bin: Path
    identities: int
    images: int
    pairs: int
    skipped: bool


def _code() -> str:
    """Digest of the generator's source files (this module, the renderer and the drawing code)."""
    here = Path(__file__).resolve().parent
    return sha256_bytes(b"".join((here / name).read_bytes() for name in ("synthetic.py", "face_drawing.py",
                                                                         "synthetic_set.py")))[:16]


def _stamp(params: dict, code: str, out: Path, outputs: list[str]) -> str:
    return json.dumps({"params": params, "code": code, "outputs": {n: (out / n).stat().st_size for n in outputs}},
                      indent=2, sort_keys=True)


def _up_to_date(out: Path, params: dict, code: str) -> bool:
    try:
        stamp = json.loads((out / STAMP_FILE).read_text(encoding="utf-8"))
        return (stamp["params"] == json.loads(json.dumps(params)) and stamp["code"] == code
                and all((out / n).stat().st_size == size for n, size in stamp["outputs"].items()))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_synthetic_set(out_dir: str | Path, *, identities: int = 200, images_per_identity: int = 10,
                        image_size: tuple[int, int] = (112, 112), seed: int = 0, difficulty: float = 1.0,
                        held_out_identities: int = 100, held_out_images: int = 6, pairs: int = 600,
                        held_out_first: int = 100_000, val_name: str = "synth_val", workers: int = 1,
                        quality: int = 95) -> SyntheticSet:
    """Render, pack and write the set into ``out_dir`` (see the module docstring); reuse it if up to date."""
    if held_out_first < identities:
        raise ValueError(f"held_out_first {held_out_first} overlaps the training identities 0..{identities - 1}")
    out = Path(out_dir)
    h, w = (int(v) for v in image_size)
    params = {"identities": identities, "images_per_identity": images_per_identity, "image_size": [h, w], "seed": seed,
              "difficulty": difficulty, "held_out_identities": held_out_identities, "held_out_images": held_out_images,
              "pairs": pairs, "held_out_first": held_out_first, "val_name": val_name, "quality": quality}
    code = _code()
    val_bin = out / f"{val_name}.bin"
    if _up_to_date(out, params, code):
        return SyntheticSet(out, val_bin, identities, identities * images_per_identity, pairs, skipped=True)

    train = SyntheticFaces(identities, images_per_identity, image_size=(h, w), seed=seed, difficulty=difficulty)
    images, labels = train.render_array(workers=workers)
    with InsightFaceRecWriter(out, image_size=(h, w)) as writer:
        for image, label in zip(images, labels):
            writer.add(int(label), encode_jpeg(image, quality))
    del images
    held = SyntheticFaces(held_out_identities, held_out_images, image_size=(h, w), seed=seed, difficulty=difficulty,
                          first_identity=held_out_first)
    held_images, _ = held.render_array(workers=workers)
    n = held_out_images
    groups = {f"{i:06d}": [f"{i * n + k:08d}" for k in range(n)] for i in range(held_out_identities)}
    chosen = make_pairs(groups, num_pairs=pairs, seed=seed)
    order = [int(x) for a, b, _ in chosen for x in (a, b)]
    write_bin(val_bin, [held_images[i] for i in order], [bool(s) for _, _, s in chosen], quality=quality)
    outputs = [*REC_FILES, val_bin.name]
    atomic_write_text(out / STAMP_FILE, _stamp(params, code, out, outputs))
    return SyntheticSet(out, val_bin, identities, identities * images_per_identity, pairs, skipped=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets.synthetic_set", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--images", type=int, default=10, help="images per identity")
    parser.add_argument("--image-size", default="112,112", help="height,width")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=float, default=1.0)
    parser.add_argument("--held-out-identities", type=int, default=100)
    parser.add_argument("--held-out-images", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--val-name", default="synth_val")
    parser.add_argument("--workers", type=int, default=1, help="rendering processes")
    args = parser.parse_args(argv)
    size = tuple(parse_image_size(args.image_size))
    result = write_synthetic_set(args.out_dir, identities=args.identities, images_per_identity=args.images,
                                 image_size=size, seed=args.seed, difficulty=args.difficulty,
                                 held_out_identities=args.held_out_identities, held_out_images=args.held_out_images,
                                 pairs=args.pairs, val_name=args.val_name, workers=args.workers)
    print(json.dumps({"folder": str(result.folder), "val_bin": str(result.val_bin), "images": result.images,
                      "identities": result.identities, "pairs": result.pairs, "skipped": result.skipped}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

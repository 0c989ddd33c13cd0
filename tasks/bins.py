"""Bins stage: verification packs (``<name>.bin``, spec 4.1) built from pair lists.

Pair lists (``PairsSet.format``, ``"auto"`` tells them apart):

* ``"lfw"``, LFW ``pairs.txt`` (spec 4.3): a header line (one or two integers, e.g. ``10\\t300``;
  skipped), then whitespace-separated ``name n1 n2`` (same person) or ``name1 n1 name2 n2``
  (different people); image ``<image_root>/<name>/<name>_<n:04d>.jpg``.
* ``"csv"``: ``path_a,path_b,same`` per line (``same`` 1/0 or true/false; an optional header
  line, e.g. the one :func:`datasets.synthetic.write_pairs_csv` writes). TAB-separated lines
  (InsightFace's ``pairs_label.txt``) are read too. Relative paths are relative to ``image_root``.

``image_root`` defaults to the pair list's folder. Pair order is kept: the verification protocol
splits the list into contiguous folds (LFW: 10 folds of 300 same + 300 different pairs).

Alignment: the pair images go through the align stage (:mod:`tasks.align`, engine :mod:`tasks.alignment`, the same detector,
face choice and warp) with the align configuration of the dataset, face policy ``"all"`` replaced
by ``"insightface"`` (align_lfw.py's choice). Its input is ``inputs/``, a folder of symbolic links
to the images (mirroring their paths below ``image_root``), so the stage is incremental like
align. ``aligned=True`` sets: the images are aligned crops already and pass through
(``AlignConfig.already_aligned``: bytes kept when they have the output size).

Bad pairs, and what happens to the folds:

* an image that does not exist: ``missing="fail"`` (default) raises, naming the list line, before
  anything is aligned; ``"drop"`` drops the pair;
* a photo without a detected face: ``no_face="center_crop"`` (default) uses the spec 5.3 centre
  crop (what align_lfw.py does), so the pair stays and the folds are intact; ``"drop"`` drops it;
* an unreadable image: raises with ``missing="fail"``, else the pair is dropped.

A dropped pair shifts every later pair into another contiguous fold, so accuracies are no longer
the official folds' (a warning says how many pairs went). The manifest has one row per pair:
``ok``, ``fallback`` (at least one centre crop) or ``dropped`` with the reason, the pair's fold in
the list (``fold``, of 10) and its index in the pack (``bin_index``, -1 when dropped).

Output (``out_dir``): ``inputs/``, ``faces/`` (the align stage), ``<name>.bin``
(:func:`datasets.verification_bin.write_bin`, atomic), ``manifest.parquet``, ``stage.json`` last.
"""
from __future__ import annotations

if __name__ == "__main__":  # parse first: --help and bad options answer before prefect and torch are imported
    from tasks.cli import run_command_line

    run_command_line("bins")

import argparse
import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE

from datasets.errors import FormatError
from datasets.hashing import params_hash, sha256_bytes, sha256_file
from datasets.locks import folder_lock
from datasets.manifest import MANIFEST_FILE, read_manifest, status_counts, write_manifest
from datasets.verification_bin import write_bin
from tasks import alignment
from tasks import cli
from tasks.configs import PairsSet
from tasks.runtime import finished, logger
from tasks.stage import code_version, commit_record, current_record, invalidate, load_record

__all__ = ["STAGE", "EXTRA_COLUMNS", "FOLDS", "Pair", "PairsSet", "BinsPlan", "BinsResult", "read_pairs",
           "missing_images", "prepare_bins", "bins_align_config", "check_bins_up_to_date", "finalize_bins", "run_bins", "bins_prepare_task", "bins_finalize_task", "main", "recorded_align_config", "command_align_config"]

STAGE = "bins"
INPUTS_DIR = "inputs"
FACES_DIR = "faces"
OUTSIDE_DIR = "_outside"
FOLDS = 10
_CODE_MODULES = ("tasks.bins", "datasets.verification_bin")
_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no"}

EXTRA_COLUMNS: dict[str, pa.DataType] = {
    "path_b": pa.string(),
    "same": pa.bool_(),
    "pair": pa.int64(),
    "fold": pa.int32(),
    "bin_index": pa.int64(),
}


@dataclass(frozen=True)
class Pair:
    """One pair of a list: absolute image paths, whether they show one person, its list line."""

    a: str
    b: str
    same: bool
    line: int


# --- pair lists -----------------------------------------------------------------------------------


def _text_lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(path, "pair list does not exist", "an LFW pairs.txt or a CSV path_a,path_b,same") from None
    except UnicodeDecodeError as exc:
        raise FormatError(path, f"bytes are not UTF-8 ({exc.reason})", "UTF-8 text") from None
    return [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def _detect_format(path: Path, lines: list[tuple[int, str]]) -> str:
    if path.suffix.lower() == ".csv":
        return "csv"
    for _, line in lines[:2]:
        if "," in line:
            return "csv"
        cols = line.split("\t")
        if len(cols) == 3 and cols[2].strip().lower() in _TRUE | _FALSE and not cols[1].strip().isdigit():
            return "csv"
    return "lfw"


def _read_lfw(path: Path, lines: list[tuple[int, str]], root: Path) -> list[Pair]:
    pairs = []
    for k, (lineno, line) in enumerate(lines):
        cols = line.split()
        if k == 0 and 1 <= len(cols) <= 2 and all(c.isdigit() for c in cols):
            continue  # header: folds and pairs per fold
        if len(cols) not in (3, 4):
            raise FormatError(path, f"line {lineno}: {len(cols)} fields", "'name n1 n2' (same) or 'name1 n1 name2 n2' (different)")
        try:
            if len(cols) == 3:
                a, b, same = (cols[0], int(cols[1])), (cols[0], int(cols[2])), True
            else:
                a, b, same = (cols[0], int(cols[1])), (cols[2], int(cols[3])), False
        except ValueError:
            raise FormatError(path, f"line {lineno}: {line!r}", "image numbers as integers") from None
        paths = [str(root / name / f"{name}_{n:04d}.jpg") for name, n in (a, b)]
        pairs.append(Pair(paths[0], paths[1], same, lineno))
    return pairs


def _read_csv(path: Path, lines: list[tuple[int, str]], root: Path) -> list[Pair]:
    delimiter = "\t" if "\t" in lines[0][1] and "," not in lines[0][1] else ","
    pairs = []
    for k, (lineno, line) in enumerate(lines):
        row = next(csv.reader(io.StringIO(line), delimiter=delimiter))
        if len(row) != 3:
            raise FormatError(path, f"line {lineno}: {len(row)} fields {row!r}", "three fields path_a,path_b,same")
        flag = row[2].strip().lower()
        if flag not in _TRUE | _FALSE:
            if k == 0:
                continue  # header
            raise FormatError(path, f"line {lineno}: same = {row[2]!r}", "1/0 or true/false")
        a, b = (str(p if p.is_absolute() else root / p) for p in (Path(row[0].strip()), Path(row[1].strip())))
        pairs.append(Pair(a, b, flag in _TRUE, lineno))
    return pairs


def read_pairs(path: str | os.PathLike, image_root: str | os.PathLike | None = None,
               format: Literal["auto", "lfw", "csv"] = "auto") -> list[Pair]:
    """The pairs of a list, in order, with absolute image paths (see the module docstring).
    Raises :class:`FormatError` naming the file and line for a malformed line."""
    path = Path(path).resolve()
    root = Path(image_root).resolve() if image_root is not None else path.parent
    lines = _text_lines(path)
    if not lines:
        raise FormatError(path, "pair list is empty", "at least one pair")
    fmt = _detect_format(path, lines) if format == "auto" else format
    pairs = _read_lfw(path, lines, root) if fmt == "lfw" else _read_csv(path, lines, root)
    if not pairs:
        raise FormatError(path, "pair list has a header but no pairs", "at least one pair")
    return pairs


def missing_images(pairs: list[Pair]) -> list[tuple[int, str]]:
    """``(line, path)`` of every pair image that is not a file."""
    seen: dict[str, bool] = {}
    out = []
    for pair in pairs:
        for p in (pair.a, pair.b):
            if p not in seen:
                seen[p] = os.path.isfile(p)
            if not seen[p]:
                out.append((pair.line, p))
    return out


# --- plan: inputs folder and align configuration ----------------------------------------------------


@dataclass
class BinsPlan:
    """A set ready to align: its pairs, the align input folder and configuration."""

    spec: PairsSet
    out_dir: Path
    pairs: list[Pair]
    links: dict[str, str]  # absolute image path -> path relative to inputs/
    align_cfg: alignment.AlignConfig
    pairs_sha256: str

    @property
    def inputs_dir(self) -> Path:
        return self.out_dir / INPUTS_DIR

    @property
    def faces_dir(self) -> Path:
        return self.out_dir / FACES_DIR

    @property
    def bin_path(self) -> Path:
        return self.out_dir / f"{self.spec.name}.bin"


def _link_name(path: str, root: Path) -> str:
    p = Path(path)
    try:
        return p.relative_to(root).as_posix()
    except ValueError:
        return f"{OUTSIDE_DIR}/{sha256_bytes(str(p.parent).encode())[:12]}/{p.name}"


def _sync_links(folder: Path, links: dict[str, str]) -> None:
    """Make ``folder`` hold exactly one symbolic link per entry of ``links`` (target -> relative name)."""
    wanted = {rel: target for target, rel in links.items()}
    if folder.is_dir():
        for dirpath, _dirs, files in os.walk(folder, topdown=False):
            here = Path(dirpath)
            for name in files:
                p = here / name
                rel = p.relative_to(folder).as_posix()
                if rel not in wanted or not p.is_symlink() or os.readlink(p) != wanted[rel]:
                    p.unlink()
            if here != folder and not any(here.iterdir()):
                here.rmdir()
    for rel, target in wanted.items():
        p = folder / rel
        if not p.is_symlink():
            p.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, p)


def bins_align_config(spec: PairsSet, cfg: alignment.AlignConfig) -> alignment.AlignConfig:
    """The align configuration for a set's images: the dataset's, with the set's choices."""
    return cfg.model_copy(update={
        "no_face": "center_crop" if spec.no_face == "center_crop" else "skip",
        "face_policy": "insightface" if cfg.face_policy == "all" else cfg.face_policy,
        "already_aligned": spec.aligned,
    })


def prepare_bins(spec: PairsSet, out_dir: str | os.PathLike, cfg: alignment.AlignConfig | None = None) -> BinsPlan:
    """Read the pair list, check its images exist (``missing="fail"``: raise naming the first
    missing ones) and lay out ``inputs/`` for the align stage."""
    out = Path(out_dir).resolve()
    pairs = read_pairs(spec.file, spec.root(), spec.format)
    missing = missing_images(pairs)
    if missing and spec.missing == "fail":
        first = "; ".join(f"line {line}: {p}" for line, p in missing[:3])
        raise FileNotFoundError(f"{Path(spec.file).resolve()}: {len(missing)} pair image(s) do not exist ({first}); "
                                "fix the list or image_root, or set missing='drop'")
    gone = {p for _, p in missing}
    root = spec.root()
    links = {p: _link_name(p, root) for pair in pairs for p in (pair.a, pair.b) if p not in gone}
    if not links:
        raise ValueError(f"{spec.file}: none of the pair images exist (image_root {root})")
    out.mkdir(parents=True, exist_ok=True)
    _sync_links(out / INPUTS_DIR, links)
    return BinsPlan(spec, out, pairs, links, bins_align_config(spec, cfg or alignment.AlignConfig()), sha256_file(spec.file))


# --- finalize: the pack -----------------------------------------------------------------------------


@dataclass
class BinsResult:
    """Outcome of a set: the pack, pairs written / in the list, manifest counts."""

    name: str
    out_dir: Path
    bin_path: Path
    manifest_path: Path
    pairs: int
    listed: int
    counts: dict[str, int]
    skipped: bool


def _faces_by_path(plan: BinsPlan) -> dict[str, tuple[str, str, str]]:
    """``{absolute image path: (status, aligned face path or "", reason)}`` from the align manifest."""
    df = read_manifest(plan.faces_dir / MANIFEST_FILE, stage=alignment.STAGE, extra=alignment.EXTRA_COLUMNS)
    by_rel = {sp: (st, op, rs, sha) for sp, st, op, rs, sha in
              zip(df["source_path"], df["status"], df["output_path"], df["reason"], df["source_sha256"])}
    by_sha = {sha: (st, op, rs) for st, op, rs, sha in by_rel.values() if op}
    out = {}
    for path, rel in plan.links.items():
        status, output, reason, sha = by_rel.get(rel, ("error", "", "not in the align manifest", ""))
        if status == "duplicate" and sha in by_sha:  # the same bytes as another image: use its face
            status, output, reason = by_sha[sha]
        out[path] = (status, str(plan.faces_dir / output) if output else "", reason)
    return out


def _record_params(plan: BinsPlan) -> dict:
    return {"set": plan.spec.model_dump(mode="json", exclude={"file", "image_root"}),
            "file": str(Path(plan.spec.file).resolve()), "image_root": str(plan.spec.root())}


def check_bins_up_to_date(plan: BinsPlan, align_fingerprint: str) -> BinsResult | None:
    """The committed result, marked skipped, when the record matches; else None."""
    record = current_record(plan.out_dir, STAGE, _record_params(plan),
                            {"pairs": plan.pairs_sha256, "faces": align_fingerprint}, code_version(*_CODE_MODULES))
    if record is None:
        return None
    return _result(plan, record.summary, skipped=True)


def finalize_bins(plan: BinsPlan, force: bool = False) -> BinsResult:
    """Write ``<name>.bin`` and the manifest from the aligned faces (``faces/``, finished)."""
    faces_record = load_record(plan.faces_dir)
    if faces_record is None:
        raise RuntimeError(f"{plan.faces_dir}: the pair images are not aligned yet (no align stage record)")
    if force:
        invalidate(plan.out_dir)
    else:
        done = check_bins_up_to_date(plan, faces_record.fingerprint)
        if done is not None:
            logger().info("bins: %s is up to date", plan.bin_path)
            return done
    faces = _faces_by_path(plan)
    gone = ("missing", "", "image file does not exist")
    spec, n = plan.spec, len(plan.pairs)
    rows, images, issame = [], [], []
    for i, pair in enumerate(plan.pairs):
        found = [faces.get(p, gone) for p in (pair.a, pair.b)]
        bad = [(p, f) for p, f in zip((pair.a, pair.b), found) if not f[1]]
        status, reason = "ok", ""
        if bad:
            path, (st, _, why) = bad[0]
            reason = f"{path}: {st}" + (f" ({why})" if why else "")
            if st in ("unreadable", "error", "missing") and spec.missing == "fail":
                raise ValueError(f"{Path(spec.file).resolve()}: line {pair.line}: {reason}; fix the image or set missing='drop'")
            status = "dropped"
        elif any(f[0] == "fallback" for f in found):
            status = "fallback"
            reason = "; ".join(f"{p}: no face found, centre crop used" for p, f in zip((pair.a, pair.b), found) if f[0] == "fallback")
        index = -1
        if status != "dropped":
            index = len(issame)
            images += [Path(found[0][1]).read_bytes(), Path(found[1][1]).read_bytes()]
            issame.append(pair.same)
        rows.append({"item_id": f"{pair.line}", "source_path": pair.a, "source_sha256": "", "status": status,
                     "reason": reason, "output_path": plan.bin_path.name if index >= 0 else "", "path_b": pair.b,
                     "same": pair.same, "pair": i, "fold": i * FOLDS // n, "bin_index": index})
    if not issame:
        raise ValueError(f"{spec.file}: every pair was dropped; no {plan.bin_path.name} written")
    dropped = n - len(issame)
    if dropped:
        logger().warning("bins: %s: %d of %d pairs dropped; later pairs move to other contiguous folds", spec.name, dropped, n)
    write_bin(plan.bin_path, images, issame)
    params = _record_params(plan)
    manifest = pd.DataFrame(rows)
    manifest["params_hash"] = params_hash(params)
    write_manifest(plan.out_dir / MANIFEST_FILE, manifest, stage=STAGE, extra=EXTRA_COLUMNS)
    summary = {"counts": status_counts(manifest), "pairs": len(issame), "listed": n}
    commit_record(plan.out_dir, STAGE, params, {"pairs": plan.pairs_sha256, "faces": faces_record.fingerprint},
                  code_version(*_CODE_MODULES), [plan.bin_path.name, MANIFEST_FILE], summary=summary)
    logger().info("bins: %s: %d pairs (%s)", plan.bin_path, len(issame), summary["counts"])
    return _result(plan, summary, skipped=False)


def _result(plan: BinsPlan, summary: dict, skipped: bool) -> BinsResult:
    return BinsResult(name=plan.spec.name, out_dir=plan.out_dir, bin_path=plan.bin_path,
                      manifest_path=plan.out_dir / MANIFEST_FILE, pairs=int(summary["pairs"]),
                      listed=int(summary["listed"]), counts=dict(summary["counts"]), skipped=skipped)


def run_bins(spec: PairsSet, out_dir: str | os.PathLike, cfg: alignment.AlignConfig | None = None, *,
             force: bool = False) -> BinsResult:
    """Prepare, align (in this process) and pack one set; skipped when nothing changed. Holds
    ``out_dir``'s lock (:func:`datasets.locks.folder_lock`) while it runs; the align stage locks
    ``faces/`` inside it, a lock of its own (``faces/.lock``), as it does for any align run."""
    out = Path(out_dir).resolve()
    with folder_lock(out, STAGE):  # a second bins into out_dir fails at once (FolderBusy)
        plan = prepare_bins(spec, out, cfg)
        alignment.run_align(plan.inputs_dir, plan.faces_dir, plan.align_cfg, force=force)
        return finalize_bins(plan, force=force)


@task(name="bins-prepare", cache_policy=NO_CACHE, task_run_name="bins-prepare-{spec.name}")
def bins_prepare_task(spec: PairsSet, out_dir: str | os.PathLike, cfg: alignment.AlignConfig | None = None) -> BinsPlan:
    return prepare_bins(spec, out_dir, cfg)


@task(name="bins", cache_policy=NO_CACHE, task_run_name="bins-{plan.spec.name}")
def bins_finalize_task(plan: BinsPlan, force: bool = False) -> BinsResult:
    """:func:`finalize_bins`; Skipped in the UI when up to date."""
    return finished(finalize_bins(plan, force=force))


def recorded_align_config(folder: str | os.PathLike) -> alignment.AlignConfig:
    """The :class:`AlignConfig` an align-stage folder was made with (its ``stage.json``), so that a
    ``.bin`` is aligned as the data set it belongs to. ``folder``: the align-stage folder, or a folder
    holding exactly one (``align/<source>/`` of a build-dataset run, or ``<source>/``)."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected an align-stage folder with stage.json)")
    candidates = [root] + sorted(p.parent for p in [*root.glob("*/stage.json"), *root.glob("align/*/stage.json")])
    for candidate in candidates:
        record = load_record(candidate)
        if record is not None and record.stage == alignment.STAGE:
            params = {k: v for k, v in record.params.items() if k in alignment.AlignConfig.model_fields}
            return alignment.AlignConfig(**params)
    raise FormatError(root, "no align stage record found (stage.json of stage 'align')",
                      "an align-stage folder, or a folder holding align/<source>/")


def command_align_config(args: argparse.Namespace) -> alignment.AlignConfig:
    """The alignment options of ``facepipe bins``: those recorded in ``--align-from`` (if given) with the
    options given on the command line on top."""
    if not args.align_from:
        return cli.config_from_args(args, alignment.AlignConfig)
    base = recorded_align_config(args.align_from).model_dump()
    cfg = cli.config_from_args(args, alignment.AlignConfig, **base)
    logger().info("bins: alignment options of %s: %s", args.align_from, cfg.output_params())
    return cfg


def run_command(args: argparse.Namespace) -> int:
    """``facepipe bins`` / ``python -m tasks.bins`` with parsed arguments."""
    spec = cli.config_from_args(args, PairsSet, file=args.pairs)
    cfg = command_align_config(args)
    result = run_bins(spec, args.out_dir, cfg, force=args.force)
    print(json.dumps({"bin": str(result.bin_path), "pairs": result.pairs, "listed": result.listed,
                      "counts": result.counts, "skipped": result.skipped}))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.main("bins", run_command, argv)


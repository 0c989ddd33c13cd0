"""Cases of the hostile-input probe (issue 16): each ends as one clear error or a manifest row, with
nothing lost and nothing half-written."""
from __future__ import annotations

import logging
import os
import re
import resource
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from build_data import synthetic_identities
from conftest import ROOT
from datasets.errors import FormatError, UnsafePickleError
from datasets.images import UnreadableImage, decode_image
from datasets.lst import InsightFaceLine, write_insightface_lst
from datasets.locks import LOCK_FILE, FolderBusy, folder_lock
from datasets.rec_layout import InsightFaceRecWriter, read_labels, read_property, read_rec_index
from datasets.recordio import read_idx_file
from datasets.synthetic import write_pairs_csv
from datasets.verification_bin import load_bin
from eval_data import CodeEmbedder
from ijb_data import write_ijb
from tasks.alignment import AlignConfig, run_align
from tasks.bins import PairsSet, run_bins
from tasks.checkpoint import read_checkpoint
from tasks.ijb import IjbConfig, run_ijb
from tasks.lst import main as lst_main
from tasks.lst import run_lst
from tasks.megaface import MegaFaceConfig, run_megaface
from tasks.merge import run_merge
from tasks.pack import run_pack
from tasks.training.config import load_config
from tasks.training.launcher import run_training
from tasks.training.trainer import main as train_main
from tasks.training.trainer import train
from train_data import tiny_config

ALIGNED = AlignConfig(already_aligned=True, device="cpu")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _png(width: int, height: int, depth: int, colour: int, rows: int | None = None) -> bytes:
    """A PNG of zero pixels; ``rows``: only that many rows of image data (the header still says ``height``)."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    row = b"\x00" * (1 + width * channels * depth // 8)
    data = zlib.compress(row * (height if rows is None else rows))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# --- 1. names that are not UTF-8; 4. decoded-size budget ---------------------------------------------------------

def test_names_that_are_not_utf8_get_a_row_and_the_rest_is_aligned_listed_and_packed(tmp_path):
    raw = tmp_path / "raw"
    names = synthetic_identities(raw, range(2), images=2)
    face = names["synth0_000000"][0].read_bytes()
    person = os.fsencode(raw / "synth0_000000")
    with open(person + b"/caf\xe9.jpg", "wb") as fh:  # Latin-1 bytes: not UTF-8
        fh.write(face)
    os.mkdir(os.fsencode(raw) + b"/b\xe9d")
    with open(os.fsencode(raw) + b"/b\xe9d/1.jpg", "wb") as fh:
        fh.write(face)
    # a 1.3 MB-class decompression bomb: 16-bit RGBA, 13000 x 13000 (8 bytes a pixel = 1.35 GB decoded)
    (raw / "synth0_000001" / "bomb.png").write_bytes(_png(13000, 13000, 16, 6, rows=4))

    result = run_align(raw, tmp_path / "aligned", ALIGNED)
    assert result.counts == {"ok": 4, "unreadable": 3}
    rows = pd.read_parquet(tmp_path / "aligned" / "manifest.parquet").set_index("source_path")
    assert rows.loc["synth0_000000/caf\\xe9.jpg", "status"] == "unreadable"
    assert "not valid UTF-8" in rows.loc["synth0_000000/caf\\xe9.jpg", "reason"]
    assert rows.loc["b\\xe9d/", "status"] == "unreadable" and "not searched" in rows.loc["b\\xe9d/", "reason"]
    assert "image too large" in rows.loc["synth0_000001/bomb.png", "reason"]
    assert "8 bytes per pixel" in rows.loc["synth0_000001/bomb.png", "reason"]
    assert run_align(raw, tmp_path / "aligned", ALIGNED).skipped  # the odd names do not defeat the up-to-date check

    listed = run_lst({"synth": tmp_path / "aligned"}, tmp_path / "lst")
    packed = run_pack(listed.out_dir, tmp_path / "pack")
    assert packed.images == 4 and packed.identities == 2


def test_image_budget_counts_bytes_from_the_header_before_decoding():
    small = _png(64, 48, 16, 6)  # 16-bit RGBA: 8 bytes a pixel
    assert decode_image("small.png", small, max_bytes=64 * 48 * 8).pixels.shape == (48, 64, 3)
    with pytest.raises(UnreadableImage, match=r"small.png: .*64x48 at 8 bytes per pixel needs 24576 bytes"):
        decode_image("small.png", small, max_bytes=64 * 48 * 8 - 1)
    # 169 megapixels pass the pixel guard; their 1.35 GB do not pass the byte budget
    with pytest.raises(UnreadableImage, match=r"image too large: 13000x13000 at 8 bytes per pixel"):
        decode_image("bomb.png", _png(13000, 13000, 16, 6, rows=2))


# --- 4. the .bin unpickler's allocation budget --------------------------------------------------------------------

def test_bin_pickles_cannot_allocate_beyond_a_budget(tmp_path):
    # 33 bytes asking for bytearray(2**40): without the budget this is a MemoryError (or 1 TiB)
    bomb = tmp_path / "bomb.bin"
    bomb.write_bytes(b"\x80\x02c__builtin__\nbytearray\n\x8a\x06\x00\x00\x00\x00\x00\x01\x85R.")
    with pytest.raises(FormatError, match=r"bomb.bin: pickle call __builtin__.bytearray would allocate 1099511627776 "
                                          r"bytes .*allocation budget"):
        load_bin(bomb)
    # an array of 2**36 bytes through numpy's own reconstructor
    shaped = tmp_path / "shaped.bin"
    reconstruct = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
                   b"\x8a\x05\x00\x00\x00\x00\x10\x85C\x01b\x87R.")
    shaped.write_bytes(reconstruct)
    with pytest.raises(FormatError, match=r"_reconstruct\(shape \(68719476736,\)\) would allocate"):
        load_bin(shaped)
    # one memoised 200 kB string encoded 1000 times: 200 MB from a 200 kB file
    text = "x" * 200_000
    body = b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(text)) + text.encode() + b"q\x01]("
    body += b"h\x00h\x01X\x06\x00\x00\x00latin1\x86R" * 1000 + b"e."
    repeated = tmp_path / "repeated.bin"
    repeated.write_bytes(body)
    with pytest.raises(FormatError, match=r"_codecs.encode would allocate 200000 bytes"):
        load_bin(repeated)
    # other codecs could multiply the size: only Python 3's latin1 form of bytes is taken
    widened = tmp_path / "widened.bin"
    widened.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x06\x00\x00\x00utf-32\x86R.")
    with pytest.raises(FormatError, match=r"_codecs.encode with encoding 'utf-32' \(expected 'latin1'"):
        load_bin(widened)


# --- 8. text files and .idx records ------------------------------------------------------------------------------

def _small_set(folder: Path) -> Path:
    with InsightFaceRecWriter(folder, image_size=(112, 112)) as writer:
        for i in range(4):
            writer.add(i // 2, _png(8, 8, 8, 2))
    return folder


def test_bad_property_labels_and_idx_files_are_format_errors_naming_file_and_key(tmp_path):
    folder = _small_set(tmp_path / "set")
    (folder / "property").write_bytes(b"2,112,\xff112")
    with pytest.raises(FormatError, match=r"property: byte 6 is not UTF-8"):
        read_property(folder / "property")
    (tmp_path / "labels.csv").write_bytes(b"label,identity\n0,caf\xe9\n")
    with pytest.raises(FormatError, match=r"labels.csv: byte 20 is not UTF-8"):
        read_labels(tmp_path / "labels.csv")
    (folder / "property").write_text("2,112,112")

    idx = folder / "train.idx"
    good = idx.read_text()
    lines = dict(line.split("\t") for line in good.splitlines())
    # key 1 pointing at key 2's record: a valid record, but not the one stored under key 1
    idx.write_text(good.replace(f"1\t{lines['1']}\n", f"1\t{lines['2']}\n", 1))
    with pytest.raises(FormatError, match=rf"train.rec: record key 1 at offset {lines['2']}: the record's header id is 2"):
        read_rec_index(folder)
    # a negative offset would read from the end of the file
    idx.write_text(good.replace(f"3\t{lines['3']}\n", "3\t-64\n", 1))
    with pytest.raises(FormatError, match=r"train.idx: line 3: key 3 has the negative offset -64"):
        read_idx_file(idx)
    with pytest.raises(FormatError, match=r"negative offset -64"):
        read_rec_index(folder)
    idx.write_text(good)
    assert read_rec_index(folder).labels.tolist() == [0, 0, 1, 1]


def test_checkpoint_refusal_names_the_whole_global_and_gives_no_unsafe_advice(tmp_path):
    class Payload:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    path = tmp_path / "crafted.pt"
    torch.save({"format": "facepipe-train-checkpoint", "meta": Payload()}, path)
    with pytest.raises(UnsafePickleError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert f"{path}: refused: its pickle asks for the global {os.system.__module__}.system," in message
    assert "\n" not in message and "weights_only" not in message and "False" not in message


# --- 7. options accepted silently before ----------------------------------------------------------------------------

@pytest.mark.parametrize("options, error", [
    ({"loss": "cosface", "margin_m": 5}, r"option 'margin_m' 5.0 is outside \[0, 1\) .* for loss cosface"),
    ({"loss": 2, "margin_m": -1}, r"option 'margin_m' -1.0 is outside \[0, 1\)"),
    ({"loss": "arcface", "margin_m": 1.6}, r"option 'margin_m' 1.6 is outside \[0, pi/2\)"),
    ({"lr": "inf"}, r"option 'lr': Input should be a finite number"),
    ({"margin_s": float("nan")}, r"option 'margin_s': Input should be a finite number"),
])
def test_options_outside_their_range_are_refused_naming_the_option(options, error):
    with pytest.raises(ValueError, match=error):
        load_config(None, options)


# --- 2, 3, 8: run folders: overwrite refusal, locks, leftovers ------------------------------------------------------

def _hold_lock(folder: Path, what: str) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until it is killed."""
    code = ("import sys\nfrom datasets.locks import folder_lock\n"
            "with folder_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True)\n    sys.stdin.read()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), what], cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_locked_folder_fails_at_once_and_a_killed_holder_leaves_no_lock(tmp_path):
    raw = tmp_path / "raw"
    synthetic_identities(raw, range(2), images=2)
    out = tmp_path / "aligned"
    holder = _hold_lock(out, "align")
    try:
        with pytest.raises(FolderBusy, match=rf"^{out}: in use by align run, pid {holder.pid}; wait until it ends"):
            run_align(raw, out, ALIGNED)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing planned, no parts, no temp files
        with pytest.raises(FolderBusy, match=rf"pid {holder.pid}"):
            with folder_lock(out, "test"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()
    assert run_align(raw, out, ALIGNED).counts == {"ok": 4}  # kill -9 left no stale lock

    listed = run_lst({"synth": out}, tmp_path / "lst")
    pack_dir = tmp_path / "pack"
    holder = _hold_lock(pack_dir, "pack")
    try:
        with pytest.raises(FolderBusy, match=rf"{pack_dir}: in use by pack run, pid {holder.pid}"):
            run_pack(listed.out_dir, pack_dir)
        assert sorted(p.name for p in pack_dir.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory) -> dict[str, Path]:
    """The cheapest real inputs of the lst, merge, bins, megaface and ijb stages: 2 generated aligned
    identities of 2 faces, aligned, listed and packed; a pair list of them; a generated IJB-C set."""
    root = tmp_path_factory.mktemp("stage-inputs")
    names = synthetic_identities(root / "raw", range(2), images=2)
    aligned = run_align(root / "raw", root / "aligned", ALIGNED).out_dir
    pack = run_pack(run_lst({"synth": aligned}, root / "lst").out_dir, root / "pack").out_dir
    pairs = write_pairs_csv(root / "pairs.csv", names, num_pairs=2, folds=1, relative_to=root / "raw")
    return {"raw": root / "raw", "aligned": aligned, "pack": pack, "pairs": pairs, "ijb": write_ijb(root / "ijb")}


# each stage on ``inputs`` into ``out``, with force=True: a run that did not wait for the lock would
# start by removing out/stage.json
STAGE_RUNS = {
    "lst": lambda inputs, out: run_lst({"synth": inputs["aligned"]}, out, force=True),
    "merge": lambda inputs, out: run_merge([inputs["pack"]], out, force=True),
    "bins": lambda inputs, out: run_bins(PairsSet(name="synth", file=str(inputs["pairs"]), image_root=str(inputs["raw"]),
                                                  aligned=True), out, ALIGNED, force=True),
    "megaface": lambda inputs, out: run_megaface(CodeEmbedder(), str(inputs["pack"]), str(inputs["pack"]), out,
                                                 MegaFaceConfig(device="cpu", sizes=[4]), force=True),
    "ijb": lambda inputs, out: run_ijb(CodeEmbedder(), inputs["ijb"], out, ["IJBC"], IjbConfig(device="cpu"), force=True),
}


@pytest.mark.parametrize("stage", sorted(STAGE_RUNS))
def test_every_stage_refuses_a_folder_another_run_holds_and_touches_nothing_in_it(stage, stage_inputs, tmp_path):
    out = tmp_path / stage
    out.mkdir()
    (out / "stage.json").write_text('{"stage": "%s"}' % stage)  # an earlier run's outputs
    (out / "result.bin").write_bytes(b"earlier output")
    (out / ".result.bin.123-abc.partial").write_bytes(b"the holder's temporary file")
    holder = _hold_lock(out, stage)
    try:
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(FolderBusy, match=rf"^{re.escape(str(out.resolve()))}: in use by {stage} run, pid {holder.pid}; "):
            STAGE_RUNS[stage](stage_inputs, out)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # lock file included: still the holder's
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()
    STAGE_RUNS[stage](stage_inputs, out)  # the inputs are good: with the holder gone, the stage runs


def test_a_stage_command_line_on_a_locked_folder_is_one_error_line_and_status_2(stage_inputs, tmp_path, capsys):
    out = tmp_path / "lst"
    holder = _hold_lock(out, "lst")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        assert lst_main([str(out), str(stage_inputs["aligned"])]) == 2
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        holder.kill()
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()
    err = capsys.readouterr().err
    assert err == f"error: {out.resolve()}: in use by lst run, pid {holder.pid}; wait until it ends or stop it (one run per folder)\n"
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_a_failed_pack_leaves_no_manifest(tmp_path):
    raw = tmp_path / "raw"
    names = synthetic_identities(raw, range(4), images=2)
    lines = [InsightFaceLine(True, str(p), label) for label, name in enumerate(sorted(names))
             for _ in range(25) for p in names[name]]
    write_insightface_lst(tmp_path / "a.lst", lines)
    out = tmp_path / "out"
    # "disk full": while packing, no file may grow past 100 kB, so train.rec (200 records) cannot be
    # written (the write fails with EFBIG instead of the process getting SIGXFSZ)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(OSError, match="File too large"):
            run_pack(tmp_path / "a.lst", out)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no manifest.parquet, no .partial files


def _command(argv: list[str]) -> int:
    """``python -m tasks.training *argv`` in this process (its signal handlers and logging undone after)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        return train_main(argv)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        root.handlers[:], root.level = saved[0], saved[1]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != LOCK_FILE}


def test_training_refuses_to_overwrite_a_run_and_its_checkpoints_are_independent_files(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", max_steps=2, verbose=2, ckpt=1)
    assert train(cfg).state == "finished"
    ckpt = tmp_path / "run" / "checkpoints"
    last, best = ckpt / "last.pt", ckpt / "best.pt"
    assert os.stat(last).st_ino != os.stat(best).st_ino and os.stat(best).st_nlink == 1
    before = _files(tmp_path / "run")

    # the command line without --resume, as after a finished run or a kill: refused, nothing touched
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    capsys.readouterr()  # the finished run's own log lines
    assert _command(["--config", str(config), "--max-steps", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {tmp_path / 'run'} already holds a run (checkpoints/last.pt"), err
    assert "--resume auto" in err and "--output" in err and "\n" not in err
    assert _files(tmp_path / "run") == before

    # a second trainer while the folder is locked by another process
    holder = _hold_lock(tmp_path / "run", "training")
    try:
        with pytest.raises(FolderBusy, match=rf"in use by training run, pid {holder.pid}"):
            train(cfg.model_copy(update={"resume": "auto"}))
        with pytest.raises(FolderBusy):
            run_training(cfg.model_copy(update={"resume": "auto"}))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        holder.stdin.close()

    # a checkpoint write killed half-way left a temporary file: resuming sweeps it and goes on
    stray = ckpt / f".last.pt.{12345}-deadbeef.partial"
    stray.write_bytes(b"half a checkpoint")
    resumed = train(cfg.model_copy(update={"resume": "auto", "max_steps": 3}))
    assert resumed.step == 3 and not stray.exists()
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".partial")]

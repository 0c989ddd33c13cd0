"""Verification packs from pair lists: LFW pairs.txt over real photos, CSV over generated aligned faces."""
from __future__ import annotations

import csv
import shutil

import pytest

from build_data import RAW, aligned_small_photos, require_photos, synthetic_identities
from conftest import FACES
from datasets.errors import FormatError
from datasets.locks import LOCK_FILE
from datasets.manifest import read_manifest
from datasets.verification_bin import decode_bin, load_bin
from tasks.alignment import AlignConfig
from tasks.bins import EXTRA_COLUMNS, STAGE, PairsSet, read_pairs, run_bins

CPU = AlignConfig(device="cpu")


def _lfw_root(root):
    """LFW layout <root>/<Name>/<Name>_<%04d>.jpg from the bundled photos; Kit_Harington_0001 has no face."""
    require_photos()
    photos = {
        "Barack_Obama": [RAW / "barack_obama" / "5_small.jpg", RAW / "barack_obama" / "6_240p.jpg"],
        "Rose_Leslie": [RAW / "rose_leslie" / "1.jpg", RAW / "rose_leslie" / "2.jpg"],
        "Kit_Harington": [FACES / "edge" / "no_face_noise.jpg"],
    }
    for name, files in photos.items():
        (root / name).mkdir(parents=True)
        for n, src in enumerate(files, 1):
            shutil.copy(src, root / name / f"{name}_{n:04d}.jpg")
    return root


def _manifest(out):
    return read_manifest(out / "manifest.parquet", stage=STAGE, extra=EXTRA_COLUMNS)


def test_lfw_pairs_are_aligned_like_the_dataset_and_keep_their_folds(tmp_path):
    root = _lfw_root(tmp_path / "lfw")
    pairs_txt = tmp_path / "pairs.txt"
    pairs_txt.write_text("1\t2\nBarack_Obama\t1\t2\nRose_Leslie\t1\t2\n"
                         "Barack_Obama\t1\tRose_Leslie\t2\nKit_Harington\t1\tBarack_Obama\t2\n", encoding="utf-8")
    spec = PairsSet(name="lfw", file=str(pairs_txt), image_root=str(root))
    result = run_bins(spec, tmp_path / "bins", CPU)
    assert (result.pairs, result.listed, result.counts) == (4, 4, {"fallback": 1, "ok": 3})
    images, issame = load_bin(result.bin_path)
    assert issame.tolist() == [True, True, False, False]
    decoded, _ = decode_bin(result.bin_path)
    assert decoded.shape == (8, 112, 112, 3)
    # The same faces as the align stage writes for the same photos (same detector, choice and warp).
    dataset = aligned_small_photos()
    assert images[0] == (dataset / "images" / "barack_obama" / "5_small.jpg").read_bytes()
    assert images[3] == (dataset / "images" / "rose_leslie" / "2.jpg").read_bytes()
    assert images[0] == images[4] and images[1] == images[7] and images[3] == images[5]  # photos in two pairs
    df = _manifest(result.out_dir)
    row = df.iloc[3]
    assert row["status"] == "fallback" and "Kit_Harington_0001.jpg: no face found, centre crop used" in row["reason"]
    assert df["bin_index"].tolist() == [0, 1, 2, 3] and df["item_id"].tolist() == ["2", "3", "4", "5"]
    assert run_bins(spec, tmp_path / "bins", CPU).skipped

    # Missing images fail before any alignment, naming the line; or their pairs are dropped.
    broken = tmp_path / "broken.txt"
    broken.write_text("Rose_Leslie\t1\t3\nKit_Harington\t1\tRose_Leslie\t1\nRose_Leslie\t1\tBarack_Obama\t1\n",
                      encoding="utf-8")
    with pytest.raises(FileNotFoundError, match=r"1 pair image\(s\) do not exist \(line 1: .*Rose_Leslie_0003.jpg"):
        run_bins(PairsSet(name="x", file=str(broken), image_root=str(root)), tmp_path / "x", CPU)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == [LOCK_FILE]  # nothing written but the lock
    lenient = PairsSet(name="x", file=str(broken), image_root=str(root), missing="drop", no_face="drop")
    dropped = run_bins(lenient, tmp_path / "x", CPU)
    assert (dropped.pairs, dropped.counts) == (1, {"dropped": 2, "ok": 1})
    reasons = _manifest(dropped.out_dir)["reason"].tolist()
    assert reasons[0].endswith("Rose_Leslie_0003.jpg: missing (image file does not exist)")
    assert reasons[1].endswith("Kit_Harington_0001.jpg: no_face (no face found)") and reasons[2] == ""


def test_csv_pairs_of_aligned_faces_pass_through(tmp_path):
    from datasets.synthetic import write_pairs_csv

    faces = tmp_path / "faces"
    names = synthetic_identities(faces, range(20), images=2)
    pairs_csv = write_pairs_csv(tmp_path / "pairs.csv", names, num_pairs=40, folds=10, relative_to=faces)
    spec = PairsSet(name="synth", file=str(pairs_csv), image_root=str(faces), aligned=True)
    result = run_bins(spec, tmp_path / "bins", CPU)
    assert (result.pairs, result.counts) == (40, {"ok": 40})
    with open(pairs_csv, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    images, issame = load_bin(result.bin_path)
    assert issame.tolist() == [r["same"] == "1" for r in rows]
    for i, r in enumerate(rows):  # aligned 112x112 JPEGs go in byte for byte
        assert images[2 * i] == (faces / r["path_a"]).read_bytes()
        assert images[2 * i + 1] == (faces / r["path_b"]).read_bytes()
    folds = _manifest(result.out_dir)["fold"].tolist()
    assert folds == [i // 4 for i in range(40)]

    # An unreadable image fails with missing="fail" (naming the line), else its pairs are dropped.
    victim = faces / rows[5]["path_a"]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"pairs.csv: line 7: .* unreadable"):
        run_bins(spec, tmp_path / "bins", CPU)
    lenient = run_bins(spec.model_copy(update={"missing": "drop"}), tmp_path / "bins", CPU)
    bad = sum(victim in (faces / r["path_a"], faces / r["path_b"]) for r in rows)
    assert lenient.pairs == 40 - bad and lenient.counts["dropped"] == bad >= 1


def test_pair_list_parsing(tmp_path):
    lfw = tmp_path / "pairs.txt"
    lfw.write_text("10\t300\nA\t1\t2\nA\t1\tB\t3\n", encoding="utf-8")
    pairs = read_pairs(lfw, "/data/lfw")
    assert [(p.a, p.b, p.same, p.line) for p in pairs] == [
        ("/data/lfw/A/A_0001.jpg", "/data/lfw/A/A_0002.jpg", True, 2),
        ("/data/lfw/A/A_0001.jpg", "/data/lfw/B/B_0003.jpg", False, 3),
    ]
    lfw.write_text("A\t1\t2\nA\tone\t2\n", encoding="utf-8")  # no header is fine; a bad number is not
    with pytest.raises(FormatError, match=r"pairs.txt: line 2"):
        read_pairs(lfw)
    lfw.write_text("A\t1\t2\t3\t4\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"line 1: 5 fields"):
        read_pairs(lfw)
    tsv = tmp_path / "pairs_label.txt"  # InsightFace's pairs_label.txt: path1 \t path2 \t 1|0
    tsv.write_text("x/a b.jpg\t/abs/c.jpg\t1\ny.jpg\tz.jpg\t0\n", encoding="utf-8")
    pairs = read_pairs(tsv, "/root")
    assert [(p.a, p.b, p.same) for p in pairs] == [("/root/x/a b.jpg", "/abs/c.jpg", True), ("/root/y.jpg", "/root/z.jpg", False)]
    bad = tmp_path / "p.csv"
    bad.write_text("path_a,path_b,same\na.jpg,b.jpg,maybe\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"p.csv: line 2: same = 'maybe'"):
        read_pairs(bad)
    with pytest.raises(ValueError, match="must be letters"):
        PairsSet(name="../lfw", file="x")

"""The pack stage: real rec bytes from real aligned faces, verbatim payloads, shuffling, resume after SIGKILL."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pandas as pd
import pytest

import mxnet_env
from build_data import RAW, aligned_small_photos, require_photos, synthetic_identities
from conftest import ROOT
from datasets.errors import FormatError
from datasets.images import load_image
from datasets.lst import InsightFaceLine, read_insightface_lst, write_insightface_lst
from datasets.manifest import read_manifest
from datasets.rec_layout import InsightFaceRecWriter, read_property, read_rec_index
from datasets.recordio import MXIndexedRecordIO, MXRecordIO, unpack
from tasks.alignment import AlignConfig, run_align
from tasks.lst import run_lst
from tasks.pack import _BATCH, EXTRA_COLUMNS, STAGE, PackConfig, _SizeCheck, encoded_size, pack_order, run_pack

mxnet_python = mxnet_env.pytest_fixture()


@pytest.fixture
def lst_dir(tmp_path):
    raw = tmp_path / "synth"
    synthetic_identities(raw, range(5), images=3)
    aligned = run_align(raw, tmp_path / "aligned", AlignConfig(already_aligned=True)).out_dir
    return run_lst({"synth": aligned, "real": aligned_small_photos()}, tmp_path / "lst").out_dir


def _records(folder):
    with MXIndexedRecordIO(folder / "train.idx", folder / "train.rec", "r") as rec:
        return {key: unpack(rec.read_idx(key)) for key in rec.keys}


def test_pack_copies_faces_verbatim_in_the_insightface_layout(tmp_path, lst_dir):
    lines = read_insightface_lst(lst_dir / "train.lst")
    result = run_pack(lst_dir, tmp_path / "pack")
    assert (result.images, result.identities, result.num_classes, result.image_size) == (19, 7, 7, (112, 112))
    assert str(read_property(result.property_path)) == "7,112,112"
    records = _records(result.out_dir)
    n, k = len(lines), 7
    assert sorted(records) == list(range(0, n + k + 1))
    meta, payload = records[0]
    assert meta.flag == 2 and list(meta.label) == [n + 1, n + 1 + k] and payload == b""
    for key, line in enumerate(lines, 1):  # no shuffle: list order; [label, aligned] headers, bytes verbatim
        header, payload = records[key]
        assert header.flag == 2 and list(header.label) == [line.label, 1.0] and header.id == key
        assert payload == open(line.path, "rb").read()
    runs = [tuple(records[key][0].label) for key in range(n + 1, n + k + 1)]
    starts = [1] + [i + 1 for i in range(1, n) if lines[i].label != lines[i - 1].label]
    assert runs == list(zip(starts, starts[1:] + [n + 1]))

    df = read_manifest(result.manifest_path, stage=STAGE, extra=EXTRA_COLUMNS)
    assert (df["status"] == "ok").all() and list(df["key"]) == list(range(1, n + 1))
    with MXRecordIO(result.rec_path, "r") as rec:  # the manifest's offsets point at the records
        for offset, key in zip(df["offset"], df["key"]):
            assert unpack(rec.read_at(int(offset)))[0].id == key
    index = read_rec_index(result.out_dir)
    assert index.layout == "insightface" and list(index.labels) == [line.label for line in lines]
    assert (result.out_dir / "labels.csv").read_bytes() == (lst_dir / "labels.csv").read_bytes()

    again = run_pack(lst_dir, tmp_path / "pack")
    assert again.skipped
    scalar = run_pack(lst_dir, tmp_path / "scalar", PackConfig(label_format="scalar"))
    header, payload = _records(scalar.out_dir)[1]
    assert header.flag == 0 and header.label == lines[0].label and payload == records[1][1]


def test_shuffle_keeps_identities_contiguous_and_is_byte_identical(tmp_path, lst_dir):
    lines = read_insightface_lst(lst_dir / "train.lst")
    cfg = PackConfig(shuffle=True, seed=7)
    a = run_pack(lst_dir, tmp_path / "a", cfg)
    b = run_pack(lst_dir, tmp_path / "b", cfg)
    for name in ("train.rec", "train.idx", "property"):
        assert (a.out_dir / name).read_bytes() == (b.out_dir / name).read_bytes(), name
    index = read_rec_index(a.out_dir)
    labels = index.labels.tolist()
    assert labels != [line.label for line in lines]  # the order did change
    runs = [labels[0]] + [y for x, y in zip(labels, labels[1:]) if y != x]
    assert len(runs) == len(set(runs)) == 7 and len(index.identities) == 7  # one contiguous run per identity
    assert sorted(labels) == sorted(line.label for line in lines)
    other = run_pack(lst_dir, tmp_path / "c", PackConfig(shuffle=True, seed=8))
    assert (other.out_dir / "train.rec").read_bytes() != (a.out_dir / "train.rec").read_bytes()
    order = pack_order([3, 3, 1, 1, 1, 2], shuffle=True, seed=0)
    assert sorted(order.tolist()) == list(range(6))
    grouped = [[3, 3, 1, 1, 1, 2][i] for i in order]
    assert len([g for i, g in enumerate(grouped) if i == 0 or g != grouped[i - 1]]) == 3


def test_im2rec_lists_pack_and_the_form_is_detected(tmp_path):
    """MXNet im2rec lists ('index\tlabel\tpath', labels as %f): packed as face crops, class = first
    label, from Python and from the command line; lists of neither form name their line."""
    from datasets.lst import Im2recLine, detect_lst_form, write_im2rec_lst
    from tasks.pack import main

    people = synthetic_identities(tmp_path / "faces", range(3), images=2, seed=1)
    paths = [p for files in people.values() for p in files]
    lst = tmp_path / "user_im2rec.lst"
    write_im2rec_lst(lst, [Im2recLine(100 + i, (float(i // 2), 7.0), os.path.relpath(p, tmp_path) if i == 0 else str(p))
                           for i, p in enumerate(paths)])
    assert detect_lst_form(lst) == "im2rec" and lst.read_text().startswith("100\t0.000000\t7.000000\t")
    result = run_pack(lst, tmp_path / "pack")
    assert (result.images, result.identities, result.num_classes, result.image_size) == (6, 3, 3, (112, 112))
    records = _records(result.out_dir)
    assert [records[k][1] for k in range(1, 7)] == [p.read_bytes() for p in paths]  # verbatim
    assert [list(records[k][0].label) for k in (1, 3, 6)] == [[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
    assert main([str(lst), str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "train.rec").read_bytes() == (tmp_path / "pack" / "train.rec").read_bytes()

    half = tmp_path / "half.lst"
    half.write_text(f"0\t1.5\t{paths[0]}\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"half\.lst: entry 1 .*label 1\.5 \(expected a whole-number class label"):
        run_pack(half, tmp_path / "bad")
    neither = tmp_path / "neither.lst"
    neither.write_text(f"{paths[0]}\t3\n", encoding="utf-8")
    with pytest.raises(FormatError, match=r"neither\.lst: line 1: 2 tab-separated columns .*InsightFace .*im2rec"):
        run_pack(neither, tmp_path / "bad")


def test_foreign_lists_unaligned_lines_and_bad_images(tmp_path):
    require_photos()
    aligned = aligned_small_photos()
    df = read_manifest(aligned / "manifest.parquet")
    row = df[df["source_path"] == "barack_obama/6_240p.jpg"].iloc[0]
    landmarks = tuple(map(tuple, np.asarray(row["landmarks"]).reshape(5, 2)))
    photo = str(RAW / "barack_obama" / "6_240p.jpg")
    face = aligned / row["output_path"]
    lst = tmp_path / "user.lst"
    write_insightface_lst(lst, [
        InsightFaceLine(True, str(face), 4),
        InsightFaceLine(False, photo, 4, (0, 0, 10, 10), landmarks),  # face2rec2 aligns this one
        InsightFaceLine(False, photo, 5, (60, 20, 180, 200)),  # bbox, no landmarks: cropped as face_preprocess does
        InsightFaceLine(True, os.path.relpath(face, tmp_path), 5),  # relative to the list's folder
        InsightFaceLine(False, photo, 5),  # neither: skipped, as face2rec2 does
    ])
    result = run_pack(lst, tmp_path / "pack")
    assert result.images == 4 and result.num_classes == 6
    assert result.counts == {"fallback": 1, "ok": 3, "skipped": 1}
    records = _records(result.out_dir)
    warped = load_image(face).astype(int)
    again = cv2.imdecode(np.frombuffer(records[2][1], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].astype(int)
    assert list(records[2][0].label) == [4.0, 0.0] and np.abs(again - warped).mean() < 4
    # face_preprocess.preprocess without landmarks: box grown by 22 px each side, clipped, resized
    pixels = load_image(photo)
    crop = cv2.resize(pixels[0:222, 38:202], (112, 112)).astype(int)
    cropped = cv2.imdecode(np.frombuffer(records[3][1], np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1].astype(int)
    assert list(records[3][0].label) == [5.0, 0.0] and np.abs(cropped - crop).mean() < 4
    man = read_manifest(result.manifest_path, stage=STAGE, extra=EXTRA_COLUMNS)
    assert man.loc[2, "status"] == "fallback" and "bbox grown by 22 px" in man.loc[2, "reason"]
    assert man.loc[4, "status"] == "skipped" and man.loc[4, "key"] == -1 and "neither landmarks nor a bbox" in man.loc[4, "reason"]

    big = tmp_path / "big.lst"
    write_insightface_lst(big, [InsightFaceLine(True, photo, 0)])
    with pytest.raises(FormatError, match=r"big.lst: entry 1 .*6_240p.jpg\): image is 240x427 \(expected 112x112"):
        run_pack(big, tmp_path / "bad", image_size="112,112")
    gone = tmp_path / "gone.lst"
    write_insightface_lst(gone, [InsightFaceLine(True, str(tmp_path / "nope.jpg"), 0)])
    with pytest.raises(FormatError, match=r"gone.lst: entry 1: image .*nope.jpg cannot be read"):
        run_pack(gone, tmp_path / "bad", image_size="112,112")
    assert not (tmp_path / "bad" / "train.rec").exists()


def test_killed_pack_leaves_no_torn_file_and_resumes_to_the_same_bytes(tmp_path):
    # A list long enough that packing takes a while: 40 generated faces, each listed 150 times.
    raw = tmp_path / "synth"
    names = synthetic_identities(raw, range(20), images=2)
    lines = [InsightFaceLine(True, str(p), label) for label, name in enumerate(sorted(names))
             for _ in range(150) for p in names[name]]
    lst = tmp_path / "big.lst"
    write_insightface_lst(lst, lines)
    reference = run_pack(lst, tmp_path / "reference", PackConfig(shuffle=True, seed=1))
    assert reference.images == 6000

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tasks.pack", str(lst), str(out), "--shuffle", "--seed", "1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    try:
        while not any(p.name.endswith(".partial") and p.stat().st_size > 100_000 for p in out.glob(".*")):
            assert proc.poll() is None, "pack ended before it was killed: " + proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "pack never started writing"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "train.rec").exists() and not (out / "stage.json").exists(), "killed too late"
    assert [p for p in out.iterdir() if p.name.endswith(".partial")], "the kill should leave temporary files"

    resumed = run_pack(lst, out, PackConfig(shuffle=True, seed=1))
    assert not resumed.skipped and resumed.images == 6000
    for name in ("train.rec", "train.idx", "property"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name
    assert not [p for p in out.iterdir() if p.name.endswith(".partial")]
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == 6000 and (manifest["status"] == "ok").all()


def test_encoded_size_reads_jpeg_and_png_headers(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    variants = {}
    for name, kwargs in {"baseline.jpg": {}, "progressive.jpg": {"progressive": True},
                         "exif.jpg": {"exif": Image.Exif()}, "image.png": {}}.items():
        img.save(tmp_path / name, **kwargs)
        variants[name] = (tmp_path / name).read_bytes()
    variants["opencv.jpg"] = cv2.imencode(".jpg", pixels)[1].tobytes()
    for name, data in variants.items():
        assert encoded_size(data) == (37, 53), name
    assert encoded_size(b"GIF89a....") is None and encoded_size(b"\xff\xd8\xff") is None
    assert encoded_size(variants["baseline.jpg"][:20]) is None  # truncated before the frame header


@pytest.mark.mxnet
def test_pack_is_byte_identical_to_face2rec2_on_mxnet(mxnet_python, tmp_path, lst_dir):
    from bench.pack import REFERENCE

    ours = run_pack(lst_dir, tmp_path / "ours")
    (tmp_path / "mx").mkdir()
    out = mxnet_env.run_script(REFERENCE, str(lst_dir / "train.lst"), str(tmp_path / "mx"), "1", python=mxnet_python)
    assert json.loads(out.strip().splitlines()[-1])["images"] == ours.images
    for name in ("train.rec", "train.idx"):
        assert (tmp_path / "mx" / name).read_bytes() == (ours.out_dir / name).read_bytes(), name


def test_batches_give_the_bytes_of_one_record_at_a_time_and_the_manifest_hashes_every_payload(tmp_path):
    raw = tmp_path / "synth"
    names = synthetic_identities(raw, range(9), images=3)
    files = [p for name in sorted(names) for p in names[name]]
    # 2.5 batches; identity runs cross the batch borders; the same files listed many times
    lines = [InsightFaceLine(True, str(files[i % len(files)]), (i // 7) % 9) for i in range(_BATCH * 5 // 2)]
    lst = tmp_path / "long.lst"
    write_insightface_lst(lst, lines)
    result = run_pack(lst, tmp_path / "pack")
    with InsightFaceRecWriter(tmp_path / "one", label_format="array") as writer:
        for line in lines:
            writer.add(line.label, open(line.path, "rb").read())
    for name in ("train.rec", "train.idx", "property"):
        assert (result.out_dir / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    man = read_manifest(result.manifest_path, stage=STAGE, extra=EXTRA_COLUMNS)
    digests = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    assert man["source_sha256"].tolist() == [digests[line.path] for line in lines]
    assert man["item_id"].tolist() == [str(i) for i in range(len(lines))] and (man["line"] == man.index).all()

    assert run_pack(lst, tmp_path / "pack").skipped
    os.utime(files[3], ns=(time.time_ns(), time.time_ns() + 10**9))  # same bytes, newer mtime: not up to date
    assert not run_pack(lst, tmp_path / "pack").skipped
    assert run_pack(lst, tmp_path / "pack").skipped


def test_size_check_agrees_with_the_frame_header_walk(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    def jpeg(h, w, quality=95):
        return cv2.imencode(".jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()

    png = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(png)
    progressive = tmp_path / "p.jpg"
    Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(progressive, progressive=True)
    same_encoder = [jpeg(112, 112), jpeg(112, 112), jpeg(112, 96), jpeg(96, 112), jpeg(112, 112, 80), jpeg(112, 112)]
    samples = same_encoder + [png.read_bytes(), progressive.read_bytes(), jpeg(112, 112)[:200], b"", b"\xff\xd8",
                              b"GIF89a" + bytes(100), jpeg(112, 112)]
    check = _SizeCheck((112, 112))
    assert [check(data) for data in samples] == [encoded_size(data) == (112, 112) and data[:2] == b"\xff\xd8"
                                                 for data in samples]
    assert check.prefix is not None  # remembered from the JPEGs walked


def test_wrong_or_missing_image_deep_in_the_list_names_its_entry(tmp_path):
    raw = tmp_path / "synth"
    names = synthetic_identities(raw, range(2), images=2)
    files = [p for name in sorted(names) for p in names[name]]
    small = tmp_path / "small.jpg"
    cv2.imwrite(str(small), np.zeros((112, 96, 3), np.uint8))  # same encoder as the faces, another size
    lines = [InsightFaceLine(True, str(files[i % 4]), i % 2) for i in range(700)]
    png = tmp_path / "face.png"  # not a JPEG: the full check accepts it, the faces after it still pass
    cv2.imwrite(str(png), cv2.imread(str(files[0])))
    lines[300] = InsightFaceLine(True, str(png), 0)
    write_insightface_lst(tmp_path / "png.lst", lines)
    packed = run_pack(tmp_path / "png.lst", tmp_path / "png")
    assert packed.images == 700 and _records(packed.out_dir)[301][1] == png.read_bytes()
    lines[600] = InsightFaceLine(True, str(small), 0)
    write_insightface_lst(tmp_path / "wrong.lst", lines)
    with pytest.raises(FormatError, match=r"wrong.lst: entry 601 \(.*small.jpg\): image is 112x96 \(expected 112x112"):
        run_pack(tmp_path / "wrong.lst", tmp_path / "out")
    lines[600] = InsightFaceLine(True, str(tmp_path / "gone.jpg"), 0)
    write_insightface_lst(tmp_path / "gone.lst", lines)
    with pytest.raises(FormatError, match=r"gone.lst: entry 601: image .*gone.jpg cannot be read"):
        run_pack(tmp_path / "gone.lst", tmp_path / "out")
    assert not (tmp_path / "out" / "train.rec").exists() and not list((tmp_path / "out").glob(".*partial"))

"""datasets.rec_layout: property, the InsightFace writer and the reader for InsightFace and im2rec sets."""
from __future__ import annotations

import numpy as np
import pytest

from datasets.errors import FormatError
from datasets.rec_layout import (
    FLOAT32_EXACT_LIMIT, InsightFaceRecWriter, Property, identity_of_images, read_property, read_rec_index,
    write_property,
)
from datasets.recordio import IRHeader, MXIndexedRecordIO, pack, unpack
from rec_fixtures import face_jpegs


# --- property -----------------------------------------------------------------------------------

def test_property_round_trip_without_newline(tmp_path):
    path = write_property(tmp_path / "property", Property(85742, 112, 112))
    assert path.read_bytes() == b"85742,112,112"
    assert read_property(path) == Property(85742, 112, 112)


def test_property_last_line_wins(tmp_path):
    (tmp_path / "property").write_text("10,112,96\n20, 112, 112\n")
    assert read_property(tmp_path / "property") == Property(20, 112, 112)


@pytest.mark.parametrize("text, what", [("", "empty"), ("85742,112", r"line 1: '85742,112'"), ("a,b,c\n", "line 1"),
                                        ("1,2,3\n1,-2,3", "line 2")])
def test_property_malformed(tmp_path, text, what):
    (tmp_path / "property").write_text(text)
    with pytest.raises(FormatError, match=rf"property: .*{what}"):
        read_property(tmp_path / "property")


def test_property_missing(tmp_path):
    with pytest.raises(FormatError, match=r"property: property file does not exist"):
        read_property(tmp_path / "property")


# --- writer -------------------------------------------------------------------------------------

LABELS = [0, 0, 2, 2, 2, 0, 1]  # class 0 in two runs


@pytest.fixture(scope="module")
def jpegs():
    return face_jpegs(len(LABELS), seed=11)


@pytest.mark.parametrize("label_format", ["scalar", "array"])
def test_writer_layout(tmp_path, jpegs, label_format):
    with InsightFaceRecWriter(tmp_path, label_format=label_format, image_size=(112, 96)) as w:
        locations = [w.add(label, jpg, aligned=(i % 2 == 0)) for i, (label, jpg) in enumerate(zip(LABELS, jpegs))]
    assert [loc.key for loc in locations] == list(range(1, 8))
    assert (tmp_path / "property").read_bytes() == b"3,112,96"
    with MXIndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r") as r:
        assert r.keys == [1, 2, 3, 4, 5, 6, 7, 0, 8, 9, 10, 11]
        assert [r.idx[loc.key] for loc in locations] == [loc.offset for loc in locations]
        meta, payload = unpack(r.read_idx(0))
        assert (meta.flag, meta.label.tolist(), meta.id, payload) == (2, [8.0, 12.0], 0, b"")
        runs = [unpack(r.read_idx(k))[0] for k in range(8, 12)]
        assert [h.label.tolist() for h in runs] == [[1, 3], [3, 6], [6, 7], [7, 8]]
        assert [(h.flag, h.id) for h in runs] == [(2, 8), (2, 9), (2, 10), (2, 11)]
        for i, (label, jpg) in enumerate(zip(LABELS, jpegs)):
            header, payload = unpack(r.read_idx(i + 1))
            assert payload == jpg and header.id == i + 1
            if label_format == "scalar":
                assert (header.flag, header.label) == (0, label)
            else:
                assert (header.flag, header.label.tolist()) == (2, [label, float(i % 2 == 0)])
    assert w.summary.num_images == 7 and w.summary.identities == [(1, 3), (3, 6), (6, 7), (7, 8)]


def test_writer_meta_last_and_num_classes(tmp_path, jpegs):
    with InsightFaceRecWriter(tmp_path, meta_last=True, num_classes=10) as w:
        for label, jpg in zip(LABELS, jpegs):
            w.add(label, jpg)
    assert (tmp_path / "train.idx").read_text().splitlines()[-1].startswith("0\t")
    assert read_property(tmp_path / "property").num_classes == 10


def test_writer_is_atomic_on_error(tmp_path, jpegs):
    (tmp_path / "train.rec").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with InsightFaceRecWriter(tmp_path) as w:
            w.add(0, jpegs[0])
            raise RuntimeError("boom")
    assert (tmp_path / "train.rec").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.rec"]


def test_writer_refuses_float32_overflow(tmp_path, jpegs):
    with pytest.raises(ValueError, match=r"class label 16777217 exceeds 2\*\*24"):
        with InsightFaceRecWriter(tmp_path) as w:
            w.add(FLOAT32_EXACT_LIMIT, jpegs[0])  # 2**24 itself is exact
            w.add(FLOAT32_EXACT_LIMIT + 1, jpegs[1])
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(ValueError, match="no images"):
        with InsightFaceRecWriter(tmp_path):
            pass


def test_copy_records_without_reencoding(tmp_path, jpegs):
    with InsightFaceRecWriter(tmp_path / "a", label_format="array") as w:
        for label, jpg in zip(LABELS, jpegs):
            w.add(label, jpg)
    src = MXIndexedRecordIO(tmp_path / "a/train.idx", tmp_path / "a/train.rec", "r")
    with InsightFaceRecWriter(tmp_path / "b") as w:
        w.add_record(src.read_idx(3))  # keeps label 2
        w.add_record(src.read_idx(1), label=5)
    index = read_rec_index(tmp_path / "b")
    assert index.labels.tolist() == [2, 5]
    with MXIndexedRecordIO(tmp_path / "b/train.idx", tmp_path / "b/train.rec", "r") as r:
        assert unpack(r.read_idx(1))[1] == jpegs[2] and unpack(r.read_idx(2))[1] == jpegs[0]


# --- reader -------------------------------------------------------------------------------------

def test_reader_insightface(tmp_path, jpegs):
    with InsightFaceRecWriter(tmp_path, label_format="array") as w:
        for label, jpg in zip(LABELS, jpegs):
            w.add(label, jpg)
    index = read_rec_index(tmp_path)
    assert index.layout == "insightface" and len(index) == 7
    assert index.keys.tolist() == list(range(1, 8)) and index.labels.dtype == np.int64
    assert index.labels.tolist() == LABELS
    assert index.identities.tolist() == [[1, 3], [3, 6], [6, 7], [7, 8]]
    assert identity_of_images(index).tolist() == [0, 0, 1, 1, 1, 2, 3]
    assert index.property == Property(3, 112, 112)


def test_reader_im2rec_and_multi_segment_records(tmp_path, jpegs):
    magic = bytes.fromhex("0a23d7ce")
    with MXIndexedRecordIO(tmp_path / "im.idx", tmp_path / "im.rec", "w") as w:
        w.write_idx(0, pack(IRHeader(0, [4.0, 9.0], 0, 0), jpegs[0]))  # --pack-label image under key 0
        w.write_idx(7, pack(IRHeader(0, 1.0, 7, 0), jpegs[1]))
        w.write_idx(3, pack(IRHeader(0, 2.0, 3, 0), magic + jpegs[2]))  # splits right after the header
        # id == magic: the record splits at byte 8, before its label (the reader's slow path)
        w.write_idx(9, pack(IRHeader(0, [6.0], 0xCED7230A, 0), b""))
    index = read_rec_index(tmp_path / "im.rec")
    assert index.layout == "im2rec" and index.property is None
    assert index.keys.tolist() == [0, 7, 3, 9] and index.labels.tolist() == [4, 1, 2, 6]
    assert index.identities.shape == (0, 2)


def test_reader_bad_offset_and_missing_key(tmp_path, jpegs):
    with InsightFaceRecWriter(tmp_path) as w:
        for label, jpg in zip(LABELS[:3], jpegs):
            w.add(label, jpg)
    idx = tmp_path / "train.idx"
    lines = idx.read_text().splitlines()
    key, offset = lines[1].split("\t")
    lines[1] = f"{key}\t{int(offset) + 40}"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(FormatError, match=rf"train\.rec: record key 2 at offset {int(offset) + 40}: no RecordIO magic"):
        read_rec_index(tmp_path)
    idx.write_text("\n".join(l for l in lines if not l.startswith("2\t")) + "\n")
    with pytest.raises(FormatError, match=r"train\.idx: 1 record keys missing, first \[2\]"):
        read_rec_index(tmp_path)


def test_reader_missing_files(tmp_path):
    with pytest.raises(FormatError, match=r"train\.rec: record file does not exist"):
        read_rec_index(tmp_path)
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(FormatError, match=r"train\.idx: index file does not exist"):
        read_rec_index(tmp_path)

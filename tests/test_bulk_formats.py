"""Bulk paths of the format layer used by the pack stage: columnar .lst parsing, batch framing
(pack_framed / write_idx_batch / add_many) and background writes, each checked byte for byte
against the one-record-at-a-time path (itself checked against MXNet in test_recordio_mxnet.py)."""
from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from datasets.errors import FormatError
from datasets.lst import InsightFaceLine, read_insightface_columns, read_insightface_lst, write_insightface_lst
from datasets.rec_layout import FLOAT32_EXACT_LIMIT, InsightFaceRecWriter
from datasets.recordio import IRHeader, MXIndexedRecordIO, MXRecordIO, frame_record, pack, pack_framed, unpack
from rec_fixtures import MAGIC_BYTES, face_jpegs, tricky_payloads

# --- columnar .lst ------------------------------------------------------------------------------

PLAIN = "1\t/abs/a b/1.jpg\t0\n1\traw/张伟/照片 2.jpg\t0\n0\tz.jpg\t17\n1\tw.jpg\t007\n"


def _same_as_lines(path):
    cols = read_insightface_columns(path)
    lines = read_insightface_lst(path)
    assert len(cols) == len(lines)
    assert [cols.line(i) for i in range(len(cols))] == lines
    assert cols.aligned.dtype == bool and cols.aligned.tolist() == [line.aligned for line in lines]
    assert cols.labels.dtype == np.int64 and cols.labels.tolist() == [line.label for line in lines]
    assert cols.paths == [line.path for line in lines]
    return cols


@pytest.mark.parametrize("text", [PLAIN, PLAIN.rstrip("\n"), "", "1\tone.jpg\t3"])
def test_plain_lists_are_parsed_in_one_pass_like_line_by_line(tmp_path, text):
    (tmp_path / "a.lst").write_text(text, encoding="utf-8")
    cols = _same_as_lines(tmp_path / "a.lst")
    assert cols.lines is None  # the one-split path


@pytest.mark.parametrize("text", [
    PLAIN.replace("\n", "\r\n") + "\n",  # CRLF and a trailing blank line
    "\n" + PLAIN,  # leading blank line
    PLAIN + "0\tx.jpg\t2\t1\t2\t3\t4\n",  # a box
    PLAIN + "0\tx.jpg\t2\t1\t2\t3\t4" + "".join(f"\t{v}.5" for v in range(10)) + "\n",  # box and landmarks
    "1\tx.jpg\t 3\n",  # int() takes the space; the plain pattern does not
    "1\tx.jpg\t123456789012345678901\n",  # beyond int64 on the plain path's pattern: line by line
])
def test_other_lists_go_line_by_line_with_the_same_result(tmp_path, text):
    (tmp_path / "b.lst").write_text(text, encoding="utf-8")
    if "123456789012345678901" in text:
        with pytest.raises(FormatError, match=r"b\.lst: entry 1 \(x\.jpg\): label 123456789012345678901"):
            read_insightface_columns(tmp_path / "b.lst")
        return
    cols = _same_as_lines(tmp_path / "b.lst")
    assert cols.lines is not None


@pytest.mark.parametrize("text, message", [
    ("1\ta.jpg\t0\n1 b.jpg 1\n", r"line 2: 1 tab-separated columns"),
    ("2\ta.jpg\t0\n", r"line 1: aligned flag '2'"),
    ("1\ta.jpg\tzero\n", r"line 1: label 'zero' is not an integer"),
    ("1\t\t0\n", r"line 1: empty image path"),
])
def test_columns_refuse_what_the_line_reader_refuses(tmp_path, text, message):
    (tmp_path / "bad.lst").write_text(text, encoding="utf-8")
    with pytest.raises(FormatError, match=rf"bad\.lst: {message}"):
        read_insightface_columns(tmp_path / "bad.lst")


def test_columns_of_written_lists_round_trip(tmp_path):
    lines = [InsightFaceLine(True, f"/data/id{i % 7}/{i}.jpg", i % 7) for i in range(500)]
    cols = _same_as_lines(write_insightface_lst(tmp_path / "c.lst", lines))
    assert cols.lines is None and cols.line(3) == lines[3]


# --- pack_framed / write_idx_batch ---------------------------------------------------------------

def _write(path, keys, labels, payloads, batches=None, background=False):
    """``.idx``/``.rec`` bytes of a small first record, then the records one by one (``batches=None``)
    or with write_idx_batch over the given cut points."""
    idx, rec = path.with_suffix(".idx"), path.with_suffix(".rec")
    offsets = []
    with MXIndexedRecordIO(idx, rec, "w", background_writes=background) as w:
        w.write_idx(1, b"first")  # batches start after what is already there
        if batches is None:
            for key, label, payload in zip(keys, labels, payloads):
                offsets.append(w.tell())
                w.write_idx(key, pack(IRHeader(0, label if np.ndim(label) else float(label), key, 0), payload))
        else:
            for a, b in zip(batches, batches[1:]):
                offsets += w.write_idx_batch(keys[a:b], labels[a:b], payloads[a:b]).tolist()
            assert w.keys == [1] + list(keys) and [w.idx[k] for k in keys] == offsets
    return idx.read_bytes(), rec.read_bytes(), offsets


@pytest.mark.parametrize("width", [0, 1, 2, 3])
def test_batches_are_byte_identical_to_write_idx_calls(tmp_path, width):
    payloads = tricky_payloads(seed=width) + face_jpegs(5, seed=width)
    n = len(payloads)
    rng = np.random.default_rng(width)
    labels = rng.integers(0, 1000, n).astype(np.float32) if width == 0 else rng.random((n, width)).astype(np.float32)
    keys = list(range(3, 3 + n))
    expected = _write(tmp_path / "one", keys, labels, payloads)
    cut = [0, 1, 5, 5, 17, n]  # an empty batch, batches with and without magic words in their records
    assert _write(tmp_path / "batch", keys, labels, payloads, cut) == expected
    with MXIndexedRecordIO(tmp_path / "batch.idx", tmp_path / "batch.rec", "r") as r:
        for key, label, payload in zip(keys, labels, payloads):
            header, body = unpack(r.read_idx(key))
            assert body == payload and header.id == key
            assert np.array_equal(np.atleast_1d(header.label), np.atleast_1d(label))


def test_pack_framed_offsets_and_magic_fallback():
    payloads = [b"abc", MAGIC_BYTES + b"xyz", b"", b"x" * 5 + MAGIC_BYTES]
    data, offsets = pack_framed([1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0], payloads)
    expected = b""
    starts = []
    for key, label, payload in zip([1, 2, 3, 4], [0.0, 1.0, 2.0, 3.0], payloads):
        starts.append(len(expected))
        expected += frame_record(pack(IRHeader(0, label, key, 0), payload))
    assert data == expected and offsets.tolist() == starts
    # 4 records, one cut in two segments (its aligned magic word dropped, a header more), and the
    # unaligned magic word of the last one kept in its data
    assert data.count(MAGIC_BYTES) == 6
    with pytest.raises(ValueError, match="do not match"):
        pack_framed([1, 2], [0.0], [b"a", b"b"])
    with pytest.raises(ValueError, match="negative"):
        pack_framed([-1], [0.0], [b"a"])


# --- background writes --------------------------------------------------------------------------

def test_background_writes_give_the_same_bytes(tmp_path):
    payloads = face_jpegs(40, seed=3) * 60  # ~9 MB: many background writes and a sync on the way
    keys = list(range(2, len(payloads) + 2))
    labels = (np.arange(len(payloads)) % 11).astype(np.float32)
    cut = list(range(0, len(payloads), 97)) + [len(payloads)]
    expected = _write(tmp_path / "plain", keys, labels, payloads, cut)
    assert _write(tmp_path / "background", keys, labels, payloads, cut, background=True) == expected
    assert expected == _write(tmp_path / "one", keys, labels, payloads)


def test_background_write_errors_surface_on_close(tmp_path):
    import io

    path = tmp_path / "e.rec"
    w = MXRecordIO(path, "w", background_writes=True)
    w._writer.raw.close()
    w._writer.raw = open(path, "rb", buffering=0)  # the thread's next write fails
    w.write(b"x" * (2 << 20))
    with pytest.raises(io.UnsupportedOperation, match="not open for writing"):
        w.close()
    w.close()  # the file is closed and the thread gone: closing again is a no-op
    assert not w.is_open


def _close_in_child(writer: MXRecordIO) -> None:
    writer.close()


def test_forked_copy_of_a_background_writer_writes_nothing(tmp_path):
    path = tmp_path / "w.rec"
    w = MXRecordIO(path, "w", background_writes=True)
    w.write(b"first")
    child = mp.get_context("fork").Process(target=_close_in_child, args=(w,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    w.write(b"second")
    w.close()
    assert list(MXRecordIO(path, "r")) == [b"first", b"second"]


# --- InsightFaceRecWriter.add_many --------------------------------------------------------------

LABELS = [0, 0, 2, 2, 2, 0, 1, 1, 3]


@pytest.mark.parametrize("label_format", ["scalar", "array"])
def test_add_many_is_byte_identical_to_add(tmp_path, label_format):
    jpegs = face_jpegs(len(LABELS), seed=5)
    aligned = [i % 3 != 0 for i in range(len(LABELS))]
    with InsightFaceRecWriter(tmp_path / "one", label_format=label_format) as w:
        locations = [w.add(label, jpg, aligned=flag) for label, jpg, flag in zip(LABELS, jpegs, aligned)]
    with InsightFaceRecWriter(tmp_path / "many", label_format=label_format, background_writes=True) as w:
        got = [w.add_many(LABELS[a:b], jpegs[a:b], aligned[a:b]) for a, b in [(0, 1), (1, 1), (1, 4), (4, 6), (6, 9)]]
    keys = np.concatenate([k for k, _ in got])
    offsets = np.concatenate([o for _, o in got])
    assert keys.tolist() == [loc.key for loc in locations] and offsets.tolist() == [loc.offset for loc in locations]
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "many" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    assert w.summary.identities == [(1, 3), (3, 6), (6, 7), (7, 9), (9, 10)]


def test_add_many_checks_the_batch_before_writing(tmp_path):
    jpegs = face_jpegs(2, seed=6)
    with pytest.raises(ValueError, match=r"image 2: label -1 is negative"):
        with InsightFaceRecWriter(tmp_path / "neg") as w:
            w.add_many([0, -1], jpegs)
    with pytest.raises(ValueError, match=r"class label 16777217 exceeds 2\*\*24"):
        with InsightFaceRecWriter(tmp_path / "big") as w:
            w.add_many([FLOAT32_EXACT_LIMIT, FLOAT32_EXACT_LIMIT + 1], jpegs)
    with pytest.raises(ValueError, match="integers"):
        with InsightFaceRecWriter(tmp_path / "float") as w:
            w.add_many([0.5, 1.0], jpegs)
    with pytest.raises(ValueError, match="2 labels, 1 payloads"):
        with InsightFaceRecWriter(tmp_path / "count") as w:
            w.add_many([0, 1], jpegs[:1])
    assert not any((tmp_path / d / "train.rec").exists() for d in ("neg", "big", "float", "count"))

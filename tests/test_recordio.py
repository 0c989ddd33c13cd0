"""datasets.recordio: bytes of the spec's examples, round trips, fork/pickle safety, bad input."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import struct

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from datasets import recordio
from datasets.errors import FormatError
from datasets.recordio import IRHeader, MXIndexedRecordIO, MXRecordIO, pack, unpack
from rec_fixtures import MAGIC_BYTES, face_crops, face_jpegs, tricky_payloads


def _write_indexed(tmp_path, payloads, keys=None, key_type=int):
    idx, rec = tmp_path / "t.idx", tmp_path / "t.rec"
    with MXIndexedRecordIO(idx, rec, "w", key_type=key_type) as w:
        for key, p in zip(keys if keys is not None else range(len(payloads)), payloads):
            w.write_idx(key, p)
    return idx, rec


# --- bytes given in the spec (checked there against MXNet 1.9.1) --------------------------------

def test_pack_bytes_of_spec_example():
    got = pack(IRHeader(0, [5, 7], 9, 0), b"IMG")
    assert got.hex() == "02000000" "00000000" "0900000000000000" "0000000000000000" "0000a040" "0000e040" "494d47"


def test_pack_forces_flag_and_label_kinds():
    scalar = pack(IRHeader(7, 3.0, 11, 0), b"x")
    assert struct.unpack("<IfQQ", scalar[:24]) == (0, 3.0, 11, 0)  # flag forced to 0
    one = pack(IRHeader(0, [4.0], 1, 0), b"")
    header, payload = unpack(one)
    assert header.flag == 1 and isinstance(header.label, np.ndarray) and header.label.tolist() == [4.0]
    assert payload == b""
    with pytest.raises(TypeError, match="b''"):
        pack(IRHeader(0, [1, 2], 0, 0), "")


def test_unpack_round_trip_and_readonly_labels():
    header, payload = unpack(pack(IRHeader(0, np.array([1.5, 2.5, 3.5]), 42, 7), b"\x00\xffdata"))
    assert header.flag == 3 and header.id == 42 and header.id2 == 7
    assert header.label.dtype == np.float32 and header.label.tolist() == [1.5, 2.5, 3.5]
    assert not header.label.flags.writeable
    assert payload == b"\x00\xffdata"
    header, payload = unpack(pack(IRHeader(0, 16880353, 1, 0), b""))
    assert header.label == 16880352.0  # the float32 trap of spec s2.1, reproduced faithfully


def test_frame_of_spec_example_magic_then_xyz(tmp_path):
    rec = tmp_path / "m.rec"
    with MXRecordIO(rec, "w") as w:
        w.write(MAGIC_BYTES + b"xyz")
    assert rec.read_bytes().hex() == "0a23d7ce" "00000020" "0a23d7ce" "03000060" "78797a00"
    with MXRecordIO(rec, "r") as r:
        assert r.read() == MAGIC_BYTES + b"xyz"
        assert r.read() is None


def test_unaligned_magic_stays_in_data(tmp_path):
    rec = tmp_path / "u.rec"
    payload = b"ab" + MAGIC_BYTES + b"cd"
    with MXRecordIO(rec, "w") as w:
        w.write(payload)
    data = rec.read_bytes()
    assert data[:8] == MAGIC_BYTES + struct.pack("<I", len(payload))  # one cflag-0 segment
    assert data[8:16] == payload and data[16:] == b""


# --- round trips ----------------------------------------------------------------------------------

def test_indexed_round_trip_random_access_and_iteration(tmp_path):
    payloads = tricky_payloads() + face_jpegs(5)
    idx, rec = _write_indexed(tmp_path, payloads)
    lines = idx.read_text().splitlines()
    assert len(lines) == len(payloads) and all(l.count("\t") == 1 for l in lines)
    offsets = [int(l.split("\t")[1]) for l in lines]
    assert offsets[0] == 0 and all(o % 4 == 0 for o in offsets) and offsets == sorted(offsets)
    with MXIndexedRecordIO(idx, rec, "r") as r:
        assert r.keys == list(range(len(payloads)))
        for k in np.random.default_rng(0).permutation(len(payloads)).tolist():
            assert r.read_idx(k) == payloads[k]
        assert list(r) == payloads
        r.seek(3)
        assert r.read() == payloads[3] and r.read() == payloads[4]
        r.reset()
        assert r.read() == payloads[0]
    with MXRecordIO(rec, "r") as r:
        assert [off for off, _ in r.iter_with_offsets()] == offsets


def test_writer_tell_and_reset_truncates(tmp_path):
    rec = tmp_path / "w.rec"
    w = MXRecordIO(rec, "w")
    assert w.tell() == 0
    w.write(b"12345")
    assert w.tell() == 8 + 8
    w.reset()  # MXNet semantics: truncates
    w.write(b"z")
    big = bytes(range(256)) * 6000  # past the writer's 1 MiB buffer
    w.write(big)
    assert w.tell() == 12 + 8 + len(big)
    w.close()
    assert list(MXRecordIO(rec, "r")) == [b"z", big] and rec.stat().st_size == 12 + 8 + len(big)


def test_duplicate_keys_and_string_keys(tmp_path):
    idx, rec = _write_indexed(tmp_path, [b"first", b"other", b"second"], keys=[5, 6, 5])
    with MXIndexedRecordIO(idx, rec, "r") as r:
        assert r.keys == [5, 6, 5]
        assert r.read_idx(5) == b"second"  # the dict keeps the last offset, as MXNet's
    idx, rec = _write_indexed(tmp_path, [b"a", b"b"], keys=["dir a/x.jpg", "é.jpg"], key_type=str)
    with MXIndexedRecordIO(idx, rec, "r", key_type=str) as r:
        assert r.read_idx("é.jpg") == b"b" and r.keys == ["dir a/x.jpg", "é.jpg"]


def test_pack_img_unpack_img(tmp_path):
    import cv2

    img = face_crops(1)[0]
    s = recordio.pack_img(IRHeader(0, 3, 9, 0), img, quality=95)
    assert s[24:] == cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    header, back = recordio.unpack_img(s)
    assert header.label == 3.0 and back.shape == img.shape
    assert np.abs(back.astype(int) - img).mean() < 3  # JPEG q95 round trip
    png = recordio.pack_img(IRHeader(0, 1, 1, 0), img, quality=3, img_fmt=".png")
    assert np.array_equal(recordio.unpack_img(png)[1], img)  # lossless
    with pytest.raises(FormatError, match="not a decodable image"):
        recordio.unpack_img(pack(IRHeader(0, 1, 77, 0), b"not an image"))


# --- processes ------------------------------------------------------------------------------------

def _child_reads(r: MXIndexedRecordIO, keys, queue) -> None:
    queue.put([r.read_idx(k) for k in keys])


def test_reader_works_after_fork_and_keeps_parent_position(tmp_path):
    payloads = face_jpegs(6)
    idx, rec = _write_indexed(tmp_path, payloads)
    r = MXIndexedRecordIO(idx, rec, "r")
    assert r.read() == payloads[0]  # parent position is now record 1
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(r, [5, 2, 4], queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(60)
    assert got == [payloads[5], payloads[2], payloads[4]]
    assert r.read() == payloads[1]  # the child did not move the parent's reader


def test_pickling_stores_paths_only(tmp_path):
    payloads = [b"a", b"bb", b"ccc"]
    idx, rec = _write_indexed(tmp_path, payloads)
    r = MXIndexedRecordIO(idx, rec, "r")
    blob = pickle.dumps(r)
    assert len(blob) < 600 and b"ccc" not in blob
    r2 = pickle.loads(blob)
    assert r2.read_idx(2) == b"ccc" and r2.keys == [0, 1, 2]
    with pytest.raises(TypeError, match="writing"):
        pickle.dumps(MXRecordIO(tmp_path / "x.rec", "w"))


class _RecordsDataset(Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader.keys)

    def __getitem__(self, i):
        return torch.tensor(list(self.reader.read_idx(i)[:4]) + [i])


def test_dataloader_workers(tmp_path):  # spawn-started workers unpickle it: covered by the pickling test
    payloads = [bytes([i, i + 1, i + 2, i + 3]) * 3 for i in range(40)]
    idx, rec = _write_indexed(tmp_path, payloads)
    loader = DataLoader(_RecordsDataset(MXIndexedRecordIO(idx, rec, "r")), batch_size=8, num_workers=2,
                        multiprocessing_context="fork")
    rows = torch.cat(list(loader)).tolist()
    assert rows == [list(p[:4]) + [i] for i, p in enumerate(payloads)]


def test_writer_refuses_other_process(tmp_path):
    w = MXRecordIO(tmp_path / "w.rec", "w")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()

    def attempt():
        try:
            w.write(b"x")
            queue.put("wrote")
        except RuntimeError as exc:
            queue.put(str(exc))

    p = ctx.Process(target=attempt)
    p.start()
    msg = queue.get(timeout=60)
    p.join(60)
    assert "another process" in msg
    w.close()


def _close_in_child(writer: MXRecordIO) -> None:
    writer.close()  # a copy closed in another process must not write the parent's pending bytes


def test_forked_copy_of_a_writer_does_not_duplicate_data(tmp_path):
    path = tmp_path / "w.rec"
    w = MXRecordIO(path, "w")
    w.write(b"first")  # still in the write buffer
    child = mp.get_context("fork").Process(target=_close_in_child, args=(w,))
    child.start()
    child.join(60)
    w.write(b"second")
    w.close()
    assert list(MXRecordIO(path, "r")) == [b"first", b"second"]


# --- rebuild_index ------------------------------------------------------------------------------

def test_rebuild_index_matches_written_index(tmp_path):
    payloads = face_jpegs(4)
    idx, rec = tmp_path / "t.idx", tmp_path / "t.rec"
    with MXIndexedRecordIO(idx, rec, "w") as w:
        for key, p in [(1, payloads[0]), (2, payloads[1]), (0, b""), (3, payloads[2] + MAGIC_BYTES * 2)]:
            w.write_idx(key, pack(IRHeader(0, [float(key), 1.0], key, 0), p))
    original = idx.read_text()
    idx.unlink()
    assert recordio.rebuild_index(rec, idx) == 4
    assert idx.read_text() == original


# --- bad input ------------------------------------------------------------------------------------

def test_truncated_rec_names_file_and_offset(tmp_path):
    payloads = face_jpegs(3)
    idx, rec = _write_indexed(tmp_path, payloads)
    offsets = [int(l.split("\t")[1]) for l in idx.read_text().splitlines()]
    data = rec.read_bytes()
    rec.write_bytes(data[: offsets[2] + 100])
    with MXIndexedRecordIO(idx, rec, "r") as r:
        assert r.read_idx(1) == payloads[1]
        with pytest.raises(FormatError, match=rf"t\.rec: record key 2 at offset {offsets[2]}: .*truncated"):
            r.read_idx(2)
    rec.write_bytes(data[: offsets[1] + 5])  # cut inside a segment header
    with MXRecordIO(rec, "r") as r:
        r.read()
        with pytest.raises(FormatError, match=rf"offset {offsets[1]}: file ends after 5 bytes"):
            r.read()


def test_wrong_magic_names_offset(tmp_path):
    idx, rec = _write_indexed(tmp_path, [b"abcd", b"efgh"])
    data = bytearray(rec.read_bytes())
    data[12:16] = b"\xde\xad\xbe\xef"  # record 1 starts at 12 = 8 + len(b"abcd")
    rec.write_bytes(bytes(data))
    with MXIndexedRecordIO(idx, rec, "r") as r:
        with pytest.raises(FormatError, match=r"record key 1 at offset 12: no RecordIO magic word .*0xEFBEADDE.*expected 0xCED7230A"):
            r.read_idx(1)


def test_idx_offset_inside_a_record(tmp_path):
    payload = bytes(range(200))
    multi = b"head" + MAGIC_BYTES + b"tail-bytes"
    idx, rec = _write_indexed(tmp_path, [payload, multi])
    idx.write_text("0\t0\n1\t64\n2\t208\n3\t220\n")  # 64: inside record 0's data; 220: its cflag-3 segment
    with MXIndexedRecordIO(idx, rec, "r") as r:
        assert r.read_idx(0) == payload and r.read_idx(2) == multi
        with pytest.raises(FormatError, match=r"t\.rec: record key 1 at offset 64: no RecordIO magic word"):
            r.read_idx(1)
        with pytest.raises(FormatError, match=r"record key 3 at offset 220: segment with cflag 3 .*inside a record"):
            r.read_idx(3)


def test_malformed_idx_line(tmp_path):
    idx, rec = _write_indexed(tmp_path, [b"a", b"b"])
    idx.write_text("0\t0\n1 12\n")
    with pytest.raises(FormatError, match=r"t\.idx: line 2: '1 12' has 1 tab-separated fields"):
        MXIndexedRecordIO(idx, rec, "r")
    idx.write_text("0\t0\n1\tx12\n")
    with pytest.raises(FormatError, match=r"line 2: offset 'x12' is not an integer"):
        MXIndexedRecordIO(idx, rec, "r")


def test_not_a_recordio_file(tmp_path):
    bogus = tmp_path / "bogus.rec"
    bogus.write_bytes(b"GIF89a" + b"\0" * 30)
    with MXRecordIO(bogus, "r") as r, pytest.raises(FormatError, match=r"bogus\.rec: record at offset 0: no RecordIO magic"):
        r.read()


def test_empty_file_reads_nothing(tmp_path):
    (tmp_path / "e.rec").write_bytes(b"")
    with MXRecordIO(tmp_path / "e.rec", "r") as r:
        assert r.read() is None and list(r) == []

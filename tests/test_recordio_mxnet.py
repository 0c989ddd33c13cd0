"""Interoperability with real MXNet 1.9.1 (its own venv, see tests/mxnet_env.py), both directions.

* MXNet reads what we write: same headers and payloads (magic in payloads, multi-float labels, the
  InsightFace layout, ``.idx``), and ``mx.image.imdecode`` of our payloads equals our decode.
* We write what MXNet writes: byte-identical ``.rec`` and ``.idx`` for the same inputs, and we
  read MXNet's files back equal.
"""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

import mxnet_env
from datasets.rec_dataset import RecFaceDataset
from datasets.rec_layout import InsightFaceRecWriter, read_rec_index
from datasets.recordio import IRHeader, MXIndexedRecordIO, MXRecordIO, pack, unpack
from datasets.verification_bin import decode_bin, write_bin
from rec_fixtures import face_jpegs, tricky_payloads

pytestmark = pytest.mark.mxnet
mxnet_python = mxnet_env.pytest_fixture()

# Reads every file listed in a JSON job with mxnet.recordio; prints headers/payloads as JSON and
# saves mx.image.imdecode results as .npy.
READ_SCRIPT = r"""
import json, pickle, sys, warnings
warnings.filterwarnings("ignore")
import numpy as np
import mxnet as mx
job = json.load(open(sys.argv[1]))
out = {}
for name, spec in job["indexed"].items():
    r = mx.recordio.MXIndexedRecordIO(spec["idx"], spec["rec"], "r")
    recs = []
    for k in r.keys:
        s = r.read_idx(k)
        try:  # raw (non-packed) payloads may not parse as a header
            h, p = mx.recordio.unpack(s)
            label = h.label.tolist() if h.flag > 0 else h.label
            rec = {"flag": h.flag, "label": label, "id": h.id, "id2": h.id2, "payload": p.hex()}
        except Exception:
            rec = {}
        recs.append(dict(rec, key=k, raw=s.hex()))
    out[name] = {"keys": r.keys, "idx": {str(k): v for k, v in r.idx.items()}, "records": recs}
    r.close()
    seq = mx.recordio.MXRecordIO(spec["rec"], "r")
    items = []
    while True:
        s = seq.read()
        if s is None:
            break
        items.append(s.hex())
    out[name]["sequential"] = items
    if spec.get("decode"):
        r = mx.recordio.MXIndexedRecordIO(spec["idx"], spec["rec"], "r")
        imgs = [mx.image.imdecode(mx.recordio.unpack(r.read_idx(k))[1]).asnumpy() for k in spec["decode"]]
        np.save(spec["decode_to"], np.stack(imgs))
for name, spec in job.get("bins", {}).items():
    with open(spec["path"], "rb") as f:
        bins, issame = pickle.load(f, encoding="bytes")  # as arcface_torch / verification.py do
    imgs = [mx.image.imdecode(b).asnumpy() for b in bins]
    np.save(spec["decode_to"], np.stack(imgs))
    out[name] = {"issame": [bool(x) for x in issame], "types": sorted({type(b).__name__ for b in bins})}
print(json.dumps(out))
"""

# Writes files with mxnet.recordio from a pickled list of jobs (key, header or None, payload).
WRITE_SCRIPT = r"""
import pickle, sys, warnings
warnings.filterwarnings("ignore")
import mxnet as mx
jobs = pickle.load(open(sys.argv[1], "rb"))
for job in jobs:
    w = mx.recordio.MXIndexedRecordIO(job["idx"], job["rec"], "w")
    for key, header, payload in job["items"]:
        if header is not None:
            payload = mx.recordio.pack(mx.recordio.IRHeader(*header), payload)
        w.write_idx(key, payload)
    w.close()
print("ok")
"""


def _mx_read(python, tmp_path, job: dict) -> dict:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return json.loads(mxnet_env.run_script(READ_SCRIPT, str(path), python=python))


def _mx_write(python, tmp_path, jobs: list[dict]) -> None:
    path = tmp_path / "jobs.pkl"
    path.write_bytes(pickle.dumps(jobs, protocol=4))
    assert mxnet_env.run_script(WRITE_SCRIPT, str(path), python=python).strip() == "ok"


def _label_value(header: IRHeader):
    return header.label.tolist() if header.flag > 0 else header.label


def _headers():
    """Record headers covering scalar, multi-float, 1-element and flag-forcing cases."""
    return [IRHeader(0, 3.0, 1, 0), IRHeader(5, 7.0, 2, 0), IRHeader(0, [5.0, 7.0], 9, 0),
            IRHeader(0, [1.0], 4, 0), IRHeader(0, np.arange(6, dtype=np.float32) / 3, 2**40, 3),
            IRHeader(0, [16880353.0, 0.5], 7, 0)]


def test_mxnet_reads_our_files(mxnet_python, tmp_path):
    raw_payloads = tricky_payloads(1)
    jpegs = face_jpegs(6, seed=3)
    packed = [pack(h, p) for h, p in zip(_headers(), [b"", b"IMG", jpegs[0], b"\x0a\x23\xd7\xce" * 2, jpegs[1], b"q"])]
    with MXIndexedRecordIO(tmp_path / "raw.idx", tmp_path / "raw.rec", "w") as w:
        for k, p in enumerate(raw_payloads + packed):
            w.write_idx(k, p)
    labels = [0, 0, 1, 1, 1, 0]
    with InsightFaceRecWriter(tmp_path / "if_array", label_format="array") as wa:
        for label, jpg in zip(labels, jpegs):
            wa.add(label, jpg)
    with InsightFaceRecWriter(tmp_path / "if_scalar", label_format="scalar", meta_last=True) as ws:
        for label, jpg in zip(labels, jpegs):
            ws.add(label, jpg)
    write_bin(tmp_path / "pairs.bin", jpegs[:4], [True, False])
    job = {
        "indexed": {
            "raw": {"idx": str(tmp_path / "raw.idx"), "rec": str(tmp_path / "raw.rec")},
            "if_array": {"idx": str(tmp_path / "if_array/train.idx"), "rec": str(tmp_path / "if_array/train.rec"),
                         "decode": list(range(1, 7)), "decode_to": str(tmp_path / "mx_decoded.npy")},
            "if_scalar": {"idx": str(tmp_path / "if_scalar/train.idx"), "rec": str(tmp_path / "if_scalar/train.rec")},
        },
        "bins": {"pairs": {"path": str(tmp_path / "pairs.bin"), "decode_to": str(tmp_path / "mx_bin.npy")}},
    }
    got = _mx_read(mxnet_python, tmp_path, job)

    # raw file: every record and every header exactly as we wrote it
    raw = got["raw"]
    assert raw["keys"] == list(range(len(raw_payloads) + len(packed)))
    assert [bytes.fromhex(r["raw"]) for r in raw["records"]] == raw_payloads + packed
    assert [bytes.fromhex(s) for s in raw["sequential"]] == raw_payloads + packed
    ours = MXIndexedRecordIO(tmp_path / "raw.idx", tmp_path / "raw.rec", "r")
    assert raw["idx"] == {str(k): v for k, v in ours.idx.items()}
    for rec in raw["records"][len(raw_payloads):]:
        header, payload = unpack(bytes.fromhex(rec["raw"]))
        assert (rec["flag"], rec["id"], rec["id2"]) == (header.flag, header.id, header.id2)
        assert rec["label"] == _label_value(header) and bytes.fromhex(rec["payload"]) == payload

    # InsightFace layouts: MXNet sees the meta record, identity records and image labels
    for name, image_flag in [("if_array", 2), ("if_scalar", 0)]:
        by_key = {r["key"]: r for r in got[name]["records"]}
        assert by_key[0]["flag"] == 2 and by_key[0]["label"] == [7.0, 10.0] and by_key[0]["payload"] == ""
        assert [by_key[k]["label"] for k in (7, 8, 9)] == [[1.0, 3.0], [3.0, 6.0], [6.0, 7.0]]  # runs of labels
        for k, (label, jpg) in enumerate(zip(labels, jpegs), 1):
            assert by_key[k]["flag"] == image_flag and by_key[k]["id"] == k
            assert by_key[k]["label"] == ([float(label), 1.0] if image_flag else float(label))
            assert bytes.fromhex(by_key[k]["payload"]) == jpg
    assert got["if_array"]["keys"] == [1, 2, 3, 4, 5, 6, 0, 7, 8, 9]  # face2rec2 order
    assert got["if_scalar"]["keys"] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]  # dataset_merge order

    # pixels: mx.image.imdecode of our payloads == our decode, bit for bit (both OpenCV's libjpeg)
    mx_pixels = np.load(tmp_path / "mx_decoded.npy")
    ds = RecFaceDataset(tmp_path / "if_array", normalize=None)
    our_pixels = np.stack([ds.decode(i) for i in range(len(ds))])
    assert mx_pixels.shape == our_pixels.shape == (6, 112, 112, 3)
    assert np.array_equal(mx_pixels, our_pixels), f"max difference {np.abs(mx_pixels.astype(int) - our_pixels).max()}"
    assert got["pairs"] == {"issame": [True, False], "types": ["bytes"]}
    mx_bin = np.load(tmp_path / "mx_bin.npy")
    assert np.array_equal(mx_bin, decode_bin(tmp_path / "pairs.bin")[0])


def test_mxnet_writes_what_we_write(mxnet_python, tmp_path):
    payloads = tricky_payloads(2) + face_jpegs(3, seed=5)
    headers = _headers()
    raw_items = [(k, None, p) for k, p in enumerate(payloads)] + [(5, None, b"dup-key"), (2**33, None, b"big-key")]
    plain = [h._replace(label=h.label.tolist()) if isinstance(h.label, np.ndarray) else h for h in headers]  # numpy-free pickle
    packed_items = [(100 + i, tuple(h), p) for i, (h, p) in enumerate(zip(plain, payloads[-6:]))]
    # face2rec2: images with [label, aligned] arrays, record 0, identity records
    jpegs = face_jpegs(5, seed=6)
    labels = [3, 3, 0, 0, 3]  # class 3 appears in two runs
    runs = [(1, 3), (3, 5), (5, 6)]
    f2r = [(k, (0, [float(l), 1.0], k, 0), j) for k, (l, j) in enumerate(zip(labels, jpegs), 1)]
    f2r += [(0, (0, [6.0, 9.0], 0, 0), b"")] + [(6 + i, (0, [float(s), float(e)], 6 + i, 0), b"") for i, (s, e) in enumerate(runs)]
    # dataset_merge: scalar labels, identity records, record 0 last
    merge = [(k, (0, float(l), k, 0), j) for k, (l, j) in enumerate(zip(labels, jpegs), 1)]
    merge += [(6 + i, (0, [float(s), float(e)], 6 + i, 0), b"") for i, (s, e) in enumerate(runs)] + [(0, (0, [6.0, 9.0], 0, 0), b"")]
    jobs = [{"idx": str(tmp_path / f"mx_{n}.idx"), "rec": str(tmp_path / f"mx_{n}.rec"), "items": items}
            for n, items in [("raw", raw_items), ("packed", packed_items), ("f2r", f2r), ("merge", merge)]]
    _mx_write(mxnet_python, tmp_path, jobs)

    for name, items in [("raw", raw_items), ("packed", packed_items)]:
        with MXIndexedRecordIO(tmp_path / f"our_{name}.idx", tmp_path / f"our_{name}.rec", "w") as w:
            for key, header, payload in items:
                w.write_idx(key, payload if header is None else pack(IRHeader(*header), payload))
    with InsightFaceRecWriter(tmp_path / "f2r", label_format="array") as w:
        for label, jpg in zip(labels, jpegs):
            w.add(label, jpg)
    with InsightFaceRecWriter(tmp_path / "merge", label_format="scalar", meta_last=True) as w:
        for label, jpg in zip(labels, jpegs):
            w.add(label, jpg)
    pairs = [("mx_raw", "our_raw"), ("mx_packed", "our_packed"), ("mx_f2r", "f2r/train"), ("mx_merge", "merge/train")]
    for theirs, ours in pairs:
        for ext in ("rec", "idx"):
            a, b = (tmp_path / f"{theirs}.{ext}").read_bytes(), (tmp_path / f"{ours}.{ext}").read_bytes()
            assert a == b, f"{theirs}.{ext} differs from ours at byte {next(i for i, (x, y) in enumerate(zip(a + b'~', b + b'!')) if x != y)}"

    # and we read MXNet's files back equal
    with MXIndexedRecordIO(tmp_path / "mx_raw.idx", tmp_path / "mx_raw.rec", "r") as r:
        assert r.keys == [k for k, _, _ in raw_items]
        assert r.read_idx(5) == b"dup-key" and r.read_idx(2**33) == b"big-key"
        assert list(MXRecordIO(tmp_path / "mx_raw.rec", "r")) == [p for _, _, p in raw_items]
    with MXIndexedRecordIO(tmp_path / "mx_packed.idx", tmp_path / "mx_packed.rec", "r") as r:
        for key, header, payload in packed_items:
            h, p = unpack(r.read_idx(key))
            expected = pack(IRHeader(*header), payload)
            assert pack(h, p) == expected and p == payload
    index = read_rec_index(tmp_path / "mx_f2r.rec")
    assert index.layout == "insightface" and index.labels.tolist() == labels
    assert index.identities.tolist() == [list(r) for r in runs]

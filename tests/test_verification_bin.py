"""datasets.verification_bin: Python 2 packs, restricted unpickling, decoding, writing."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.errors import FormatError, UnsafePickleError
from datasets.verification_bin import decode_bin, load_bin, resize_short, write_bin
from rec_fixtures import face_crops, face_jpegs


def _python2() -> str:
    """A CPython 2.7 interpreter ($PYTHON2, PATH, or pyenv), else skip."""
    candidates = [os.environ.get("PYTHON2"), shutil.which("python2.7"), shutil.which("python2")]
    candidates += sorted(str(p) for p in Path.home().glob(".pyenv/versions/2.7*/bin/python"))
    for c in candidates:
        if c and subprocess.run([c, "-c", "import sys; assert sys.version_info[0] == 2"], capture_output=True).returncode == 0:
            return c
    pytest.skip("no Python 2.7 interpreter found (set PYTHON2) to check Python 2 compatibility")


def _run_py2(code: str, *args: str) -> str:
    proc = subprocess.run([_python2(), "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# Elements built the same way in Python 2 and 3: lengths cross the 256-byte opcode boundary,
# counts cross the 256-entry memo boundary and pickle's 1000-item batches.
PY2_ELEMENTS = """
import struct
def elements(n):
    return [struct.pack('<I', i) * (i % 97) for i in range(n)]
def issame(p):
    return [i % 3 == 0 for i in range(p)]
"""


def _elements(n: int) -> list[bytes]:
    return [i.to_bytes(4, "little") * (i % 97) for i in range(n)]


def test_written_pack_is_byte_identical_to_python2_pickle(tmp_path):
    p = 1003
    ours = write_bin(tmp_path / "ours.bin", _elements(2 * p), [i % 3 == 0 for i in range(p)])
    _run_py2(PY2_ELEMENTS + """
import pickle, sys
with open(sys.argv[1], 'wb') as f:
    pickle.dump((elements(2 * 1003), issame(1003)), f, protocol=pickle.HIGHEST_PROTOCOL)
""", str(tmp_path / "py2.bin"))
    assert ours.read_bytes() == (tmp_path / "py2.bin").read_bytes()


def test_python2_reads_what_we_write(tmp_path):
    jpegs = face_jpegs(4, seed=2)
    write_bin(tmp_path / "p.bin", jpegs, [True, False])
    out = _run_py2("""
import pickle, sys, hashlib
bins, issame = pickle.load(open(sys.argv[1], 'rb'))
sys.stdout.write('%r %r %r' % (issame, [hashlib.sha1(b).hexdigest()[:8] for b in bins], set(type(b).__name__ for b in bins)))
""", str(tmp_path / "p.bin"))
    import hashlib

    assert out.strip() == f"[True, False] {[hashlib.sha1(b).hexdigest()[:8] for b in jpegs]} set(['str'])"


def test_python2_pack_with_str_and_ndarray_elements(tmp_path):
    """lfw2pack (py2 str) and cfp2pack (cv2.imencode ndarrays, pickled by py2 numpy) forms."""
    jpegs = face_jpegs(4, seed=4)
    for i, j in enumerate(jpegs):
        (tmp_path / f"{i}.jpg").write_bytes(j)
    # A stand-in for Python 2 numpy's pickling: the same globals and reduce tuples as numpy 1.x.
    stub = tmp_path / "py2numpy" / "numpy"
    (stub / "core").mkdir(parents=True)
    (stub / "__init__.py").write_text(textwrap.dedent("""
        class dtype(object):
            def __reduce__(self):
                return (dtype, ('u1', 0, 1), (3, '|', None, None, None, -1, -1, 0))
        class ndarray(object):
            def __init__(self, data):
                self.data = data
            def __reduce__(self):
                from numpy.core.multiarray import _reconstruct
                return (_reconstruct, (ndarray, (0,), 'b'), (1, (len(self.data), 1), dtype(), False, self.data))
    """))
    (stub / "core" / "__init__.py").write_text("")
    (stub / "core" / "multiarray.py").write_text("def _reconstruct(*a):\n    raise NotImplementedError\n")
    _run_py2("""
import pickle, sys
sys.path.insert(0, sys.argv[1])
import numpy
d = sys.argv[2]
raw = [open('%s/%d.jpg' % (d, i), 'rb').read() for i in range(4)]
with open(d + '/str.bin', 'wb') as f:
    pickle.dump((raw, [True, False]), f, protocol=2)
with open(d + '/nd.bin', 'wb') as f:
    pickle.dump(([numpy.ndarray(r) for r in raw], [False, True]), f, protocol=2)
""", str(tmp_path / "py2numpy"), str(tmp_path))
    with pytest.raises(UnicodeDecodeError):  # insightface issue #70: plain pickle.load fails
        pickle.load(open(tmp_path / "str.bin", "rb"))
    images, issame = load_bin(tmp_path / "str.bin")
    assert images == jpegs and issame.tolist() == [True, False] and issame.dtype == np.bool_
    images, issame = load_bin(tmp_path / "nd.bin")
    assert images == jpegs and issame.tolist() == [False, True]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_python3_packs_with_bytes_bytearray_ndarray(tmp_path, protocol):
    jpegs = face_jpegs(6, seed=5)
    elements = [jpegs[0], bytearray(jpegs[1]), np.frombuffer(jpegs[2], np.uint8).reshape(-1, 1),
                cv2.imencode(".jpg", cv2.imdecode(np.frombuffer(jpegs[3], np.uint8), 1))[1], jpegs[4], jpegs[5]]
    issame = [np.bool_(True), np.bool_(False), True]
    (tmp_path / "p.bin").write_bytes(pickle.dumps((elements, issame), protocol=protocol))
    images, same = load_bin(tmp_path / "p.bin")
    assert images[:3] == jpegs[:3] and images[4:] == jpegs[4:]
    assert images[3] == elements[3].tobytes() and same.tolist() == [True, False, True]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unsafe_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.bin").write_bytes(pickle.dumps(([_Exploit()], [True]), protocol=2))
    with pytest.raises(UnsafePickleError, match=r"evil\.bin: pickle asks for global posix\.system"):
        load_bin(tmp_path / "evil.bin")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "evil2.bin").write_bytes(b"\x80\x02cbuiltins\neval\nX\x01\x00\x00\x001\x85R.")
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        load_bin(tmp_path / "evil2.bin")


def test_not_a_pickle_and_wrong_shapes(tmp_path):
    (tmp_path / "photo.bin").write_bytes(face_jpegs(1)[0])
    with pytest.raises(FormatError, match=r"photo\.bin: not a readable pickle"):
        load_bin(tmp_path / "photo.bin")
    (tmp_path / "odd.bin").write_bytes(pickle.dumps(([b"a", b"b", b"c"], [True, False]), protocol=2))
    with pytest.raises(FormatError, match=r"odd\.bin: 3 images for 2 pairs \(expected 2 x 2 = 4 images\)"):
        load_bin(tmp_path / "odd.bin")
    (tmp_path / "dict.bin").write_bytes(pickle.dumps({"bins": []}, protocol=2))
    with pytest.raises(FormatError, match=r"dict\.bin: pickle holds a dict"):
        load_bin(tmp_path / "dict.bin")
    (tmp_path / "ints.bin").write_bytes(pickle.dumps(([b"a", 5], [True]), protocol=2))
    with pytest.raises(FormatError, match=r"ints\.bin: image element 1 is a int"):
        load_bin(tmp_path / "ints.bin")


def test_decode_bin_rgb_and_undecodable_element(tmp_path):
    crops = face_crops(4, seed=8)
    jpegs = [cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for c in crops]
    write_bin(tmp_path / "ok.bin", jpegs, [True, False])
    images, issame = decode_bin(tmp_path / "ok.bin", num_threads=1)
    assert images.shape == (4, 112, 112, 3) and images.dtype == np.uint8 and issame.tolist() == [True, False]
    for img, jpg in zip(images, jpegs):
        assert np.array_equal(img, cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1])
    write_bin(tmp_path / "bad.bin", jpegs[:3] + [b"\xff\xd8 garbage"], [True, False])
    with pytest.raises(FormatError, match=r"bad\.bin: image 3 \(pair 1\) of 10 bytes cannot be decoded"):
        decode_bin(tmp_path / "bad.bin")


def test_decode_bin_resizes_like_mxnet_resize_short(tmp_path):
    big = face_crops(2, seed=9, size=128)
    write_bin(tmp_path / "big.bin", [cv2.imencode(".png", b)[1].tobytes() for b in big], [True])
    images, _ = decode_bin(tmp_path / "big.bin")
    for img, b in zip(images, big):
        assert np.array_equal(img, cv2.resize(b, (112, 112), interpolation=cv2.INTER_CUBIC)[:, :, ::-1])
    assert resize_short(np.zeros((150, 120, 3), np.uint8), 112).shape == (140, 112, 3)
    tall = np.zeros((150, 120, 3), np.uint8)
    write_bin(tmp_path / "tall.bin", [tall, tall], [False])
    with pytest.raises(FormatError, match=r"tall\.bin: image 0 \(pair 0\) measures 150x120 \(140x112 after resize_short to 112\) \(expected 112x112\)"):
        decode_bin(tmp_path / "tall.bin")


def test_decode_bin_112x96_kept_and_scaled_by_its_short_side(tmp_path):
    """A 112x96 pack on a 112x96 model is read as it is (InsightFace's width-vs-height rule would
    make it 130x112); a 224x192 pack is scaled to 112x96; a 112x112 pack is refused, naming sizes."""
    rng = np.random.default_rng(3)
    narrow = [rng.integers(0, 256, (112, 96, 3), dtype=np.uint8) for _ in range(4)]
    write_bin(tmp_path / "lfw96.bin", [cv2.imencode(".png", n)[1].tobytes() for n in narrow], [True, False])
    images, issame = decode_bin(tmp_path / "lfw96.bin", (112, 96))
    assert images.shape == (4, 112, 96, 3) and issame.tolist() == [True, False]
    for img, n in zip(images, narrow):
        assert np.array_equal(img, n[:, :, ::-1])
    big = [rng.integers(0, 256, (224, 192, 3), dtype=np.uint8) for _ in range(2)]
    write_bin(tmp_path / "big96.bin", [cv2.imencode(".png", b)[1].tobytes() for b in big], [True])
    images, _ = decode_bin(tmp_path / "big96.bin", (112, 96))
    for img, b in zip(images, big):
        assert np.array_equal(img, cv2.resize(b, (96, 112), interpolation=cv2.INTER_CUBIC)[:, :, ::-1])
    square = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(2)]
    write_bin(tmp_path / "sq.bin", [cv2.imencode(".png", q)[1].tobytes() for q in square], [False])
    with pytest.raises(FormatError, match=r"sq\.bin: image 0 \(pair 0\) measures 112x112 \(96x96 after resize_short to 96\) \(expected 112x96\)"):
        decode_bin(tmp_path / "sq.bin", (112, 96))
    with pytest.raises(FormatError, match=r"measures 112x96 \(130x112 after resize_short to 112\) \(expected 112x112\)"):
        decode_bin(tmp_path / "lfw96.bin", (112, 112))


def test_write_bin_encodes_rgb_arrays(tmp_path):
    crops = face_crops(2, seed=10)
    rgb = [c[:, :, ::-1] for c in crops]
    write_bin(tmp_path / "a.bin", rgb, np.array([True]))
    images, issame = load_bin(tmp_path / "a.bin")
    expected = [cv2.imencode(".jpg", c, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes() for c in crops]
    assert images == expected and issame.tolist() == [True]
    with pytest.raises(ValueError, match=r"3 images for 2 pairs"):
        write_bin(tmp_path / "b.bin", rgb + rgb[:1], [True, False])
    assert not (tmp_path / "b.bin").exists()

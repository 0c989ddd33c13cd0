"""datasets.lst: both .lst forms, exact text, Unicode paths, malformed lines."""
from __future__ import annotations

import numpy as np
import pytest

from datasets.errors import FormatError
from datasets.lst import (
    Im2recLine, InsightFaceLine, read_im2rec_lst, read_insightface_lst, write_im2rec_lst, write_insightface_lst,
)

ODD_PATHS = ["raw/alex lacamoire/1.jpg", "raw/张伟/照片 2.jpg", "/abs/Zoë Saldaña/ü.png"]


def test_im2rec_text_and_round_trip(tmp_path):
    lines = [Im2recLine(0, (3.0,), ODD_PATHS[0]), Im2recLine(12, (1.0, 0.5, -2.0), ODD_PATHS[1]), Im2recLine(7, (2.0,), ODD_PATHS[2])]
    path = write_im2rec_lst(tmp_path / "a.lst", lines)
    assert path.read_text(encoding="utf-8").splitlines() == [
        "0\t3.000000\traw/alex lacamoire/1.jpg",
        "12\t1.000000\t0.500000\t-2.000000\traw/张伟/照片 2.jpg",
        "7\t2.000000\t/abs/Zoë Saldaña/ü.png",
    ]
    assert read_im2rec_lst(path) == lines


def test_insightface_text_and_round_trip(tmp_path):
    pts = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)
    lines = [
        InsightFaceLine(True, ODD_PATHS[0], 0),
        InsightFaceLine(False, ODD_PATHS[1], 1, (10, 20, 110, 140)),
        InsightFaceLine(False, ODD_PATHS[2], 2, (0, 0, 0, 0), tuple(map(tuple, pts))),
    ]
    path = write_insightface_lst(tmp_path / "b.lst", lines)
    text = path.read_text(encoding="utf-8").splitlines()
    assert text[0] == "1\traw/alex lacamoire/1.jpg\t0"
    assert text[1] == "0\traw/张伟/照片 2.jpg\t1\t10\t20\t110\t140"
    assert text[2].split("\t")[3:] == ["0", "0", "0", "0", "38.2946", "73.5318", "56.0252", "41.5493", "70.7299",
                                       "51.6963", "51.5014", "71.7366", "92.3655", "92.2041"]  # 5 x then 5 y
    back = read_insightface_lst(path)
    assert back[:2] == lines[:2]
    assert np.allclose(np.array(back[2].landmarks), pts, atol=1e-4) and back[2].bbox == (0, 0, 0, 0)


def test_crlf_and_blank_lines_are_accepted(tmp_path):
    (tmp_path / "c.lst").write_bytes("1\tx y.jpg\t3\r\n\r\n1\tz.jpg\t4\r\n".encode())
    assert [(l.path, l.label) for l in read_insightface_lst(tmp_path / "c.lst")] == [("x y.jpg", 3), ("z.jpg", 4)]


@pytest.mark.parametrize("text, message", [
    ("1\ta.jpg\t0\n1 b.jpg 1\n", r"line 2: 1 tab-separated columns"),  # the space-separated mistake
    ("1\ta.jpg\t0\t1\t2\n", r"line 1: 5 tab-separated columns"),
    ("2\ta.jpg\t0\n", r"line 1: aligned flag '2'"),
    ("1\ta.jpg\tzero\n", r"line 1: label 'zero' is not an integer"),
    ("0\ta.jpg\t0\t1.5\t2\t3\t4\n", r"line 1: bbox"),
    ("0\ta.jpg\t0\t1\t2\t3\t4" + "\tx" * 10 + "\n", r"line 1: landmarks"),
])
def test_insightface_malformed(tmp_path, text, message):
    (tmp_path / "bad.lst").write_text(text, encoding="utf-8")
    with pytest.raises(FormatError, match=rf"bad\.lst: {message}"):
        read_insightface_lst(tmp_path / "bad.lst")


@pytest.mark.parametrize("text, message", [
    ("0\t1.0\n", r"line 1: 2 tab-separated columns"),
    ("x\t1.0\ta.jpg\n", r"line 1: index 'x'"),
    ("0\t1.0\ta.jpg\n1\tone\tb.jpg\n", r"line 2: labels \['one'\]"),
])
def test_im2rec_malformed(tmp_path, text, message):
    (tmp_path / "bad.lst").write_text(text, encoding="utf-8")
    with pytest.raises(FormatError, match=rf"bad\.lst: {message}"):
        read_im2rec_lst(tmp_path / "bad.lst")


def test_non_utf8_and_unwritable_paths(tmp_path):
    (tmp_path / "latin.lst").write_bytes(b"1\ta.jpg\t0\n1\t\xe9.jpg\t1\n")
    with pytest.raises(FormatError, match=r"latin\.lst: line 2: bytes are not UTF-8"):
        read_insightface_lst(tmp_path / "latin.lst")
    with pytest.raises(ValueError, match="TAB or newline"):
        write_insightface_lst(tmp_path / "x.lst", [InsightFaceLine(True, "a\tb.jpg", 0)])
    assert not (tmp_path / "x.lst").exists()

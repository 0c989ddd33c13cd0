"""datasets.images: every kind of photo file decodes to (H, W, 3) uint8 RGB, or fails with a reason."""
from __future__ import annotations

import shutil
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import FACES
from datasets.errors import FormatError
from datasets.images import UnreadableImage, decode_image, load_image

EDGE = FACES / "edge"
RAW = FACES / "raw"


def _gradient(h: int = 48, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    path = tmp_path / f"o{orientation}.jpg"
    img = Image.fromarray(_gradient())
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(path, quality=95, exif=exif)
    decoded = decode_image(path)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))
    assert decoded.pixels.shape == expected.shape
    assert (decoded.width, decoded.height) == (expected.shape[1], expected.shape[0])
    assert np.array_equal(decoded.pixels, expected)


def test_colour_modes(tmp_path):
    rgb = _gradient()
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert np.array_equal(load_image(tmp_path / "gray.png"), np.repeat(gray[..., None], 3, axis=2))

    Image.fromarray(gray).convert("1").save(tmp_path / "bw.png")
    bw = load_image(tmp_path / "bw.png")
    assert set(np.unique(bw)) <= {0, 255}

    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "pal.png")
    pal = load_image(tmp_path / "pal.png")
    assert pal.shape == rgb.shape and np.abs(pal.astype(int) - rgb).mean() < 20

    g16 = (gray.astype(np.uint16) << 8) | 0x7F
    cv2.imwrite(str(tmp_path / "gray16.png"), g16)
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    assert np.array_equal(load_image(tmp_path / "gray16.png")[..., 1], gray)

    rgb16 = (rgb.astype(np.uint16) << 8) | 0xFF
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[..., ::-1])  # cv2 writes BGR
    assert np.array_equal(load_image(tmp_path / "rgb16.png"), rgb)


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 3, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 0, 3] = 0
    rgba[:, 1, 3] = 128
    rgba[:, 2, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out[0].tolist() == [[0, 0, 0], [100, 100, 100], [200, 200, 200]]
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png")[0, :, 0].tolist() == [0, 100, 200]
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0])
    pal.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png").tolist() == [[[0, 0, 0], [0, 255, 0]]]


def test_cmyk_jpeg(tmp_path):
    rgb = _gradient(96, 128)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    assert out.shape == rgb.shape and np.abs(out.astype(int) - rgb).mean() < 6


def test_large_jpeg_decodes_at_reduced_scale(tmp_path):
    big = cv2.resize(_gradient(60, 80), (8000, 6000), interpolation=cv2.INTER_LINEAR)
    path = tmp_path / "big.jpg"
    Image.fromarray(big).save(path, quality=90)
    small = decode_image(path, min_long_side=640)
    assert (small.width, small.height) == (8000, 6000)
    assert small.pixels.shape == (750, 1000, 3) and small.reduced  # 1/8: 1000 >= 640 > 500
    assert decode_image(path, min_long_side=1500).pixels.shape == (1500, 2000, 3)
    full = decode_image(path)
    assert full.pixels.shape == (6000, 8000, 3) and not full.reduced
    reference = cv2.resize(full.pixels, (1000, 750), interpolation=cv2.INTER_AREA)
    assert np.abs(small.pixels.astype(int) - reference).mean() < 2
    # the reduced-to-full map sends reduced pixel centres to the centres of the blocks they cover
    corner = small.to_source() @ np.array([0.0, 0.0, 1.0])
    assert corner[:2].tolist() == [3.5, 3.5]


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(30000, 30000))
    with pytest.raises(UnreadableImage, match="too large") as info:
        decode_image(path)
    assert str(path) in str(info.value)
    Image.fromarray(_gradient()).save(tmp_path / "ok.png")
    with pytest.raises(UnreadableImage, match=r"64x48 = 3072 pixels \(limit 1000"):
        decode_image(tmp_path / "ok.png", max_pixels=1000)


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("empty.jpg", b"", "empty file"),
        ("text.jpg", b"this is not a jpeg\n", "not an image (text)"),
        ("page.jpg", b"<!DOCTYPE html><html><body>404</body></html>", "not an image (HTML page)"),
        ("doc.jpg", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj", "not an image (PDF document)"),
        ("noise.jpg", bytes(range(256)) * 4, "not an image (unknown format, starts with 0x0001020304050607)"),
        ("photo.heic", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIF image: format not supported"),
    ],
)
def test_not_images(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UnreadableImage) as info:
        decode_image(path)
    assert info.value.reason.startswith(reason)
    assert isinstance(info.value, FormatError) and str(path) in str(info.value)


def test_truncated_files(tmp_path):
    jpeg = (RAW / "kit_harington" / "2.jpeg").read_bytes()
    png_path = tmp_path / "full.png"
    Image.fromarray(_gradient(200, 300)).save(png_path)
    png = png_path.read_bytes()
    for name, data, fmt in [("a.jpg", jpeg[:5000], "JPEG"), ("b.jpg", jpeg[:-200], "JPEG"), ("c.jpg", jpeg[:300], "JPEG"),
                            ("d.png", png[: len(png) // 2], "PNG"), ("e.png", png[:40], "PNG")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UnreadableImage) as info:
            decode_image(tmp_path / name)
        assert info.value.reason == f"truncated {fmt}", (name, info.value.reason)


def test_shared_edge_files():
    if not EDGE.is_dir():
        pytest.skip(f"{EDGE} not found (shared test photos)")
    reasons = {}
    for path in sorted(EDGE.iterdir()):
        try:
            img = load_image(path)
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.flags.c_contiguous
            reasons[path.name] = "ok"
        except UnreadableImage as exc:
            reasons[path.name] = exc.reason
    assert reasons == {
        "empty.jpg": "empty file",
        "grayscale_biden.png": "ok",
        "no_face_noise.jpg": "ok",
        "not_an_image.jpg": "not an image (text)",
        "rgba_32bit.png": "ok",
        "truncated.jpg": "truncated JPEG",
        "照片 名字.jpeg": "ok",
    }


def test_non_ascii_path_with_spaces(tmp_path):
    folder = tmp_path / "照片 文件夹"
    folder.mkdir()
    target = folder / "张 三 ß.jpg"
    shutil.copy(RAW / "kit_harington" / "2.jpeg", target)
    assert load_image(target).shape == (374, 630, 3)
    with pytest.raises(UnreadableImage, match="cannot read file"):
        decode_image(folder / "missing ü.jpg")

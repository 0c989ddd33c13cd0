"""Decode photo files into ``(H, W, 3) uint8`` RGB arrays, whatever the file holds.

One decoder (Pillow) for every format, so that every file fails or succeeds the same way:

* EXIF orientation is applied: the array is the photo as a viewer shows it, and ``width`` /
  ``height`` are the displayed size.
* Grayscale, bilevel, palette and YCbCr images become RGB. **Alpha is composited on black**
  (``rgb * alpha / 255``): transparent pixels become black, whatever colour the file stored under
  them. 16-bit samples keep their high byte. CMYK is converted through its embedded ICC profile
  when it has one, otherwise with Pillow's plain formula. Other ICC profiles are ignored (the
  reference, ``cv2.imread``, ignores them too). Multi-frame files (GIF, TIFF, MPO) give their
  first frame.
* Large JPEGs can be decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (``min_long_side``),
  which is several times faster than a full decode followed by a resize.
* Paths are read as bytes by Python, so non-ASCII names and spaces work on every platform.
* Every failure is an :class:`UnreadableImage` with a short readable ``reason``: ``"empty file"``,
  ``"truncated JPEG"``, ``"not an image (text)"``, ``"image too large: ..."``, ...
"""
from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageMode, UnidentifiedImageError

from .errors import FormatError

#: Largest image accepted, in pixels (width x height of the stored image). This is the size at
#: which Pillow itself refuses a file as a possible decompression bomb (2 x ``MAX_IMAGE_PIXELS``);
#: a 16-bit 179-megapixel photo would already need 1 GB of memory.
MAX_PIXELS = 178_956_970

#: Most bytes a decode may take, counted from the header before decoding: width x height (at the
#: scale decoded) x the larger of the stored bytes per pixel (channels x bytes per sample) and 3
#: (the RGB result). 512 MiB is an 8-bit RGB photo at :data:`MAX_PIXELS`; a file with more bytes per
#: pixel (16-bit samples, alpha, CMYK) gets proportionally fewer pixels, since decoding and
#: converting it takes memory in proportion to its samples, not to its pixel count.
MAX_DECODED_BYTES = 512 << 20

#: PNG colour type (IHDR byte 25) -> channels.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}

#: JPEG DCT scale denominators libjpeg can decode at directly.
_JPEG_REDUCTIONS = (8, 4, 2)

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# (magic bytes at offset 0, what the file is) for formats we can name in an error message.
_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"%PDF", "PDF document"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip archive"),
)
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis"}


class UnreadableImage(FormatError):
    """A file that cannot be decoded as an image. ``reason`` is the short text for a manifest."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.reason = reason
        super().__init__(path, f"cannot decode image: {reason}")


@dataclass(frozen=True)
class DecodedImage:
    """A decoded photo.

    ``pixels`` is ``(h, w, 3) uint8`` RGB, possibly decoded at reduced scale; ``width`` and
    ``height`` are the full-resolution size in pixels after EXIF orientation (the frame that
    source coordinates refer to); ``format`` is Pillow's format name ("JPEG", "PNG", ...).
    """

    pixels: np.ndarray
    width: int
    height: int
    format: str

    @property
    def reduced(self) -> bool:
        """True when ``pixels`` is smaller than the full-resolution image."""
        return self.pixels.shape[1] != self.width or self.pixels.shape[0] != self.height

    def to_source(self) -> np.ndarray:
        """``(3, 3)`` affine map from ``pixels`` coordinates to full-resolution coordinates.

        Pixel centres are at integer coordinates; a reduced pixel ``i`` covers full-resolution
        pixels ``[i * s, (i + 1) * s)``, so its centre maps to ``(i + 0.5) * s - 0.5``.
        """
        h, w = self.pixels.shape[:2]
        return scale_matrix(self.width / w, self.height / h)


def scale_matrix(sx: float, sy: float) -> np.ndarray:
    """``(3, 3)`` map ``x -> (x + 0.5) * sx - 0.5`` (same in y): resampling with pixel centres."""
    return np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5], [0.0, 0.0, 1.0]])


def sniff_format(data: bytes) -> str | None:
    """What the first bytes say the file is ("JPEG", "PNG", "HEIF", "text", ...), or None."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS:
        return "HEIF"
    head = data[:4096]
    if b"\x00" not in head:
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:  # cut inside a multi-byte character at the end?
            if exc.start < len(head) - 3:
                return None
            text = head[: exc.start].decode("utf-8")
        low = text.lstrip().lower()
        if low.startswith(("<!doctype html", "<html")):
            return "HTML page"
        if low.startswith("<svg") or (low.startswith("<?xml") and "<svg" in low):
            return "SVG"
        return "text"
    return None


def _not_an_image(kind: str | None, data: bytes, exc: Exception) -> str:
    """Reason text for a file that Pillow could not even identify."""
    if kind is None:
        return f"not an image (unknown format, starts with 0x{data[:8].hex()})"
    if kind in ("text", "HTML page", "PDF document", "ZIP archive", "gzip archive"):
        return f"not an image ({kind})"
    if kind in ("HEIF", "SVG"):
        return f"{kind} image: format not supported (convert it to JPEG or PNG)"
    # The magic says image, but the header is cut short or damaged.
    if len(data) < 64 or "truncated" in str(exc).lower():
        return f"truncated {kind}"
    return f"corrupt {kind} header ({exc})"


def _decode_failure(fmt: str, exc: Exception) -> str:
    msg = str(exc) or type(exc).__name__
    if "truncated" in msg.lower() or isinstance(exc, EOFError):
        return f"truncated {fmt}"
    return f"corrupt {fmt} data ({msg})"


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make the photo unreadable
        return 1
    return value if value in _TRANSPOSE_FOR_ORIENTATION else 1


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    return ((rgb * alpha + 127) // 255).astype(np.uint8)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(img, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # broken profile: fall back to the plain formula
    return img.convert("RGB")


def _high_byte(values: np.ndarray) -> np.ndarray:
    """Integer or float samples of any range to uint8 (16-bit keeps its high byte)."""
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind == "f":
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if top <= 1.0 else 255.0 / top
        return np.clip(np.nan_to_num(values) * scale + 0.5, 0, 255).astype(np.uint8)
    top = int(values.max()) if values.size else 0
    if top <= 255 and values.dtype.itemsize > 2:  # 32-bit mode "I" holding 8-bit values
        return np.clip(values, 0, 255).astype(np.uint8)
    if top <= 65535:
        return (np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    return (np.clip(values, 0, None).astype(np.float64) * (255.0 / top) + 0.5).astype(np.uint8)


def _to_rgb_array(img: Image.Image, path) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        arr = np.asarray(img)
    elif mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
        arr = _composite_on_black(np.asarray(img.convert("RGBA")))
    elif mode == "CMYK":
        arr = np.asarray(_cmyk_to_rgb(img))
    elif mode.startswith("I") or mode == "F":
        gray = _high_byte(np.asarray(img))
        arr = np.repeat(gray[..., None], 3, axis=2)
    else:
        try:
            arr = np.asarray(img.convert("RGB"))
        except (ValueError, OSError) as exc:
            raise UnreadableImage(path, f"unsupported colour mode {mode} ({exc})") from exc
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise UnreadableImage(path, f"unsupported colour mode {mode} (decoded to {arr.dtype} {arr.shape})")
    return np.ascontiguousarray(arr)


def _bytes_per_pixel(img: Image.Image, data: bytes) -> int:
    """Bytes per pixel of the stored samples according to the header (channels x bytes per
    sample: PNG IHDR bit depth and colour type, TIFF BitsPerSample, else Pillow's mode), at least 3."""
    desc = ImageMode.getmode(img.mode)
    per_pixel = len(desc.bands) * np.dtype(desc.typestr).itemsize
    if img.format == "PNG" and len(data) >= 26 and data[12:16] == b"IHDR":
        bit_depth, colour = data[24], data[25]
        per_pixel = max(per_pixel, _PNG_CHANNELS.get(colour, 4) * max(1, math.ceil(bit_depth / 8)))
    elif img.format == "TIFF":
        try:
            bits = img.tag_v2.get(258) or (8,)
            bits = bits if isinstance(bits, (tuple, list)) else (bits,)
            samples = int(img.tag_v2.get(277) or len(bits))
            per_pixel = max(per_pixel, samples * max(1, math.ceil(max(int(b) for b in bits) / 8)))
        except (TypeError, ValueError, AttributeError):
            pass
    return max(per_pixel, 3)


def _jpeg_reduction(size: tuple[int, int], min_long_side: int | None) -> int:
    """Largest libjpeg scale denominator that keeps the longest side >= ``min_long_side``."""
    if not min_long_side or min_long_side <= 0:
        return 1
    long_side = max(size)
    for r in _JPEG_REDUCTIONS:
        if math.ceil(long_side / r) >= min_long_side:
            return r
    return 1


def decode_image(
    path: str | os.PathLike,
    data: bytes | None = None,
    *,
    min_long_side: int | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_DECODED_BYTES,
) -> DecodedImage:
    """Decode ``path`` (or its bytes ``data``, if already read) to RGB.

    ``min_long_side``: when set and the file is a JPEG, decode at the coarsest DCT scale (1/2,
    1/4, 1/8) whose longest side is still at least this many pixels; other formats are always
    decoded at full resolution. Raises :class:`UnreadableImage` for unreadable files, and for
    files larger than ``max_pixels`` pixels or whose decode would take more than ``max_bytes``
    (see :data:`MAX_DECODED_BYTES`; checked from the header, before decoding).
    """
    if data is None:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UnreadableImage(path, f"cannot read file ({exc.strerror or exc})") from exc
    if not data:
        raise UnreadableImage(path, "empty file")
    kind = sniff_format(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise UnreadableImage(path, f"image too large ({exc})") from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UnreadableImage(path, _not_an_image(kind, data, exc)) from exc
        fmt = img.format or kind or "image"
        w, h = img.size
        if w <= 0 or h <= 0:
            raise UnreadableImage(path, f"{fmt} header gives an empty size {w}x{h}")
        if w * h > max_pixels:
            raise UnreadableImage(
                path, f"image too large: {w}x{h} = {w * h} pixels (limit {max_pixels}, decompression-bomb guard)"
            )
        if fmt == "JPEG":
            r = _jpeg_reduction((w, h), min_long_side)
            if r > 1:
                img.draft(None, (w // r, h // r))
        dw, dh = img.size  # the scale decoded (a JPEG draft may be smaller)
        per_pixel = _bytes_per_pixel(img, data)
        if dw * dh * per_pixel > max_bytes:
            raise UnreadableImage(
                path, f"image too large: {w}x{h} at {per_pixel} bytes per pixel needs {dw * dh * per_pixel} bytes "
                      f"to decode (limit {max_bytes}, decompression-bomb guard)")
        try:
            img.load()
        except MemoryError as exc:
            raise UnreadableImage(path, f"{fmt} too large to decode in memory ({w}x{h})") from exc
        except Exception as exc:  # noqa: BLE001 - Pillow decoders raise many types for bad data
            raise UnreadableImage(path, _decode_failure(fmt, exc)) from exc
        orientation = _orientation(img)
        if orientation != 1:
            img = img.transpose(_TRANSPOSE_FOR_ORIENTATION[orientation])
            if orientation >= 5:
                w, h = h, w
        pixels = _to_rgb_array(img, path)
    return DecodedImage(pixels=pixels, width=w, height=h, format=fmt)


def load_image(path: str | os.PathLike, *, min_long_side: int | None = None) -> np.ndarray:
    """``(H, W, 3) uint8`` RGB pixels of an image file (see :func:`decode_image`)."""
    return decode_image(path, min_long_side=min_long_side).pixels

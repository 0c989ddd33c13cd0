"""Image sizes: one type and one parser for every option that takes a size.

InsightFace spells sizes height first, in two ways that are both accepted everywhere: ``112x112``
(align, ``face2rec2``) and ``112,112`` (``train_softmax.py --image-size``, ``property``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

__all__ = ["ImageSize", "parse_image_size"]


class ImageSize(NamedTuple):
    """A size in pixels, height first (InsightFace's order)."""

    height: int
    width: int

    def __str__(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def csv(self) -> str:
        """The ``"height,width"`` spelling (``--image-size``, ``property``)."""
        return f"{self.height},{self.width}"


def parse_image_size(value: str | Sequence[int], *, minimum: int = 1) -> ImageSize:
    """``"112x96"``, ``"112,96"``, ``"112 X 96"`` or ``(112, 96)`` -> ``ImageSize(112, 96)``.

    Raises ``ValueError`` naming the value unless it is two integers of at least ``minimum``.
    """
    if isinstance(value, str):
        parts: Sequence = value.lower().replace("x", ",").split(",")
    else:
        parts = list(value) if value is not None else []
    try:
        size = tuple(int(str(p).strip()) for p in parts)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < minimum:
        raise ValueError(f"image size {value!r}: expected two integers of at least {minimum}, height x width, "
                         "e.g. 112x112 or 112,112")
    return ImageSize(*size)

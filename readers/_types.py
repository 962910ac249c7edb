"""Coordinate conventions shared by every reader.

Locations are ``YX`` = ``(y, x)`` = ``(row, col)`` and sizes are ``HW`` =
``(height, width)``, as in numpy indexing. Nothing in ``readers`` flips axes;
a backend whose library speaks ``(x, y)`` (OpenSlide) converts at its call site.
"""

from __future__ import annotations

YX = tuple[int, int]
"""A location ``(y, x)`` in pixels: row first, then column."""

HW = tuple[int, int]
"""A size ``(height, width)`` in pixels."""

HWC = tuple[int, int, int]
"""An image shape ``(height, width, channels)``."""


def as_hw(value: object, name: str = "size") -> HW:
    """``value`` as a positive ``(height, width)``; ``TypeError``/``ValueError`` naming ``name``."""
    try:
        h, w = (int(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (height, width) of ints, got {value!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive (height, width), got {(h, w)}")
    return h, w

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

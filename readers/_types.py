"""Coordinate conventions shared by every reader, and the checks of integer arguments.

Locations are ``YX`` = ``(y, x)`` = ``(row, col)`` and sizes are ``HW`` =
``(height, width)``, as in numpy indexing. Nothing in ``readers`` flips axes;
a backend whose library speaks ``(x, y)`` (OpenSlide) converts at its call site.

Integer arguments go through ``operator.index``: any integer type is taken
(``int``, ``numpy.int64``, a 0-d integer tensor), a float is a ``TypeError``
rather than silently truncated (``1.7`` is not pixel 1).
"""

from __future__ import annotations

import operator

YX = tuple[int, int]
"""A location ``(y, x)`` in pixels: row first, then column."""

HW = tuple[int, int]
"""A size ``(height, width)`` in pixels."""

HWC = tuple[int, int, int]
"""An image shape ``(height, width, channels)``."""


def as_int(value: object, name: str) -> int:
    """``value`` as an ``int`` (``operator.index``); ``TypeError`` naming ``name`` otherwise."""
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}") from None


def _int_pair(value: object, name: str, axes: str) -> tuple[int, int]:
    """``value`` as two ints; ``TypeError`` naming ``name`` and its ``axes`` otherwise."""
    try:
        a, b = value  # type: ignore[misc]
        return operator.index(a), operator.index(b)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair {axes} of ints, got {value!r}") from None


def as_yx(value: object, name: str = "location") -> YX:
    """``value`` as a location ``(y, x)``, any sign; ``TypeError`` naming ``name``."""
    return _int_pair(value, name, "(y, x)")


def as_hw(value: object, name: str = "size") -> HW:
    """``value`` as a positive ``(height, width)``; ``TypeError``/``ValueError`` naming ``name``."""
    h, w = _int_pair(value, name, "(height, width)")
    if h <= 0 or w <= 0:
        raise ValueError(f"{name} must be positive (height, width), got {(h, w)}")
    return h, w

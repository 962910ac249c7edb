"""Patch boxes: the one encoding of where a sampled patch lies on a slide.

A box is ``(y, x, h, w)`` in level-0 pixels: top-left corner and size, ints. Arrays of
boxes are ``int64 [N, 4]``. A patch read at a level of downsample ``d`` with top-left
``(oy, ox)`` in that level's pixels and size ``(ph, pw)`` covers the level-0 box
``(round(oy * d), round(ox * d), round(ph * d), round(pw * d))``: e.g. a 32 x 32 patch
at ``(100, 40)`` on a level of downsample 4.0 is ``(400, 160, 128, 128)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def patch_boxes(offsets: np.ndarray, patch_size: Sequence[int], downsample: float) -> np.ndarray:
    """Level-0 boxes of patches.

    Args:
        offsets: int [N, 2] ``(y, x)`` top-left corners in the patch level's pixels.
        patch_size: ``(h, w)`` in the patch level's pixels.
        downsample: level-0 pixels per pixel of the patch level.

    Returns:
        int64 [N, 4] boxes ``(y, x, h, w)`` in level-0 pixels.
    """
    offsets = np.asarray(offsets, dtype=np.float64).reshape(-1, 2)
    size = np.round(np.asarray(patch_size, dtype=np.float64) * downsample)
    corners = np.round(offsets * downsample)
    return np.concatenate([corners, np.tile(size, (len(offsets), 1))], axis=1).astype(np.int64)


def box_ring(box: Sequence[int], slide_shape: Sequence[int]) -> list[list[int]]:
    """The closed polygon ring of ``box`` clipped to the slide, as GeoJSON wants it:
    ``[[x, y], ...]`` (x first: the one place that flips axes), five corners.

    ``slide_shape`` is level-0 ``(H, W, ...)``; a patch may hang over the slide's edge,
    where it was read as fill.
    """
    y, x, h, w = (int(v) for v in box)
    height, width = int(slide_shape[0]), int(slide_shape[1])
    y0, x0 = min(max(y, 0), height), min(max(x, 0), width)
    y1, x1 = min(max(y + h, 0), height), min(max(x + w, 0), width)
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

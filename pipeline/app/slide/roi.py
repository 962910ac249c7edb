"""Regions of interest: GeoJSON polygons (as QuPath exports annotations) restricting
where patches are sampled.

A slide's ROI file is ``<roi_dir>/<slide>.geojson``: a FeatureCollection (or a single
Feature or geometry) of ``Polygon`` / ``MultiPolygon`` geometries in level-0 pixels,
coordinates ``[x, y]`` as GeoJSON orders them. Holes are honoured. The polygons are
rasterised onto the attention view's grid, where they are combined with the tissue
mask.

Files come from other people: one over ``MAX_ROI_BYTES``, nested deeper than
``MAX_DEPTH``, or with a ring of fewer than three finite points is a ``UserError``
naming it; a ring of a million vertices is reduced to the grid's resolution before it
is filled, so its cost follows the grid, not the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.app.errors import UserError

MAX_ROI_BYTES = 64 * 1024 * 1024
"""Largest ROI file read (QuPath exports of whole-slide annotations are far smaller)."""
MAX_DEPTH = 16
"""Deepest nesting of Features / GeometryCollections followed."""
GRID_STEP = 0.25
"""Resolution, in grid pixels, a ring is reduced to before it is filled."""


def roi_path(roi_dir: str | os.PathLike, slide: str) -> Path:
    return Path(roi_dir) / f"{slide}.geojson"


def read_polygons(path: str | os.PathLike) -> list[list[np.ndarray]]:
    """The polygons of a GeoJSON file: each a list of rings (the outer ring first,
    then holes), a ring float64 ``[K, 2]`` of ``(x, y)`` level-0 pixels.
    A file that is not GeoJSON polygons is a ``UserError`` naming it."""
    try:
        size = os.stat(path).st_size
        if size > MAX_ROI_BYTES:
            raise ValueError(f"{size} bytes, more than {MAX_ROI_BYTES}")
        data = json.loads(Path(path).read_text())
        polygons = list(_polygons(data, 0))
    except (OSError, ValueError, KeyError, TypeError, IndexError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise UserError(f"{path}: not a GeoJSON file of polygons ({reason})") from None
    if not polygons:
        raise UserError(f"{path}: no Polygon or MultiPolygon geometry")
    return polygons


def _polygons(data: dict, depth: int) -> Iterator[list[np.ndarray]]:
    if depth > MAX_DEPTH:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
    kind = data["type"]
    if kind == "FeatureCollection":
        for feature in data["features"]:
            yield from _polygons(feature, depth + 1)
    elif kind == "Feature":
        if data.get("geometry"):
            yield from _polygons(data["geometry"], depth + 1)
    elif kind == "GeometryCollection":
        for geometry in data["geometries"]:
            yield from _polygons(geometry, depth + 1)
    elif kind == "Polygon":
        yield [_ring(ring) for ring in data["coordinates"]]
    elif kind == "MultiPolygon":
        for polygon in data["coordinates"]:
            yield [_ring(ring) for ring in polygon]


def _ring(coordinates) -> np.ndarray:
    """float64 ``[K, 2]`` ``(x, y)`` of a GeoJSON ring; ``ValueError`` unless it has
    three or more finite points."""
    ring = np.asarray(coordinates, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[0] < 3 or ring.shape[1] < 2:
        raise ValueError(f"a ring needs 3 or more [x, y] points, got shape {ring.shape}")
    if not np.isfinite(ring[:, :2]).all():
        raise ValueError("a ring has a coordinate that is not a finite number")
    return ring[:, :2]


def rasterise(
    polygons: Sequence[list[np.ndarray]], grid: Sequence[int], slide_shape: Sequence[int]
) -> np.ndarray:
    """bool ``[h, w]`` on a grid of shape ``grid`` covering the slide's level-0
    ``slide_shape`` ``(H, W)``: True where a pixel centre lies inside a polygon (and
    outside its holes)."""
    from skimage.draw import polygon as fill

    h, w = int(grid[0]), int(grid[1])
    sy, sx = h / float(slide_shape[0]), w / float(slide_shape[1])
    inside = np.zeros((h, w), bool)
    for rings in polygons:
        area = np.zeros((h, w), bool)
        for k, ring in enumerate(rings):
            # Level-0 (x, y) to grid pixel coordinates of pixel centres.
            rows, cols = on_grid(ring[:, 1] * sy - 0.5, ring[:, 0] * sx - 0.5)
            rows, cols = fill(rows, cols, (h, w))
            area[rows, cols] = k == 0  # the outer ring fills, holes clear
        inside |= area
    return inside


def on_grid(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ring's vertices (grid pixel coordinates, float [K]) rounded to ``GRID_STEP``
    with repeated points dropped: what filling it on the grid can tell apart. A
    ring of 10^6 vertices on a 256-pixel grid keeps a few thousand."""
    points = np.round(np.stack([rows, cols], axis=1) / GRID_STEP) * GRID_STEP
    keep = np.ones(len(points), bool)
    keep[1:] = np.any(points[1:] != points[:-1], axis=1)
    points = points[keep]
    return points[:, 0], points[:, 1]

"""Regions of interest: GeoJSON polygons (as QuPath exports annotations) restricting
where patches are sampled.

A slide's ROI file is ``<roi_dir>/<slide>.geojson``: a FeatureCollection (or a single
Feature or geometry) of ``Polygon`` / ``MultiPolygon`` geometries in level-0 pixels,
coordinates ``[x, y]`` as GeoJSON orders them. Holes are honoured. The polygons are
rasterised onto the attention view's grid, where they are combined with the tissue
mask.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from pipeline.app.errors import UserError


def roi_path(roi_dir: str | os.PathLike, slide: str) -> Path:
    return Path(roi_dir) / f"{slide}.geojson"


def read_polygons(path: str | os.PathLike) -> list[list[np.ndarray]]:
    """The polygons of a GeoJSON file: each a list of rings (the outer ring first,
    then holes), a ring float64 ``[K, 2]`` of ``(x, y)`` level-0 pixels.
    A file that is not GeoJSON polygons is a ``UserError`` naming it."""
    try:
        data = json.loads(Path(path).read_text())
        polygons = list(_polygons(data))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a GeoJSON file of polygons ({e})") from None
    if not polygons:
        raise UserError(f"{path}: no Polygon or MultiPolygon geometry")
    return polygons


def _polygons(data: dict) -> Iterator[list[np.ndarray]]:
    kind = data["type"]
    if kind == "FeatureCollection":
        for feature in data["features"]:
            yield from _polygons(feature)
    elif kind == "Feature":
        if data.get("geometry"):
            yield from _polygons(data["geometry"])
    elif kind == "GeometryCollection":
        for geometry in data["geometries"]:
            yield from _polygons(geometry)
    elif kind == "Polygon":
        yield [np.asarray(ring, dtype=np.float64)[:, :2] for ring in data["coordinates"]]
    elif kind == "MultiPolygon":
        for polygon in data["coordinates"]:
            yield [np.asarray(ring, dtype=np.float64)[:, :2] for ring in polygon]


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
            rows, cols = fill(ring[:, 1] * sy - 0.5, ring[:, 0] * sx - 0.5, (h, w))
            area[rows, cols] = k == 0  # the outer ring fills, holes clear
        inside |= area
    return inside

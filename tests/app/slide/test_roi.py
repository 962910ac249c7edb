"""Regions of interest from untrusted files: huge rings, empty rings, deep nesting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.app.errors import UserError
from pipeline.app.slide.roi import MAX_DEPTH, on_grid, rasterise, read_polygons


def circle(n: int, cx=500.0, cy=400.0, r=300.0) -> list[list[float]]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)
    return np.vstack([ring, ring[:1]]).tolist()


def test_a_million_vertex_ring_is_reduced_to_the_grid_and_fills_like_a_coarse_one(tmp_path):
    path = tmp_path / "big.geojson"
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [circle(1_000_000)]}))
    polygons = read_polygons(path)
    ring = polygons[0][0]
    rows, cols = on_grid(ring[:, 1] * 0.1 - 0.5, ring[:, 0] * 0.1 - 0.5)
    # a circle of radius 30 grid pixels: at most 4 points per 1/4 pixel of perimeter
    assert len(rows) < 4 * 2 * np.pi * 30 * 4
    fine = rasterise(polygons, (80, 100), (800, 1000))
    coarse = rasterise([[np.asarray(circle(720))]], (80, 100), (800, 1000))
    assert abs(int(fine.sum()) - int(coarse.sum())) <= 4 and fine.sum() > 2500


@pytest.mark.parametrize(
    "geometry, reason",
    [
        ({"type": "Polygon", "coordinates": [[]]}, "3 or more"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}, "3 or more"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1, "x"], [2, 0]]]}, "could not convert"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [1e400, 1], [2, 0]]]}, "finite"),
    ],
)
def test_malformed_rings_are_user_errors_naming_the_file(tmp_path, geometry, reason):
    path = tmp_path / "bad.geojson"
    path.write_text(json.dumps(geometry))
    with pytest.raises(UserError, match=reason) as info:
        read_polygons(path)
    assert str(path) in str(info.value)


def test_deep_nesting_is_a_user_error(tmp_path):
    geometry = {"type": "Polygon", "coordinates": [circle(8)]}
    for _ in range(MAX_DEPTH + 2):
        geometry = {"type": "GeometryCollection", "geometries": [geometry]}
    path = tmp_path / "deep.geojson"
    path.write_text(json.dumps(geometry))
    with pytest.raises(UserError, match="nested deeper than"):
        read_polygons(path)
    path.write_text("[" * 100_000 + "]" * 100_000)  # the JSON parser's own recursion
    with pytest.raises(UserError, match="not a GeoJSON file"):
        read_polygons(path)

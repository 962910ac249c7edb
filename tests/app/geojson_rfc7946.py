"""A small validator of GeoJSON structure (RFC 7946) and of what QuPath 0.5 reads.

Only what our files use is accepted: a FeatureCollection of Features with Polygon
geometries. ``check_feature_collection`` raises ``AssertionError`` naming the first
violation.
"""

from __future__ import annotations

import numbers


def _check_position(position, where: str) -> None:
    # RFC 7946 3.1.1: a position is an array of two or three numbers, x (easting) first.
    assert isinstance(position, list) and len(position) in (2, 3), f"{where}: bad position"
    assert all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in position), (
        f"{where}: non-numeric coordinate {position}"
    )


def _signed_area(ring) -> float:
    pairs = zip(ring[:-1], ring[1:], strict=True)
    return sum(x0 * y1 - x1 * y0 for (x0, y0, *_), (x1, y1, *_) in pairs) / 2


def _check_polygon(geometry: dict, where: str) -> None:
    # RFC 7946 3.1.6: linear rings of >= 4 positions, first == last; the exterior ring
    # counterclockwise (right-hand rule), holes clockwise.
    rings = geometry.get("coordinates")
    assert isinstance(rings, list) and rings, f"{where}: Polygon without rings"
    for k, ring in enumerate(rings):
        assert isinstance(ring, list) and len(ring) >= 4, f"{where}: ring of < 4 positions"
        for position in ring:
            _check_position(position, where)
        assert ring[0] == ring[-1], f"{where}: ring not closed"
        area = _signed_area(ring)
        assert area != 0, f"{where}: degenerate ring"
        assert (area > 0) == (k == 0), f"{where}: ring {k} breaks the right-hand rule"


def check_feature_collection(data: dict) -> None:
    """RFC 7946 sections 3.2-3.3 for a FeatureCollection of Polygon Features."""
    assert isinstance(data, dict) and data.get("type") == "FeatureCollection"
    assert "crs" not in data, "RFC 7946 removed 'crs'"
    assert isinstance(data.get("features"), list)
    for i, feature in enumerate(data["features"]):
        where = f"feature {i}"
        assert isinstance(feature, dict) and feature.get("type") == "Feature", where
        assert "geometry" in feature and "properties" in feature, f"{where}: missing member"
        geometry = feature["geometry"]
        assert isinstance(geometry, dict) and geometry.get("type") == "Polygon", where
        _check_polygon(geometry, where)
        assert feature["properties"] is None or isinstance(feature["properties"], dict), where
        if "id" in feature:
            assert isinstance(feature["id"], str | numbers.Real), f"{where}: bad id"


def check_qupath(data: dict) -> None:
    """What QuPath 0.5's GeoJSON import reads (PathObjectTypeAdapters): ``objectType``
    annotation / detection, ``measurements`` a map of names to numbers, ``metadata`` a
    map of strings; ours: one classified slide annotation, unclassified detections."""
    annotations = []
    for i, feature in enumerate(data["features"]):
        p = feature["properties"]
        assert p["objectType"] in ("annotation", "detection"), f"feature {i}: {p['objectType']}"
        measurements = p.get("measurements", {})
        assert isinstance(measurements, dict)
        assert all(isinstance(v, float) for v in measurements.values()), f"feature {i}"
        assert all(isinstance(v, str) for v in p.get("metadata", {}).values()), f"feature {i}"
        if p["objectType"] == "annotation":
            annotations.append(p)
        else:
            assert "classification" not in p, f"feature {i}: a patch is not classified"
            assert set(measurements) == {"attention"}, f"feature {i}: {measurements}"
    assert len(annotations) == 1, "one slide-level annotation"
    assert set(annotations[0]["classification"]) == {"name"}
    assert annotations[0]["metadata"]["label"] == annotations[0]["classification"]["name"]

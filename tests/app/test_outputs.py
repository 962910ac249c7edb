"""Output writers: atomic replacement, CSV, PNG and GeoJSON contents."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.app import files, outputs


def test_atomic_target_keeps_old_file_on_error(tmp_path):
    path = tmp_path / "predictions.csv"
    path.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk full"):
        with files.atomic_target(path) as tmp:
            tmp.write_text("half of the new conte")
            raise RuntimeError("disk full")  # injected fault mid-write
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]  # no temp left


def test_csv_round_trip(tmp_path):
    columns = outputs.prediction_columns(["neg", "pos"])
    assert columns == ["slide", "path", "status", "label", "prob_neg", "prob_pos", "mpp", "error"]
    rows = [{"slide": "a", "status": "ok", "prob_neg": "0.25"}, {"slide": "b", "error": "x, y"}]
    files.write_csv(tmp_path / "p.csv", columns, rows)
    back = files.read_csv(tmp_path / "p.csv")
    assert back[0]["prob_neg"] == "0.25" and back[0]["error"] == ""
    assert back[1]["error"] == "x, y"
    assert files.read_csv(tmp_path / "missing.csv") == []
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfslide,label\r\na.svs,pos\r\n")
    assert files.read_csv(tmp_path / "excel.csv") == [{"slide": "a.svs", "label": "pos"}]


def test_heatmap_is_thumbnail_sized_and_red_where_attention_peaks(tmp_path):
    thumb = np.full((40, 60, 3), 200, np.uint8)
    attention = np.zeros((20, 30), np.float32)
    attention[0, 0] = 1.0
    outputs.write_heatmap_png(tmp_path / "h.png", thumb, attention)
    img = np.asarray(Image.open(tmp_path / "h.png"))
    assert img.shape == (40, 60, 3)
    r, g, b = img[0, 0].astype(int)
    assert r > g and r > b  # the peak is tinted red
    np.testing.assert_array_equal(img[-1, -1], [200, 200, 200])  # zero attention untouched


def test_geojson_is_xy_ordered_and_clipped_to_the_slide(tmp_path):
    boxes = np.array([[10, 20, 32, 64], [-8, 990, 32, 32]])  # (y, x, h, w) level 0
    collection = outputs.patches_feature_collection(
        boxes, np.array([0.5, 0.25]), (100, 1000, 3), "s1", "positive"
    )
    outputs.write_geojson(tmp_path / "p.geojson", collection)
    data = json.loads((tmp_path / "p.geojson").read_text())
    assert data["type"] == "FeatureCollection"
    first, second = data["features"]
    assert first["geometry"]["coordinates"] == [[[20, 10], [84, 10], [84, 42], [20, 42], [20, 10]]]
    assert second["geometry"]["coordinates"][0][2] == [1000, 24]  # clipped at x = W, y >= 0
    assert first["properties"]["objectType"] == "annotation"
    assert first["properties"]["classification"] == {"name": "positive"}
    assert first["properties"]["attention"] == 0.5

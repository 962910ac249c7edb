"""Output writers: atomic replacement, CSV, PNG and GeoJSON contents."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.app import files
from pipeline.app.results import outputs
from tests.app.geojson_rfc7946 import check_feature_collection, check_qupath


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
    columns = outputs.prediction_columns(["prob_neg", "prob_pos"])
    assert columns == [
        "slide",
        "path",
        "status",
        "label",
        "prob_neg",
        "prob_pos",
        "prob_neg_sd",
        "prob_pos_sd",
        "tissue_fraction",
        "mpp",
        "distinct_patches",
        "flags",
        "error",
    ]
    rows = [{"slide": "a", "status": "ok", "prob_neg": "0.25"}, {"slide": "b", "error": "x, y"}]
    files.write_csv(tmp_path / "p.csv", columns, rows)
    back = files.read_csv(tmp_path / "p.csv")
    assert back[0]["prob_neg"] == "0.25" and back[0]["error"] == ""
    assert back[1]["error"] == "x, y"
    assert files.read_csv(tmp_path / "missing.csv") == []
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbfslide,label\r\na.svs,pos\r\n")
    assert files.read_csv(tmp_path / "excel.csv") == [{"slide": "a.svs", "label": "pos"}]


def test_heatmap_is_display_sized_transparent_off_tissue_with_a_colour_bar(tmp_path):
    display = np.full((40, 60, 3), 200, np.uint8)
    attention = np.zeros((20, 30), np.float32)
    attention[0, 0], attention[10:, 15:] = 0.5, 0.5 / 150  # a peak, and a flat patch
    boxes = np.array([[60, 90, 20, 30]])  # level-0 (y, x, h, w) on a 400 x 600 slide
    for scale in ("absolute", "relative"):
        path = tmp_path / f"{scale}.png"
        outputs.write_heatmap_png(
            path, display, attention, boxes, np.array([0.5]), (400, 600), scale
        )
        img = np.asarray(Image.open(path))
        assert img.shape == (40, 60 + outputs.COLOUR_BAR_WIDTH, 3)  # never upsampled
        np.testing.assert_array_equal(img[0:10, 30:40], 200)  # attention 0: thumbnail as is
        peak = img[0, 0].astype(int)  # viridis' top is yellow: red and green over blue
        assert peak[0] > peak[2] + 40 and peak[1] > peak[2] + 40
        assert (img[5:8, 9:12] > 240).any(axis=0).all()  # the box's top edge, white, y 6
        text = outputs.heatmap_scale_text(path)
        assert ("log scale" in text) == (scale == "absolute")
        assert ("largest cell (0.5 per cell)" in text) == (scale == "relative")
    # Absolute: 0.5/150 is 6 % of the way from uniform to 1 on the log scale (dark);
    # relative: 0.7 % of the peak. Both stay far darker than the peak.
    absolute = np.asarray(Image.open(tmp_path / "absolute.png"))[30, 45].astype(int)
    assert absolute.sum() < peak.sum()


def test_thumbnail_has_the_boxes(tmp_path):
    display = np.full((40, 60, 3), 120, np.uint8)
    outputs.write_thumbnail_jpeg(
        tmp_path / "t.jpg", display, np.array([[100, 200, 100, 200]]), np.array([1.0]), (400, 600)
    )
    img = np.asarray(Image.open(tmp_path / "t.jpg")).astype(int)
    assert img.shape == (40, 60, 3)
    assert img[9, 25:38].mean() > 200  # white line over grey: the top edge (y 10, less 1)
    assert abs(img[30, 5].mean() - 120) < 10  # elsewhere untouched


def test_geojson_is_xy_ordered_and_clipped_to_the_slide(tmp_path):
    boxes = np.array([[10, 20, 32, 64], [-8, 990, 32, 32]])  # (y, x, h, w) level 0
    collection = outputs.patches_feature_collection(
        boxes,
        np.array([0.25, 0.5]),
        (100, 1000, 3),
        "s1",
        "positive",
        {"prob_negative": 0.25, "prob_positive": 0.75},
    )
    outputs.write_geojson(tmp_path / "p.geojson", collection)
    data = json.loads((tmp_path / "p.geojson").read_text())
    check_feature_collection(data)
    check_qupath(data)
    slide, first, second = data["features"]
    assert slide["geometry"]["coordinates"] == [[[0, 0], [1000, 0], [1000, 100], [0, 100], [0, 0]]]
    assert slide["properties"]["objectType"] == "annotation"
    assert slide["properties"]["classification"] == {"name": "positive"}
    assert slide["properties"]["measurements"] == {"prob_negative": 0.25, "prob_positive": 0.75}
    assert slide["properties"]["metadata"] == {"slide": "s1", "label": "positive"}
    assert first["geometry"]["coordinates"] == [[[20, 10], [84, 10], [84, 42], [20, 42], [20, 10]]]
    assert second["geometry"]["coordinates"][0][2] == [1000, 24]  # clipped at x = W, y >= 0
    for patch in (first, second):
        assert patch["properties"]["objectType"] == "detection"
        assert "classification" not in patch["properties"]
    assert first["properties"]["measurements"] == {"attention": 0.25}
    assert first["properties"]["name"] == "patch 0 (attention rank 2)"

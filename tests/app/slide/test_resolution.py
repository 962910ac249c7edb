"""Exact physical resolution: patches at a requested mpp, their level-0 boxes, the mpp
column, and slides without mpp metadata (real TIFFs written by tifffile)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tifffile
import torch

from pipeline.app import files
from pipeline.app.config import InputConfig, ModelConfig
from pipeline.app.errors import UserError
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.prediction.batch import predict
from pipeline.app.results import outputs
from pipeline.app.slide.resolution import ResampledLevel, read_slide_mpp
from pipeline.app.slide.views import open_view
from readers.testing import render_he

SHAPE = (1024, 1536)


def write_two_levels(path, mpp: float | None, factor: int = 4) -> None:
    """Level 0 at ``mpp`` and level 1 ``factor`` times coarser (0.25 / 1.0 mpp by
    default: no level at 0.5), deflate (lossless) tiles; no resolution tags if None."""
    H, W = SHAPE
    with tifffile.TiffWriter(path) as tif:
        for k, d in enumerate((1, factor)):
            tags = {}
            if mpp is not None:
                tags = {"resolution": (1e4 / (mpp * d),) * 2, "resolutionunit": "CENTIMETER"}
            tif.write(
                render_he(0, 0, H // d, W // d, d),
                tile=(128, 128),
                photometric="rgb",
                compression="deflate",
                subfiletype=1 if k else 0,
                metadata=None,
                **tags,
            )


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpp")
    write_two_levels(d / "fine.tif", 0.25)
    write_two_levels(d / "nompp.tif", None)
    return d


def config(**changes) -> ModelConfig:
    base = ModelConfig(
        class_names=("a", "b"),
        patch_size=(32, 32),
        n_patches=5,
        low_res_max_side=128,
        tissue_mask=False,
        patch_mpp=0.5,
    )
    return dataclasses.replace(base, **changes)


def box_mean(region: np.ndarray, k: int) -> np.ndarray:
    """uint8 [n, k*h, k*w, 3] -> float [n, h, w, 3], the mean of each k x k block."""
    n, H, W, C = region.shape
    return region.reshape(n, H // k, k, W // k, k, C).astype(np.float64).mean(axis=(2, 4))


def test_patches_at_half_micron_are_the_level0_region_of_twice_the_size(slides):
    with open_view(slides / "fine.tif", config()) as view:
        source = view.patch_level
        assert isinstance(source, ResampledLevel) and source.level.index == 0
        assert source.scale == 2.0 and source.downsample == 2.0 and view.patch_mpp == 0.5
        assert source.shape == (512, 768, 3)
        offsets = np.array([[0, 0], [100, 37], [480, 736], [-5, 700]])
        patches = source.read_patches(offsets, (32, 32))
        region = view.slide.levels[0].read_patches(offsets * 2, (64, 64))
    assert patches.shape == (4, 32, 32, 3) and patches.dtype == np.uint8
    # Area resampling of an exact factor 2 is the 2 x 2 block mean, up to rounding.
    assert np.abs(patches - box_mean(region, 2)).max() <= 0.5 + 1e-9


def test_levels_within_one_percent_are_read_as_stored(slides):
    with open_view(slides / "fine.tif", config(patch_mpp=1.0 * 1.009)) as view:
        assert view.patch_level is view.slide.levels[1] and view.patch_mpp == 1.0
    with open_view(slides / "fine.tif", config(patch_mpp=1.0 * 1.02)) as view:
        assert isinstance(view.patch_level, ResampledLevel) and view.patch_level.level.index == 1
        assert view.patch_mpp == pytest.approx(1.02)


def test_low_res_mpp_is_exact(slides):
    with open_view(slides / "fine.tif", config(low_res_mpp=2.0)) as view:
        assert view.thumbnail.shape == (128, 192, 3)  # 1024 x 1536 at 0.25 -> 2.0 mpp


def test_predict_boxes_are_the_true_level0_footprint_and_mpp_a_column(slides, tmp_path):
    torch.manual_seed(0)
    model = SlideClassifier(config())
    summary = predict(model, [slides / "fine.tif"], tmp_path, progress=False)
    assert [r.status for r in summary.results] == ["ok"]
    row = files.read_csv(tmp_path / outputs.PREDICTIONS)[0]
    assert float(row["mpp"]) == 0.5
    geojson = json.loads(outputs.geojson_path(tmp_path, "fine").read_text())
    patches = [f for f in geojson["features"] if f["properties"]["objectType"] == "detection"]
    assert len(patches) == 5
    for feature, box in zip(patches, summary.results[0].boxes, strict=True):
        y, x, h, w = box
        assert (h, w) == (64, 64) and y % 2 == 0 and x % 2 == 0
        ring = feature["geometry"]["coordinates"][0]
        xs, ys = {p[0] for p in ring}, {p[1] for p in ring}
        assert max(xs) - min(xs) <= 64 and max(ys) - min(ys) <= 64  # clipped at edges


def test_slide_without_mpp_gets_an_error_row_unless_given(slides, tmp_path):
    model = SlideClassifier(config())
    summary = predict(model, [slides / "nompp.tif", slides / "fine.tif"], tmp_path, progress=False)
    rows = {r["slide"]: r for r in files.read_csv(tmp_path / outputs.PREDICTIONS)}
    assert rows["fine"]["status"] == "ok"
    assert rows["nompp"]["status"] == "error" and rows["nompp"]["mpp"] == ""
    assert rows["nompp"]["error"] == (
        f"UserError: {slides / 'nompp.tif'}: the slide states no microns per pixel, needed "
        "for --patch-mpp 0.5; give it with --slide-mpp CSV (columns slide,mpp) or --assume-mpp X"
    )
    assert len(summary.failed) == 1

    summary = predict(
        model,
        [slides / "nompp.tif"],
        tmp_path / "assumed",
        inputs=InputConfig(assume_mpp=0.25),
        progress=False,
    )
    assert summary.results[0].status == "ok" and summary.results[0].mpp == 0.5
    assert summary.results[0].boxes[0, 2] == 64

    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\nnompp,0.125\n")
    summary = predict(
        model,
        [slides / "nompp.tif"],
        tmp_path / "table",
        inputs=InputConfig(slide_mpp=read_slide_mpp(table)),
        progress=False,
    )
    assert summary.results[0].status == "ok"
    assert summary.results[0].boxes[0, 2] == 128  # 0.5 mpp from 0.125: four times the patch


def test_bad_slide_mpp_csv_names_file_and_line(tmp_path):
    table = tmp_path / "mpp.csv"
    table.write_text("slide,mpp\na.svs,0.25\nb.svs,zero\n")
    with pytest.raises(UserError, match=r"mpp.csv, line 3: mpp 'zero' is not a number > 0"):
        read_slide_mpp(table)
    table.write_text("name,mpp\na.svs,0.25\n")
    columns = r"mpp.csv: expected columns \['slide', 'mpp'\], found \['name', 'mpp'\]"
    with pytest.raises(UserError, match=columns):
        read_slide_mpp(table)

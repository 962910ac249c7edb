"""Stable predictions and quality control: K draws, no-tissue slides, regions of
interest (issue "evaluation protocol", items 4 and 5)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import pipeline
from pipeline.app import files
from pipeline.app.cli import main
from pipeline.app.config import PredictConfig
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.prediction.batch import predict
from pipeline.app.prediction.inference import predict_slide
from pipeline.app.results import outputs
from pipeline.app.slide.inputs import slide_seed
from pipeline.app.slide.views import open_view, sampling_mask
from readers.testing import write_tiff_pyramid


@pytest.fixture(scope="module")
def untrained(small_model_config):
    """Random weights: its class probabilities move with the sampled patches."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        return SlideClassifier(small_model_config).eval()


def test_more_draws_shrink_the_spread_across_seeds(untrained, dataset):
    slide = dataset / "slide_001.tiff"

    def probs(draws):
        return np.array(
            [predict_slide(untrained, slide, seed, draws=draws).probs[1] for seed in range(24)]
        )

    one, eight = probs(1), probs(8)
    # Draws are independent given the view: Var(mean of 8) = Var(one) / 8. With 24
    # seeds each, var(eight) / var(one) >= 1/2 has probability under 0.1 % (F(23, 23)).
    assert one.var() > 0
    assert eight.var() < one.var() / 2


def test_draws_spread_and_repeatability(untrained, dataset):
    slide = dataset / "slide_001.tiff"
    a = predict_slide(untrained, slide, 3, draws=4)
    b = predict_slide(untrained, slide, 3, draws=4)
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.probs_sd, b.probs_sd)
    assert a.status == "ok" and (a.probs_sd > 0).all()
    assert (predict_slide(untrained, slide, 3, draws=1).probs_sd == 0).all()
    assert 0.15 < a.tissue_fraction < 0.6 and a.flags == ()


def _glass(y0, x0, h, w, downsample):
    return np.full((h, w, 3), 242, np.uint8)


def test_a_blank_slide_is_no_tissue_not_an_error(untrained, dataset, tmp_path, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_tiff_pyramid(slides / "blank.tiff", (1024, 1024), _glass)
    (slides / "real.tiff").symlink_to(dataset / "slide_002.tiff")
    summary = predict(
        untrained, [slides], tmp_path / "out", config=PredictConfig(draws=2), progress=False
    )
    rows = {r["slide"]: r for r in files.read_csv(tmp_path / "out" / outputs.PREDICTIONS)}
    blank = rows["blank"]
    assert blank["status"] == "no_tissue" and blank["label"] == ""
    assert blank["prob_positive"] == "" and float(blank["tissue_fraction"]) == 0.0
    assert rows["real"]["status"] == "ok" and rows["real"]["prob_positive_sd"] != ""
    assert summary.failed == []
    # The command's exit status is unaffected, and a rerun counts it as done.
    run = tmp_path / "run"
    from pipeline.app.config import RunConfig
    from pipeline.app.model.checkpoint import save_model

    save_model(run, untrained, RunConfig(untrained.config))
    argv = ["predict", "--model", str(run), "--slides", str(slides), "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    assert "1 without tissue, 0 failed" in capsys.readouterr().out
    assert main(argv) == 0
    assert "2 already done" in capsys.readouterr().out


def test_region_of_interest_restricts_the_patches(untrained, dataset, tmp_path):
    roi = tmp_path / "roi"
    roi.mkdir()
    # The lower-right quarter of the 1024 x 1024 slide, with a hole in its middle.
    outer = [[512, 512], [1024, 512], [1024, 1024], [512, 1024], [512, 512]]
    hole = [[700, 700], [700, 800], [800, 800], [800, 700], [700, 700]]
    feature = {
        "type": "Feature",
        "properties": {"objectType": "annotation"},
        "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
    }
    (roi / "slide_003.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": [feature]})
    )
    inside = predict_slide(untrained, dataset / "slide_003.tiff", 0, draws=1, roi_dir=roi)
    assert inside.status == "ok" and inside.tissue_fraction < 0.25
    centres = inside.boxes[:, :2] + inside.boxes[:, 2:] / 2  # (y, x)
    assert (centres >= 512 - 16).all()  # in the quarter, up to the view's resolution
    in_hole = ((centres > 700 + 16) & (centres < 800 - 16)).all(axis=1)
    assert not in_hole.any()
    # A slide without a file is sampled on all its tissue, and flagged.
    other = predict_slide(untrained, dataset / "slide_004.tiff", 0, draws=1, roi_dir=roi)
    assert other.status == "ok" and other.flags == ("no_roi_file",)
    # A region without tissue is no tissue at all.
    corner = [[0, 0], [40, 0], [40, 40], [0, 40], [0, 0]]
    (roi / "slide_005.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [corner]}))
    empty = predict_slide(untrained, dataset / "slide_005.tiff", 0, roi_dir=roi)
    assert empty.status == "no_tissue"
    (roi / "slide_006.geojson").write_text("{not json")
    bad = predict_slide(untrained, dataset / "slide_006.tiff", 0, roi_dir=roi)
    assert bad.status == "error" and "slide_006.geojson: not a GeoJSON file" in bad.error


def test_one_read_for_all_draws(untrained, dataset, monkeypatch):
    # Injected spy (the real reader underneath): every draw's patches in one call.
    import readers

    calls = []
    real = readers.Level.read_patches

    def spy(self, offsets, size, fill=0):
        calls.append(len(offsets))
        return real(self, offsets, size, fill)

    monkeypatch.setattr(readers.Level, "read_patches", spy)
    predict_slide(untrained, dataset / "slide_001.tiff", 0, draws=5)
    # (The views are read region by region: the single-offset calls.)
    assert [n for n in calls if n > 1] == [5 * untrained.config.n_patches]


class _Counting(torch.nn.Module):
    """The model's own feature network, counting the patches it is given (a spy)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.seen = net, 0

    def forward(self, patches):
        self.seen += len(patches)
        return self.net(patches)


def test_k_draws_compute_each_distinct_position_once(untrained, dataset, tmp_path):
    """8 draws of 48 patches repeat cells: the feature network
    sees each distinct position once, predictions.csv reports that count, and the
    probabilities equal those of the feature network run on every patch of every draw."""
    # 48 patches a draw from a few hundred cells: the 8 draws share many.
    model = SlideClassifier(dataclasses.replace(untrained.config, n_patches=48)).eval()
    model.load_state_dict(untrained.state_dict())
    spy = _Counting(model.sampler.feature)
    model.sampler.feature = spy
    slide = dataset / "slide_001.tiff"
    summary = predict(model, [slide], tmp_path / "out", PredictConfig(draws=8), progress=False)
    (row,) = files.read_csv(tmp_path / "out" / outputs.PREDICTIONS)
    assert int(row["distinct_patches"]) == spy.seen < 8 * model.config.n_patches
    (result,) = summary.results

    # Today's computation, by hand: the same draws, every patch through the network.
    with open_view(slide, model.config) as view, torch.no_grad():
        x_low = view.x_low().expand(8, -1, -1, -1)
        mask = sampling_mask(view.tissue)
        mask = None if mask is None else mask.expand(8, -1, -1)
        generator = torch.Generator().manual_seed(slide_seed(0, slide))
        draw = model.sampler.draw(x_low, view.patch_level, mask, generator)
        every = spy.net(draw.patches.flatten(0, 1)).reshape(8, model.config.n_patches, -1)
        features = pipeline.expectation(
            every, draw.sampled_attention, model.sampler.replace, model.sampler.estimator
        )
        probs = model.task.scores(model.head(features)).mean(0).numpy()
    np.testing.assert_allclose(result.probs, probs, rtol=1e-5, atol=1e-6)

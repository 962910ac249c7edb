"""Preparing a slide for the classifier: level choice, attention view, x_low."""

import dataclasses

import numpy as np
import pytest
import torch

import readers
from pipeline.app.slide.views import MAX_VIEW_PIXELS, open_view, sampling_mask


def test_default_view_is_the_thumbnail(dataset, small_model_config):
    path = dataset / "slide_001.tiff"
    with open_view(path, small_model_config) as view, readers.open_slide(path) as slide:
        np.testing.assert_array_equal(view.thumbnail, slide.thumbnail((128, 128)))
        assert view.tissue.shape == (128, 128) and 0.15 < view.tissue.mean() < 0.6
        assert view.patch_level.index == 0 and view.level0_scale == 1.0
        x = view.x_low()
        assert x.shape == (1, 3, 128, 128) and x.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 1
        assert torch.equal(sampling_mask(view.tissue)[0], torch.from_numpy(view.tissue))


def test_levels_by_index_and_by_mpp(dataset, small_model_config):
    # The slides have levels of 0.5, 1 and 2 microns per pixel.
    config = dataclasses.replace(small_model_config, low_res_level=2, patch_mpp=1.0)
    with open_view(dataset / "slide_001.tiff", config) as view:
        assert view.thumbnail.shape == (256, 256, 3)  # all of level 2
        np.testing.assert_array_equal(
            view.thumbnail, view.slide.levels[2].read_patches([[0, 0]], (256, 256))[0]
        )
        assert view.patch_level.index == 1 and view.level0_scale == 2.0
    config = dataclasses.replace(small_model_config, low_res_mpp=1.5, tissue_mask=False)
    with open_view(dataset / "slide_001.tiff", config) as view:
        assert view.thumbnail.shape == (341, 341, 3)  # exactly 1.5 mpp: 1024 * 0.5 / 1.5
        assert view.tissue.all() and sampling_mask(view.tissue) is None  # sample anywhere


def test_bad_level_choices_name_the_file(dataset, small_model_config, monkeypatch):
    path = dataset / "slide_001.tiff"
    config = dataclasses.replace(small_model_config, patch_level=5)
    with pytest.raises(ValueError, match=r"slide_001.tiff: patch level 5 requested, .* 0..2"):
        open_view(path, config)
    monkeypatch.setattr("pipeline.app.slide.views.MAX_VIEW_PIXELS", 1000 * 1000)
    with pytest.raises(ValueError, match=r"slide_001.tiff: the attention view level 0 is 1024 x"):
        open_view(path, dataclasses.replace(small_model_config, low_res_level=0))
    assert MAX_VIEW_PIXELS >= 4096 * 4096


def test_unreadable_files(tmp_path, small_model_config):
    with pytest.raises(FileNotFoundError):
        open_view(tmp_path / "missing.svs", small_model_config)
    (tmp_path / "text.svs").write_text("hello")
    with pytest.raises(readers.SlideError, match="text.svs"):
        open_view(tmp_path / "text.svs", small_model_config)

"""Cold-start remedies on slides: priors, exploration in training, none at prediction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import readers
from pipeline.app.config import TrainConfig
from pipeline.app.errors import ConfigError
from pipeline.app.priors import hematoxylin_prior, slide_prior, tissue_prior
from pipeline.app.slides import open_view
from pipeline.app.training import train


def test_priors_of_a_real_view(dataset, small_model_config):
    with open_view(dataset / "slide_001.tiff", small_model_config) as view:
        thumbnail, tissue = view.thumbnail, view.tissue
    np.testing.assert_array_equal(tissue_prior(thumbnail, tissue), tissue.astype(np.float32))
    h = hematoxylin_prior(thumbnail, tissue)
    assert h.dtype == np.float32 and h.shape == tissue.shape
    assert (h[~tissue] == 0).all() and (h >= 0).all() and h[tissue].max() > 0
    # Dark purple cells carry more hematoxylin than the pink tissue around them.
    dark = tissue & (thumbnail.astype(int).sum(2) < np.percentile(thumbnail.sum(2), 5))
    assert h[dark].mean() > 1.5 * h[tissue & ~dark].mean()
    assert slide_prior("none", thumbnail, tissue) is None
    blank = np.zeros_like(tissue)
    assert (slide_prior("hematoxylin", thumbnail, blank) == 1).all()  # never all zero
    with pytest.raises(ConfigError, match="unknown 'stain'"):
        slide_prior("stain", thumbnail, tissue)


def test_bad_remedy_options():
    with pytest.raises(ConfigError, match="needs a prior"):
        TrainConfig(prior_weight=0.5)
    with pytest.raises(ConfigError, match="prior_weight"):
        TrainConfig(prior="tissue", prior_weight=1.0)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_exploration_changes_training_but_zero_is_exactly_plain(
    dataset, small_model_config, quick_train_config, tmp_path
):
    config = dataclasses.replace(quick_train_config, epochs=1)
    runs = {
        name: train(dataset, dataset / "labels.csv", tmp_path / name, small_model_config,
                    dataclasses.replace(config, **options), device="cpu", progress=False,
                    log=lambda _: None)  # fmt: skip
        for name, options in {
            "plain": {},
            "zero": {"exploration": 0.0, "prior": "hematoxylin", "prior_weight": 0.0},
            "explore": {"exploration": 0.5, "prior": "hematoxylin", "prior_weight": 0.3,
                        "remedy_epochs": 2.0},
        }.items()
    }  # fmt: skip
    plain, zero, explore = (_weights(runs[n].model) for n in ("plain", "zero", "explore"))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert any(not torch.equal(plain[k], explore[k]) for k in plain)
    # The trained model predicts from its attention alone: eval mode never explores.
    model = runs["explore"].model.eval()
    with readers.open_slide(dataset / "slide_001.tiff") as slide:
        x_low = torch.rand(1, 3, 128, 128)
        out = model.classify(x_low, slide.levels[0], prior=torch.ones(1, 128, 128), step=0)
    assert out.draw.sampled_proposal is None

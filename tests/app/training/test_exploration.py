"""Cold-start remedies on slides: priors, exploration in training, none at prediction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import pipeline
import readers
from pipeline.app.config import TrainConfig
from pipeline.app.errors import ConfigError
from pipeline.app.slide.priors import hematoxylin_prior, slide_prior, tissue_prior
from pipeline.app.slide.views import open_view
from pipeline.app.training.loop import train


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
        name: train(
            dataset,
            dataset / "labels.csv",
            tmp_path / name,
            small_model_config,
            dataclasses.replace(config, **options),
            device="cpu",
            progress=False,
            log=lambda _: None,
        )
        for name, options in {
            "plain": {},
            "zero": {"exploration": 0.0, "prior": "hematoxylin", "prior_weight": 0.0},
            "explore": {
                "exploration": 0.5,
                "prior": "hematoxylin",
                "prior_weight": 0.3,
                "remedy_epochs": 2.0,
            },
        }.items()
    }
    plain, zero, explore = (_weights(runs[n].model) for n in ("plain", "zero", "explore"))
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    assert any(not torch.equal(plain[k], explore[k]) for k in plain)
    # The trained model predicts from its attention alone: eval mode never explores.
    model = runs["explore"].model.eval()
    with readers.open_slide(dataset / "slide_001.tiff") as slide:
        x_low = torch.rand(1, 3, 128, 128)
        out = model.classify(x_low, slide.levels[0], prior=torch.ones(1, 128, 128), step=0)
    assert out.draw.sampled_proposal is None


def test_early_patches_draw_more_patches_in_the_remedy_epochs_only(
    dataset, small_model_config, quick_train_config, tmp_path, monkeypatch
):
    from pipeline.app.training import streaming

    counts = []  # patches per slide of each training step, in order
    train_step = streaming._train_step

    def counting(model, optimizer, planned, *args):
        # A spy, not a fake: records the batch's patch count and runs the real step.
        counts.append(planned.patches.shape[1])
        return train_step(model, optimizer, planned, *args)

    monkeypatch.setattr(streaming, "_train_step", counting)
    config = dataclasses.replace(quick_train_config, epochs=2, remedy_epochs=1.0, early_patches=15)
    early = train(
        dataset,
        dataset / "labels.csv",
        tmp_path / "early",
        small_model_config,
        config,
        device="cpu",
        progress=False,
        log=lambda _: None,
    )
    per_epoch = len(counts) // 2
    assert per_epoch > 0
    assert counts == [15] * per_epoch + [small_model_config.n_patches] * per_epoch
    # As many early patches as the model's: exactly the plain run.
    same = dataclasses.replace(config, early_patches=small_model_config.n_patches)
    plain = dataclasses.replace(config, early_patches=0, remedy_epochs=0.0)
    a, b = (
        _weights(
            train(
                dataset,
                dataset / "labels.csv",
                tmp_path / name,
                small_model_config,
                c,
                device="cpu",
                progress=False,
                log=lambda _: None,
            ).model
        )
        for name, c in (("same", same), ("plain", plain))
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in _weights(early.model).items())


def test_early_patches_need_remedy_epochs():
    with pytest.raises(ConfigError, match="early_patches needs remedy_epochs"):
        TrainConfig(early_patches=24)
    with pytest.raises(ConfigError, match="early_patches"):
        TrainConfig(early_patches=-1, remedy_epochs=1.0)


def test_fitting_the_attention_to_the_prior_moves_it_towards_the_prior(
    dataset, small_model_config, quick_train_config
):
    from pipeline.app.slide.labels import read_labels
    from pipeline.app.tasks import task_of
    from pipeline.app.training.cold_start import fit_attention_to_prior
    from pipeline.app.training.data import load_slides
    from pipeline.app.training.loop import new_model
    from pipeline.app.training.streaming import stack_priors, stack_views

    rows = read_labels(dataset / "labels.csv", dataset).rows
    task = task_of(small_model_config)
    slides, _ = load_slides(rows, small_model_config, task, warn=print, progress=False)
    config = dataclasses.replace(quick_train_config, prior="hematoxylin", prior_init_steps=60)
    model = new_model(small_model_config, 0, torch.device("cpu"))
    views = [s.view for s in slides[:4]]
    x_low, mask, shape = stack_views(views, torch.device("cpu"))
    prior = stack_priors(views, "hematoxylin", shape, torch.device("cpu"))

    def mass_on_top_decile() -> float:
        """Attention mass (on tissue) on the cells of the prior's top 10 % (on tissue)."""
        with torch.no_grad():
            attention = model.attention_net(x_low).squeeze(1)
        grid = attention.shape[1:]
        on_tissue = pipeline.mask_on_grid(mask, grid)
        attention = pipeline.mask_attention(attention, on_tissue)
        target = pipeline.prior_on_grid(prior, grid)
        masses = []
        for a, t, m in zip(attention, target, on_tissue, strict=True):
            top = t >= torch.quantile(t[m], 0.9)
            masses.append(float(a[top & m].sum()))
        return float(np.mean(masses))

    features = {k: v.clone() for k, v in model.feature_net.state_dict().items()}
    before = mass_on_top_decile()
    fit_attention_to_prior(model, slides, config, torch.device("cpu"))
    after = mass_on_top_decile()
    assert after > max(1.5 * before, 0.2), (before, after)
    # Only the attention net was trained.
    assert all(torch.equal(v, model.feature_net.state_dict()[k]) for k, v in features.items())


def test_prior_init_needs_a_prior():
    with pytest.raises(ConfigError, match="prior_init_steps > 0 needs a prior"):
        TrainConfig(prior_init_steps=10)

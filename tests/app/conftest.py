"""Fixtures of the slide application's tests: a tiny synthetic labelled dataset
written once per session by ``synth.write_dataset`` (real JPEG TIFF pyramids read
through ``readers``), and a small model configuration that trains in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.app.config import ModelConfig, TrainConfig
from pipeline.app.synth import CLASS_NAMES, write_dataset

SLIDE_SIDE = 1024
N_SLIDES = 8


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """Directory with ``N_SLIDES`` slides of ``SLIDE_SIDE`` px and ``labels.csv``
    (classes alternate: even index negative, odd positive)."""
    out = tmp_path_factory.mktemp("app-dataset")
    write_dataset(out, n=N_SLIDES, size=SLIDE_SIDE, seed=3)
    return out


@pytest.fixture(scope="session")
def n_slides() -> int:
    return N_SLIDES


@pytest.fixture(scope="session")
def slide_side() -> int:
    return SLIDE_SIDE


@pytest.fixture(scope="session")
def small_model_config() -> ModelConfig:
    return ModelConfig(
        class_names=CLASS_NAMES, width=8, n_patches=6, patch_size=(32, 32), low_res_max_side=128
    )


@pytest.fixture(scope="session")
def quick_train_config() -> TrainConfig:
    return TrainConfig(epochs=2, batch_size=2, val_fraction=0.25, seed=0)


@pytest.fixture(scope="session")
def run_dir(dataset, tmp_path_factory, small_model_config) -> Path:
    """A run directory trained for one epoch on ``dataset`` (predictions need a model,
    not a good one)."""
    from pipeline.app.training.loop import train

    out = tmp_path_factory.mktemp("quick-run")
    config = TrainConfig(epochs=1, batch_size=4, val_fraction=0.0, seed=0)
    train(
        dataset,
        dataset / "labels.csv",
        out,
        small_model_config,
        config,
        device="cpu",
        progress=False,
        log=lambda _: None,
    )
    return out


@pytest.fixture(autouse=True)
def _view_cache_in_tmp(tmp_path_factory, monkeypatch):
    """``ats-wsi train`` caches views in ``$ATS_WSI_CACHE``: never the user's home in tests."""
    monkeypatch.setenv("ATS_WSI_CACHE", str(tmp_path_factory.getbasetemp() / "view-cache"))

"""Run configuration: JSON round trip and validation messages."""

import pytest

from pipeline.app.config import ModelConfig, RunConfig, TrainConfig


def test_json_round_trip_is_exact():
    config = RunConfig(
        ModelConfig(class_names=("a", "b", "c"), patch_size=(24, 40), patch_mpp=0.5),
        TrainConfig(epochs=3, lr=1e-3, seed=7),
    )
    again = RunConfig.from_json(config.to_json())
    assert again == config
    assert again.model.patch_size == (24, 40)


def test_a_version_2_run_loads_as_classification():
    text = '{"format": "ats-wsi-run", "version": 2, "model": {"class_names": ["a", "b"]}}'
    config = RunConfig.from_json(text)
    assert config.model.task == "classification" and config.model.class_names == ("a", "b")
    assert '"version": 3' in config.to_json() and '"task": "classification"' in config.to_json()


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not valid JSON"),
        ('{"format": "other"}', "not an ats-wsi run config"),
        ('{"format": "ats-wsi-run", "version": 99}', "version 99"),
        (
            '{"format": "ats-wsi-run", "version": 2, "model": {"class_names": ["a", "b"], '
            '"colour": 1}}',
            "unknown ModelConfig fields ['colour']",
        ),
    ],
)
def test_bad_config_names_the_file(text, message):
    with pytest.raises(ValueError, match="run/config.json") as info:
        RunConfig.from_json(text, source="run/config.json")
    assert message in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"class_names": ("a", "b"), "n_patches": 0}, "n_patches: expected > 0, got 0"),
        ({"class_names": ("a", "b"), "patch_size": (0, 4)}, "patch_size"),
        ({"class_names": ("a", "b"), "estimator": "reference"}, "estimator: expected"),
        ({"class_names": ("a", "b"), "estimator": "linear", "replace": True}, "without repl"),
    ],
)
def test_model_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_train_config_validation():
    with pytest.raises(ValueError, match=r"val_fraction: expected in \[0, 1\), got 1.0"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match=r"select_metric: expected one of \['roc_auc', "):
        TrainConfig(select_metric="auc")
    with pytest.raises(ValueError, match=r"balance: expected one of .*got 'yes'"):
        TrainConfig(balance="yes")
    with pytest.raises(ValueError, match="patience: expected >= 0, got -1"):
        TrainConfig(patience=-1)

"""Encoders by name with weights from local files: a user factory (``module:callable``,
this module's ``tiny_encoder``) everywhere, and a small timm model where timm is
installed (the ``timm`` extra; CI installs it)."""

from __future__ import annotations

import dataclasses
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from pipeline.app.cli import main
from pipeline.app.config import ModelConfig, RunConfig, TrainConfig
from pipeline.app.errors import ConfigError, UserError
from pipeline.app.model import encoders
from pipeline.app.model.checkpoint import CONFIG_FILE, MODEL_FILE, load_model
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.prediction.batch import predict
from pipeline.app.training.loop import make_optimizer, new_model, train
from tests.app.commands import train_argv

FACTORY = "tests.app.model.test_encoders:tiny_encoder"


def tiny_encoder() -> tuple[nn.Module, int]:
    """A user factory: conv, batch norm, pooled to 6 features."""
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
    )
    return net, 6


def pretrained_state(seed: int = 5) -> dict[str, torch.Tensor]:
    """``tiny_encoder`` weights that differ from any fresh initialisation (BN stats too)."""
    torch.manual_seed(seed)
    net, _ = tiny_encoder()
    state = net.state_dict()
    state["1.running_mean"].uniform_(-0.5, 0.5)
    state["1.running_var"].uniform_(0.5, 2.0)
    return {k: v.contiguous() for k, v in state.items()}


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "encoder.safetensors"
    save_file(pretrained_state(), str(path))
    return path


def factory_config(small_model_config, **changes) -> ModelConfig:
    return dataclasses.replace(
        small_model_config,
        feature_net=FACTORY,
        feature_mean=(0.6, 0.4, 0.7),
        feature_std=(0.2, 0.25, 0.15),
        feature_input_size=(24, 24),
        **changes,
    )


def assert_state_equal(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    actual = module.state_dict()
    assert sorted(actual) == sorted(state)
    for key, value in state.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0)


def test_factory_weights_from_safetensors_and_pth(small_model_config, weights, tmp_path):
    pth = tmp_path / "encoder.pth"
    torch.save({"state_dict": pretrained_state()}, pth)  # a training checkpoint's nesting
    for path in (weights, pth):
        config = encoders.resolve(factory_config(small_model_config, feature_weights=str(path)))
        assert config.feature_weights_sha256 == encoders.sha256(path)
        model = new_model(config, seed=0, device=torch.device("cpu"))
        assert_state_equal(model.feature_net.net, pretrained_state())


def test_normalisation_and_resize_happen_inside_the_model(small_model_config):
    model = SlideClassifier(factory_config(small_model_config)).eval()
    patches = torch.rand(4, 3, 32, 32)  # [0, 1] RGB at the patch size
    expected_input = F.interpolate(patches, size=(24, 24), mode="bilinear", antialias=True)
    mean = torch.tensor([0.6, 0.4, 0.7]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.15]).view(1, 3, 1, 1)
    expected = model.feature_net.net((expected_input - mean) / std).flatten(1)
    torch.testing.assert_close(model.feature_net(patches), expected)
    assert model.head.in_features == 6


def test_key_mismatch_is_one_line_naming_the_keys(small_model_config, tmp_path, capsys):
    state = pretrained_state()
    state["extra.weight"] = state.pop("0.weight")
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    model = SlideClassifier(factory_config(small_model_config))
    with pytest.raises(ConfigError) as caught:
        encoders.load_weights(model.feature_net, bad)
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"{bad}: weights do not fit the encoder: missing keys [0.weight], "
        "unexpected keys [extra.weight]"
    )
    state = pretrained_state()
    state["0.weight"] = torch.zeros(6, 3, 5, 5)
    save_file(state, str(bad))
    with pytest.raises(ConfigError, match=r"1 tensors of another shape, e.g. 0.weight"):
        encoders.load_weights(model.feature_net, bad)


def test_cli_reports_a_bad_weights_file_in_one_line(dataset, tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    options = ["--feature-net", FACTORY, "--feature-weights", str(bad)]
    code = main(train_argv(dataset, dataset / "labels.csv", tmp_path / "run", *options))
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert code == 2
    assert last == (
        f"ats-wsi: error: {bad}: not a readable weights file (UnpicklingError: not a "
        "tensors-only checkpoint: Unsupported operand 110)"
    )


def test_frozen_encoder_is_unchanged_while_attention_trains(
    dataset, small_model_config, weights, tmp_path
):
    config = factory_config(small_model_config, feature_weights=str(weights), freeze_features=True)
    initial = new_model(encoders.resolve(config), seed=0, device=torch.device("cpu"))
    result = train(
        dataset,
        dataset / "labels.csv",
        tmp_path / "run",
        config,
        TrainConfig(epochs=1, batch_size=2, seed=0),
        device="cpu",
        progress=False,
        log=lambda _: None,
    )
    model = result.model
    # Parameters and batch-norm statistics: exactly the file's (BN was in eval mode).
    assert_state_equal(model.feature_net.net, pretrained_state())
    assert not any(p.requires_grad for p in model.feature_net.parameters())
    changed = [
        not torch.equal(a, b)
        for a, b in zip(
            model.attention_net.parameters(), initial.attention_net.parameters(), strict=True
        )
    ]
    assert all(changed)

    run = result.run_dir
    with safe_open(str(run / MODEL_FILE), "pt") as f:  # the frozen encoder is not copied
        assert not any(k.startswith("sampler.feature.") for k in f.keys())
    saved = RunConfig.from_json((run / CONFIG_FILE).read_text()).model
    assert saved.feature_net == FACTORY and saved.feature_weights == str(weights.absolute())
    assert saved.feature_weights_sha256 == encoders.sha256(weights)
    assert saved.feature_mean == (0.6, 0.4, 0.7) and saved.feature_input_size == (24, 24)
    with pytest.raises(ConfigError, match="would import and call code .* --trust-feature-net"):
        load_model(run)  # a model directory's factory is not built unless trusted
    loaded, _ = load_model(run, trust_feature_net=FACTORY)
    assert_state_equal(loaded.feature_net.net, pretrained_state())

    moved = tmp_path / "moved.safetensors"
    shutil.copy(weights, moved)
    summary = predict(
        run,
        [dataset / "slide_000.tiff"],
        tmp_path / "out",
        feature_weights=moved,
        trust_feature_net=FACTORY,
        progress=False,
    )
    assert summary.results[0].status == "ok"
    save_file(pretrained_state(seed=6), str(weights))  # other weights under the same name
    with pytest.raises(ConfigError, match=r"encoder weights differ from the run's \(SHA-256"):
        load_model(run, trust_feature_net=FACTORY)
    with pytest.raises(ConfigError, match="encoder weights differ"):
        predict(
            run,
            [dataset / "slide_000.tiff"],
            tmp_path / "out2",
            trust_feature_net=FACTORY,
            progress=False,
        )


def test_fine_tuning_uses_its_own_learning_rate(small_model_config):
    model = SlideClassifier(factory_config(small_model_config))
    optimizer = make_optimizer(model, TrainConfig(lr=1e-3, feature_lr=1e-5))
    lrs = [group["lr"] for group in optimizer.param_groups]
    assert lrs == [1e-3, 1e-5]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    frozen = SlideClassifier(factory_config(small_model_config, freeze_features=True))
    assert len(make_optimizer(frozen, TrainConfig()).param_groups) == 1


def test_timm_missing_names_the_extra(small_model_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # injected: timm not installed
    with pytest.raises(UserError, match=r"pip install 'ats-wsi\[timm\]'"):
        SlideClassifier(dataclasses.replace(small_model_config, feature_net="timm:resnet18"))


def test_timm_encoder_by_name_and_local_weights(small_model_config, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    # A full model, classifier included, as a hub checkpoint would hold it.
    source = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    path = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    config = encoders.resolve(
        dataclasses.replace(
            small_model_config,
            feature_net="timm:test_resnet",
            feature_weights=str(path),
            feature_input_size=(64, 64),
        )
    )
    pretrained = timm.get_pretrained_cfg("test_resnet")
    assert config.feature_mean == tuple(pretrained.mean) and config.feature_input_size == (64, 64)
    assert config.feature_std == tuple(pretrained.std)
    model = new_model(config, seed=0, device=torch.device("cpu")).eval()
    source.reset_classifier(0)
    assert_state_equal(model.feature_net.net, source.state_dict())
    patches = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(pretrained.mean).view(1, 3, 1, 1)
    std = torch.tensor(pretrained.std).view(1, 3, 1, 1)
    resized = F.interpolate(patches, size=(64, 64), mode="bilinear", antialias=True)
    with torch.no_grad():
        features = model.feature_net(patches)
        torch.testing.assert_close(features, source.eval()((resized - mean) / std))
    assert features.shape == (3, source.num_features)

    other = timm.create_model("test_vit", pretrained=False, num_classes=0)
    wrong = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(wrong))
    with pytest.raises(ConfigError, match=r"weights do not fit the encoder: missing keys \["):
        encoders.load_weights(model.feature_net, wrong)

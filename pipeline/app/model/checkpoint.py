"""Model and optimizer files of a run directory: safetensors plus JSON, no pickle.

::

    RUN_DIR/config.json            RunConfig (model + training configuration)
    RUN_DIR/model.safetensors      weights (of a trained run: the best epoch's)
    RUN_DIR/model_last.safetensors the last epoch's weights, which training resumes from
    RUN_DIR/optimizer.safetensors  optimizer tensors (for resuming training)
    RUN_DIR/optimizer.json         optimizer hyper-parameters and scalars

A model is serialised one way, ``to_bytes`` / ``from_bytes`` (config JSON text and
safetensors bytes); the files above and the payload sent to Dask workers are those
bytes. Each file is replaced atomically, so an interrupted save leaves the previous one.

A frozen encoder with pretrained weights (``ModelConfig.freeze_features`` and
``feature_weights``) is not copied into the weights: a foundation model's gigabyte
would otherwise be in every run directory and every payload. It is read from its
file when the model is rebuilt, and refused unless the file's SHA-256 is the one
``config.json`` records.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from pipeline.app.config import ModelConfig, RunConfig
from pipeline.app.errors import ConfigError
from pipeline.app.files import atomic_write_bytes
from pipeline.app.model import encoders
from pipeline.app.model.networks import SlideClassifier

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
LAST_MODEL_FILE = "model_last.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"


def to_bytes(model: SlideClassifier, config: RunConfig | None = None) -> tuple[str, bytes]:
    """``(config JSON, safetensors weights)`` of ``model``; ``config`` defaults to a
    ``RunConfig`` holding only the model's own ``ModelConfig``."""
    config = config or RunConfig(model=model.config)
    if config.model != model.config:
        raise ValueError("config.model differs from the model's own config")
    skipped = _external_prefix(config.model)
    # contiguous CPU copies: safetensors stores neither views nor device tensors.
    state = {
        k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if skipped is None or not k.startswith(skipped)
    }
    return config.to_json(), save(state)


FEATURE_PREFIX = "sampler.feature."
"""State-dict prefix of the feature network in a ``SlideClassifier``."""


def _external_prefix(config: ModelConfig) -> str | None:
    """The state-dict prefix read from the encoder's own weights file rather than
    from the run's weights (a frozen pretrained encoder), else None."""
    return FEATURE_PREFIX if config.freeze_features and config.feature_weights else None


def from_bytes(
    config_json: str, weights: bytes, source: str, device: torch.device | str | None = None
) -> tuple[SlideClassifier, RunConfig]:
    """The classifier (eval mode, on ``device``, default CPU) and run config that
    ``to_bytes`` gave; ``source`` names where the bytes came from in errors."""
    return _build(RunConfig.from_json(config_json, source=source), weights, source, device)


def _build(
    config: RunConfig, weights: bytes, source: str, device: torch.device | str | None
) -> tuple[SlideClassifier, RunConfig]:
    model = SlideClassifier(config.model)
    external = _external_prefix(config.model)
    if external is not None:
        encoders.checked_sha256(config.model.feature_weights, config.model.feature_weights_sha256)
        encoders.load_weights(model.feature_net, config.model.feature_weights)
    try:
        state = load(weights)
        if external is not None:
            state.update({k: v for k, v in model.state_dict().items() if k.startswith(external)})
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise ConfigError(f"{source}: weights do not match {CONFIG_FILE} ({e})") from None
    return model.to(device or "cpu").eval(), config


def save_model(
    run_dir: str | os.PathLike,
    model: SlideClassifier,
    config: RunConfig,
    weights_file: str = MODEL_FILE,
) -> None:
    """Write the weights (into ``weights_file``), then the config, of ``model`` into
    ``run_dir``."""
    config_json, weights = to_bytes(model, config)
    run_dir = Path(run_dir)
    atomic_write_bytes(run_dir / weights_file, weights)
    atomic_write_bytes(run_dir / CONFIG_FILE, config_json.encode())


def read_config(run_dir: str | os.PathLike) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    return RunConfig.from_json(_read(path, "model config").decode(), source=str(path))


def load_model(
    run_dir: str | os.PathLike,
    device: torch.device | str | None = None,
    *,
    weights_file: str = MODEL_FILE,
    feature_weights: str | os.PathLike | None = None,
    trust_feature_net: str | None = None,
) -> tuple[SlideClassifier, RunConfig]:
    """Rebuild the classifier of ``run_dir`` from its JSON config and safetensors
    weights (``weights_file``), on ``device`` (default CPU), in eval mode.

    ``feature_weights`` names where the encoder's weights file is now, instead of
    the path in ``config.json`` (it moved); it must hash as ``config.json`` records.
    A ``module:callable`` encoder in ``config.json`` is built only when
    ``trust_feature_net`` names the same factory (``encoders.check_trusted``):
    nothing a model directory names is imported or called otherwise.
    """
    path = Path(run_dir) / weights_file
    config = read_config(run_dir)
    encoders.check_trusted(
        config.model.feature_net, trust_feature_net, str(Path(run_dir) / CONFIG_FILE)
    )
    if feature_weights is not None:
        if config.model.feature_weights_sha256 is None:
            raise ConfigError(f"{run_dir}: the run's encoder was not made from a weights file")
        moved = str(Path(feature_weights).absolute())
        encoders.checked_sha256(moved, config.model.feature_weights_sha256)
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, feature_weights=moved)
        )
    return _build(config, _read(path, "model weights"), str(path), device)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no {what} (is {path.parent} a run directory?)") from None


def save_optimizer(run_dir: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Split ``optimizer.state_dict()`` into tensors (safetensors) and the rest (JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    run_dir = Path(run_dir)
    # Bytes, not safetensors' save_file: that creates its file with mode 0600
    # whatever the umask, and a colleague could not load the run.
    atomic_write_bytes(run_dir / OPTIMIZER_FILE, save(tensors))
    body = {"param_groups": state["param_groups"], "scalars": scalars}
    atomic_write_bytes(run_dir / OPTIMIZER_JSON, json.dumps(body).encode())


def load_optimizer(run_dir: str | os.PathLike, optimizer: torch.optim.Optimizer) -> None:
    """Restore what ``save_optimizer`` wrote into ``optimizer`` (same parameters)."""
    run_dir = Path(run_dir)
    body = json.loads((run_dir / OPTIMIZER_JSON).read_text())
    state: dict[int, dict] = {}
    flat = {**load_file(str(run_dir / OPTIMIZER_FILE)), **body["scalars"]}
    for name, value in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": body["param_groups"]})

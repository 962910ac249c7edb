"""Model and optimizer files of a run directory: safetensors plus JSON, no pickle.

::

    RUN_DIR/config.json            RunConfig (model + training configuration)
    RUN_DIR/model.safetensors      weights
    RUN_DIR/optimizer.safetensors  optimizer tensors (for resuming training)
    RUN_DIR/optimizer.json         optimizer hyper-parameters and scalars

Each file is replaced atomically, so an interrupted save leaves the previous one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as _load_weights
from safetensors.torch import save_model as _save_weights

from pipeline.app.config import RunConfig
from pipeline.app.models import SlideClassifier
from pipeline.app.outputs import atomic_target, atomic_write_bytes

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"


def save_model(run_dir: str | os.PathLike, model: SlideClassifier, config: RunConfig) -> None:
    """Write the weights, then the config, of ``model`` into ``run_dir``."""
    run_dir = Path(run_dir)
    with atomic_target(run_dir / MODEL_FILE) as tmp:
        # save_model (not save_file) drops the aliases the model holds to its own
        # sub-networks, which safetensors refuses to store twice.
        _save_weights(model, str(tmp))
    atomic_write_bytes(run_dir / CONFIG_FILE, config.to_json().encode())


def read_config(run_dir: str | os.PathLike) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no model config (is {run_dir} a run directory?)"
        ) from None
    return RunConfig.from_json(text, source=str(path))


def load_model(
    run_dir: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[SlideClassifier, RunConfig]:
    """Rebuild the classifier of ``run_dir`` from its JSON config and safetensors
    weights, on ``device`` (default CPU), in eval mode."""
    config = read_config(run_dir)
    model = SlideClassifier(config.model)
    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model weights")
    try:
        _load_weights(model, str(path), strict=True)
    except (SafetensorError, RuntimeError) as e:
        raise ValueError(f"{path}: weights do not match {CONFIG_FILE} ({e})") from None
    return model.to(device or "cpu").eval(), config


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
    with atomic_target(run_dir / OPTIMIZER_FILE) as tmp:
        save_file(tensors, str(tmp))
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

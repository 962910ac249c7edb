"""Where computation runs: the torch device, chosen once per call."""

from __future__ import annotations

import torch

from pipeline.app.errors import UserError


def default_device() -> torch.device:
    """CUDA when this torch build and machine have it, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: ``default_device()``); an unknown
    name or a device this torch build cannot use is a ``UserError``."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {str(device)!r} asked for, but this torch has no usable CUDA")
    return device

"""Device choice."""

from __future__ import annotations

import pytest
import torch

from pipeline.app.errors import UserError
from pipeline.app.runtime import resolve_device


def test_resolve_device():
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("tpu:banana")

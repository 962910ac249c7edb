"""Shared set-up of the scripts' smoke tests: scripts/ importable, torch threads restored."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
# scripts/ is not installed: its modules are imported from the repository root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Benchmarks pin torch to one thread for their timings; the tests after them run
    with the thread count they had."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

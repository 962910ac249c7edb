"""What the import-linter contracts in pyproject.toml cannot see.

The layers themselves are checked by ``lint-imports`` (part of the test command).
Here: the contract's list of core modules is complete, and ``import readers`` stays
light at run time (OpenSlide is loaded on first use, not on import).
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_core_contract_lists_every_core_module():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    core = next(c for c in contracts["contracts"] if "pipeline.app" in c["forbidden_modules"])
    modules = {f"pipeline.{p.stem}" for p in (ROOT / "pipeline").glob("*.py")}
    assert set(core["source_modules"]) == modules - {"pipeline.__init__"}


@pytest.mark.parametrize("heavy", ["openslide", "torch", "pipeline"])
def test_readers_import_is_light(heavy):
    code = "import readers, sys; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert heavy not in out.stdout.split()

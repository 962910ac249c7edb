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
    assert heavy not in _modules_after("import readers")


def test_readers_import_leaves_out_the_synthetic_writers():
    # readers.testing is for tests, demos and benchmarks, not the reader API.
    assert "readers.testing" not in _modules_after("import readers")


def test_pipeline_and_the_cli_import_without_torch():
    assert "torch" not in _modules_after("import pipeline, pipeline.app, pipeline.app.cli")


def test_lazy_pipeline_names_are_the_public_functions():
    code = (
        "import pipeline.layers, pipeline\n"  # pipeline.expectation (the module) imported first
        "assert callable(pipeline.expectation) and pipeline.expectation.__module__ == "
        "'pipeline.expectation', pipeline.expectation\n"
        "import torch\n"
        "samples, _ = pipeline.sample(2, torch.tensor([[0.5, 0.5, 0.0]]))\n"
        "assert sorted(samples[0, :, 0].tolist()) == [0, 1]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(out.split())

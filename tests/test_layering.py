"""The package layering of STYLE.md section 11, checked in fresh interpreters."""

import subprocess
import sys

import pytest


def _modules_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(out.split())


@pytest.mark.parametrize("heavy", ["openslide", "torch", "pipeline"])
def test_readers_import_is_light(heavy):
    # `import readers` must not pull OpenSlide (loaded on first use), torch or pipeline.
    assert heavy not in _modules_after("import readers")


def test_readers_import_leaves_out_the_synthetic_writers():
    # readers.testing is for tests, demos and benchmarks, not the reader API.
    assert "readers.testing" not in _modules_after("import readers")


@pytest.mark.parametrize("other", ["readers", "dask", "openslide", "tifffile", "zarr"])
def test_pipeline_core_needs_torch_alone(other):
    assert other not in _modules_after("import pipeline")

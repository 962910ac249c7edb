"""Shared test data: small slides written by the project's own writers (tifffile, zarr).

Session-scoped, written once into a temporary directory:

- ``synth_spec``: what the synthetic slides hold (``SynthSpec``: level-0 shape
  with odd sizes, so level downsamples are not powers of two; tile side; number
  of levels; microns per pixel; the level shapes).
- ``jpeg_tiff``: pyramidal tiled TIFF, JPEG tiles; OpenSlide reads it as generic-tiff.
- ``deflate_tiff``: the same pixels, deflate (lossless) tiles.
- ``ome_zarr``: the same pixels as an OME-Zarr (NGFF 0.5, axes c, y, x).
- ``ome_zarr_unscaled``: that OME-Zarr without ``scale`` transforms.
- ``cmu_svs``: the real CMU-1-Small-Region.svs (one level, no pyramid); skips
  when ``../shared/data/`` is absent (override with ``ATS_WSI_TEST_DATA``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import zarr

from readers.testing import pyramid_shapes, render_he, write_ome_zarr, write_tiff_pyramid


@dataclass(frozen=True)
class SynthSpec:
    shape: tuple[int, int] = (1001, 1303)
    tile: int = 128
    levels: int = 3
    mpp: float = 0.5

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return pyramid_shapes(self.shape, self.tile, self.levels)

    def downsample(self, k: int) -> float:
        (H, W), (h, w) = self.level_shapes[0], self.level_shapes[k]
        return (H / h + W / w) / 2


SYNTH = SynthSpec()

CMU_SVS = (
    Path(
        os.environ.get("ATS_WSI_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    / "CMU-1-Small-Region.svs"
)


@pytest.fixture(scope="session")
def synth_spec() -> SynthSpec:
    return SYNTH


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


def _tiff(directory: Path, compression: str) -> Path:
    path = directory / f"synth-{compression}.tif"
    if not path.exists():
        write_tiff_pyramid(
            path,
            SYNTH.shape,
            render_he,
            tile=SYNTH.tile,
            n_levels=SYNTH.levels,
            mpp=SYNTH.mpp,
            compression=compression,
        )
    return path


@pytest.fixture(scope="session")
def jpeg_tiff(synth_dir) -> Path:
    return _tiff(synth_dir, "jpeg")


@pytest.fixture(scope="session")
def deflate_tiff(synth_dir) -> Path:
    return _tiff(synth_dir, "deflate")


@pytest.fixture(scope="session")
def ome_zarr(synth_dir) -> Path:
    path = synth_dir / "synth.ome.zarr"
    if not path.exists():
        write_ome_zarr(
            path, SYNTH.shape, render_he, tile=SYNTH.tile, n_levels=SYNTH.levels, mpp=SYNTH.mpp
        )
    return path


@pytest.fixture(scope="session")
def ome_zarr_unscaled(ome_zarr) -> Path:
    """``ome_zarr`` without ``scale`` transforms: downsamples from the shapes, no mpp."""
    path = ome_zarr.with_name("synth-unscaled.ome.zarr")
    if not path.exists():
        shutil.copytree(ome_zarr, path)
        group = zarr.open_group(path, mode="r+")
        ome = group.attrs["ome"]
        for dataset in ome["multiscales"][0]["datasets"]:
            del dataset["coordinateTransformations"]
        group.attrs["ome"] = ome
    return path


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    if not CMU_SVS.is_file():
        pytest.skip(f"real slide not present at {CMU_SVS}")
    return CMU_SVS

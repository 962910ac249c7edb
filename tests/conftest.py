"""Shared test data: small slides written by the project's own writers (tifffile, zarr).

Session-scoped, written once into a temporary directory:

- ``jpeg_tiff``: pyramidal tiled TIFF, JPEG tiles, ``SYNTH_SHAPE`` (odd sizes, so
  level downsamples are not powers of two), ``SYNTH_TILE`` tiles, ``SYNTH_LEVELS``
  levels, ``SYNTH_MPP`` microns per pixel; OpenSlide reads it as generic-tiff.
- ``deflate_tiff``: the same pixels, deflate (lossless) tiles.
- ``ome_zarr``: the same pixels as an OME-Zarr (NGFF 0.5, axes c, y, x).
- ``cmu_svs``: the real CMU-1-Small-Region.svs (one level, no pyramid); skips
  when ``../shared/data/`` is absent (override with ``ATS_WSI_TEST_DATA``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from readers.synthetic import render_he, write_ome_zarr, write_tiff_pyramid

SYNTH_SHAPE = (1001, 1303)
SYNTH_TILE = 128
SYNTH_LEVELS = 3
SYNTH_MPP = 0.5

CMU_SVS = (
    Path(
        os.environ.get("ATS_WSI_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    / "CMU-1-Small-Region.svs"
)


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slides")


def _tiff(directory: Path, compression: str) -> Path:
    path = directory / f"synth-{compression}.tif"
    if not path.exists():
        write_tiff_pyramid(
            path,
            SYNTH_SHAPE,
            render_he,
            tile=SYNTH_TILE,
            n_levels=SYNTH_LEVELS,
            mpp=SYNTH_MPP,
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
            path, SYNTH_SHAPE, render_he, tile=SYNTH_TILE, n_levels=SYNTH_LEVELS, mpp=SYNTH_MPP
        )
    return path


@pytest.fixture(scope="session")
def cmu_svs() -> Path:
    if not CMU_SVS.is_file():
        pytest.skip(f"real slide not present at {CMU_SVS}")
    return CMU_SVS

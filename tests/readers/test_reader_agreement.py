"""Backends agree on the pixels where they decode the same bytes.

- Lossless files (deflate TIFF, OME-Zarr written from the same renderer): every
  backend returns identical pixels at level 0.
- JPEG: OpenSlide (its bundled libjpeg-turbo) and tifffile (imagecodecs'
  libjpeg-turbo) may round the inverse DCT differently; ``JPEG_TOLERANCE`` allows
  that. Measured on this machine: 0 (identical) on both the synthetic JPEG TIFF
  and the real SVS.
- OpenSlide at a level with a non-integer downsample: its read_region takes
  level-0 integer coordinates, so a tile's origin is off by up to
  ``0.5 / downsample`` pixel and OpenSlide interpolates. Each pixel is then a
  convex combination of its stored 3x3 neighbourhood (plus rounding), which is
  the bound tested.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from conftest import SYNTH_TILE

from readers import open_slide

JPEG_TOLERANCE = 2


def level_pixels(path, backend: str, level: int) -> np.ndarray:
    with open_slide(path, backend=backend) as slide:
        return np.asarray(slide.levels[level].to_dask()).astype(np.int16)


def test_lossless_level0_identical_across_backends(deflate_tiff, ome_zarr):
    reference = level_pixels(deflate_tiff, "tifffile", 0)
    np.testing.assert_array_equal(level_pixels(deflate_tiff, "openslide", 0), reference)
    np.testing.assert_array_equal(level_pixels(ome_zarr, "zarr", 0), reference)


@pytest.mark.parametrize("level", [1, 2])
def test_lossless_reduced_levels(deflate_tiff, ome_zarr, level):
    stored = level_pixels(deflate_tiff, "tifffile", level)
    np.testing.assert_array_equal(level_pixels(ome_zarr, "zarr", level), stored)
    openslide = level_pixels(deflate_tiff, "openslide", level)
    padded = np.pad(stored, ((1, 1), (1, 1), (0, 0)), mode="edge")
    H, W = stored.shape[:2]
    windows = np.stack([padded[dy : dy + H, dx : dx + W] for dy in range(3) for dx in range(3)])
    low, high = windows.min(axis=0) - 1, windows.max(axis=0) + 1
    assert ((openslide >= low) & (openslide <= high)).all()
    # The first tile starts at level-0 (0, 0): no shift, so exact.
    np.testing.assert_array_equal(
        openslide[:SYNTH_TILE, :SYNTH_TILE], stored[:SYNTH_TILE, :SYNTH_TILE]
    )


def test_jpeg_level0_within_decoder_tolerance(jpeg_tiff):
    diff = np.abs(level_pixels(jpeg_tiff, "openslide", 0) - level_pixels(jpeg_tiff, "tifffile", 0))
    assert diff.max() <= JPEG_TOLERANCE


def test_real_svs_within_decoder_tolerance(cmu_svs):
    diff = np.abs(level_pixels(cmu_svs, "openslide", 0) - level_pixels(cmu_svs, "tifffile", 0))
    assert diff.max() <= JPEG_TOLERANCE


def test_auto_backend_choice(jpeg_tiff, ome_zarr):
    with open_slide(jpeg_tiff) as slide:
        assert slide.backend == "openslide"  # OpenSlide recognises generic tiled TIFF
    with open_slide(ome_zarr) as slide:
        assert slide.backend == "zarr"


def test_auto_falls_back_to_tifffile_for_stripped_tiff(tmp_path):
    # OpenSlide reads tiled TIFFs only; a stripped TIFF goes to tifffile, strips as tiles.
    pixels = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "strips.tif", pixels, photometric="rgb", rowsperstrip=64)
    with open_slide(tmp_path / "strips.tif") as slide:
        assert slide.backend == "tifffile" and slide.levels[0].tile_shape == (64, 200)
        np.testing.assert_array_equal(
            slide.read_patches([[-3, 5]], (300, 200))[0, 3:, :195], pixels[:297, 5:]
        )

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

from readers import open_slide
from readers.testing import render_he, write_tiff_pyramid

JPEG_TOLERANCE = 2


def level_pixels(path, backend: str, level: int) -> np.ndarray:
    with open_slide(path, backend=backend) as slide:
        return np.asarray(slide.levels[level].to_dask()).astype(np.int16)


def test_lossless_level0_identical_across_backends(deflate_tiff, ome_zarr):
    reference = level_pixels(deflate_tiff, "tifffile", 0)
    np.testing.assert_array_equal(level_pixels(deflate_tiff, "openslide", 0), reference)
    np.testing.assert_array_equal(level_pixels(ome_zarr, "zarr", 0), reference)


@pytest.mark.parametrize("level", [1, 2])
def test_lossless_reduced_levels(deflate_tiff, ome_zarr, synth_spec, level):
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
        openslide[: synth_spec.tile, : synth_spec.tile],
        stored[: synth_spec.tile, : synth_spec.tile],
    )


def test_jpeg_level0_within_decoder_tolerance(jpeg_tiff):
    diff = np.abs(level_pixels(jpeg_tiff, "openslide", 0) - level_pixels(jpeg_tiff, "tifffile", 0))
    assert diff.max() <= JPEG_TOLERANCE


def test_real_svs_within_decoder_tolerance(cmu_svs):
    diff = np.abs(level_pixels(cmu_svs, "openslide", 0) - level_pixels(cmu_svs, "tifffile", 0))
    assert diff.max() <= JPEG_TOLERANCE


@pytest.mark.parametrize("source", ["jpeg_tiff", "cmu_svs"])
def test_auto_prefers_tifffile_for_generic_tiff_and_svs(request, source):
    # OpenSlide recognises both, but tifffile decodes their stored tiles directly.
    with open_slide(request.getfixturevalue(source)) as slide:
        assert slide.backend == "tifffile"


def test_auto_backend_for_zarr(ome_zarr):
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


def test_tifffile_reads_ome_tiff_subifd_pyramid(tmp_path):
    # OME-TIFF keeps its reduced levels in SubIFDs (which OpenSlide does not read).
    path = tmp_path / "pyramid.ome.tif"
    levels = [render_he(0, 0, 300, 420, 1.0), render_he(0, 0, 150, 210, 2.0)]
    with tifffile.TiffWriter(path) as tif:
        options = {"tile": (64, 64), "photometric": "rgb", "compression": "deflate"}
        tif.write(
            levels[0],
            subifds=1,
            metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.3},
            **options,
        )
        tif.write(levels[1], subfiletype=1, **options)
    with open_slide(path) as slide:
        assert slide.backend == "tifffile" and slide.mpp == pytest.approx((0.3, 0.25))
        assert [lv.shape[:2] for lv in slide.levels] == [(300, 420), (150, 210)]
        assert slide.levels[1].downsample == 2.0
        np.testing.assert_array_equal(
            slide.levels[1].read_patches([[0, 0]], (150, 210))[0], levels[1]
        )


@pytest.mark.parametrize("backend", ["tifffile", "openslide"])
def test_aperio_mpp_over_resolution_tags(tmp_path, backend):
    # The Aperio ImageDescription's MPP (0.25) wins over the resolution tags (0.5).
    path = tmp_path / "aperio.svs"
    description = "Aperio Image Library v12.0.0\r\n300x257 (64x64) RGB|AppMag = 40|MPP = 0.25"
    write_tiff_pyramid(path, (300, 257), tile=64, n_levels=1, mpp=0.5, description=description)
    with open_slide(path, backend=backend) as slide:
        assert slide.mpp == pytest.approx((0.25, 0.25))

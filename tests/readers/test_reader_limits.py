"""``readers.Limits``: what one slide may cost, on real hostile files made here.

Decoder bombs are real tiled TIFFs written by tifffile with one tile's header
patched (``readers.testing.write_decoder_bomb``); the sparse 10^6 x 10^6 slide is a
real 480 KB TIFF (``write_sparse_tiff``). Nothing is faked.
"""

from __future__ import annotations

import pickle
import time

import numpy as np
import pytest
import tifffile

from readers import Limits, SlideError, open_slide
from readers._tifffile import DECLARED_SIZE
from readers.testing import (
    BOMB_COMPRESSIONS,
    write_decoder_bomb,
    write_sparse_tiff,
)

NAMED_BACKENDS = ["openslide", "tifffile", "zarr"]


@pytest.mark.parametrize("compression", BOMB_COMPRESSIONS)
def test_a_tile_declaring_more_pixels_than_its_tiff_tile_is_refused(tmp_path, compression):
    """Decoding the patched tile would allocate 3 x 65500^2 bytes (12 GB; WebP's
    format caps it at 16383^2): refused from the header, the other tiles still read."""
    path = tmp_path / f"bomb-{compression}.tiff"
    write_decoder_bomb(path, compression)
    side = 16383 if compression == "webp" else 65500
    with open_slide(path, backend="tifffile") as slide:
        with pytest.raises(SlideError, match=f"image of {side}x{side} pixels in a 256x256 tile"):
            slide.levels[0].read_patches(np.array([[0, 0]]), (64, 64))
        assert slide.levels[0].read_patches(np.array([[300, 300]]), (64, 64)).std() > 0


@pytest.mark.parametrize("compression", BOMB_COMPRESSIONS)
def test_declared_sizes_are_read_from_the_codecs_real_output(tmp_path, compression):
    """The header readers agree with what the encoders wrote: 256 x 256 per tile."""
    path = tmp_path / f"ok-{compression}.tiff"
    pixels = np.random.default_rng(1).integers(0, 255, (256, 512, 3), dtype=np.uint8)
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression=compression)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        with open(path, "rb") as fh:
            fh.seek(page.dataoffsets[1])
            data = fh.read(page.databytecounts[1])
        assert DECLARED_SIZE[int(page.compression)](data) == (256, 256)


def test_openslide_refuses_the_jpeg_bomb_itself(tmp_path):
    path = tmp_path / "bomb.tiff"
    write_decoder_bomb(path, "jpeg")
    with open_slide(path, backend="openslide") as slide:
        with pytest.raises(SlideError, match="65500"):
            slide.levels[0].read_patches(np.array([[0, 0]]), (64, 64))


@pytest.mark.parametrize("backend", NAMED_BACKENDS)
def test_tiles_over_the_limit_are_refused_at_open(jpeg_tiff, ome_zarr, backend):
    path = ome_zarr if backend == "zarr" else jpeg_tiff
    with open_slide(path, backend=backend) as slide:
        th, tw = slide.levels[0].tile_shape
    with pytest.raises(SlideError, match=r"tiles of .* more than the limit .*tile_pixels") as info:
        open_slide(path, backend=backend, limits=Limits(tile_pixels=th * tw - 1))
    assert info.value.path == str(path)
    open_slide(path, backend=backend, limits=Limits(tile_pixels=th * tw)).close()


@pytest.mark.parametrize("backend", NAMED_BACKENDS)
def test_levels_over_the_side_limit_are_refused_at_open(jpeg_tiff, ome_zarr, backend, synth_spec):
    path = ome_zarr if backend == "zarr" else jpeg_tiff
    side = max(synth_spec.shape)
    with pytest.raises(SlideError, match=f"more than the limit of {side - 1} per side"):
        open_slide(path, backend=backend, limits=Limits(side=side - 1))
    open_slide(path, backend=backend, limits=Limits(side=side)).close()


def test_a_slide_without_a_pyramid_declaring_10_12_pixels(tmp_path):
    """480 KB declaring 10^6 x 10^6 pixels, no tile stored: it opens and reads (empty
    tiles are zeros), but its thumbnail would stream 10^12 pixels: refused at once."""
    path = tmp_path / "huge.tiff"
    write_sparse_tiff(path)
    assert path.stat().st_size < 500_000
    with open_slide(path) as slide:
        assert slide.shape[:2] == (1_000_000, 1_000_000) and len(slide.levels) == 1
        assert slide.mpp is None  # no resolution tags: not tifffile's 1 pixel per inch
        assert slide.read_patches(np.array([[500_000, 500_000]]), (32, 32)).max() == 0
        with pytest.raises(SlideError, match=r"would stream level 0 .*stream_pixels"):
            slide.thumbnail((512, 512))
    # Without the streaming bound, the time limit stops it within a tile or two.
    limits = Limits(stream_pixels=None, seconds=0.5)
    with open_slide(path, limits=limits) as slide:
        with pytest.raises(SlideError, match=r"time limit of 0.5 s \(stopped before level 0 tile"):
            slide.thumbnail((512, 512))


def test_the_time_limit_runs_from_opening_and_restarts_with_start_clock(jpeg_tiff):
    with open_slide(jpeg_tiff, limits=Limits(seconds=0.2)) as slide:
        slide.read_patches(np.array([[0, 0]]), (64, 64))
        time.sleep(0.3)
        with pytest.raises(SlideError, match="time limit of 0.2 s"):
            slide.read_patches(np.array([[0, 0]]), (64, 64))
        slide.start_clock()
        assert slide.read_patches(np.array([[0, 0]]), (64, 64)).shape == (1, 64, 64, 3)


def test_limits_travel_with_a_pickled_slide(jpeg_tiff):
    limits = Limits(tile_pixels=10**6, seconds=60.0)
    with open_slide(jpeg_tiff, limits=limits) as slide:
        with pickle.loads(pickle.dumps(slide)) as copy:
            assert copy.limits == limits


def test_limits_are_validated(jpeg_tiff):
    with pytest.raises(ValueError, match="Limits.seconds must be > 0"):
        Limits(seconds=0)
    with pytest.raises(TypeError, match="readers.Limits"):
        open_slide(jpeg_tiff, limits={"seconds": 1})

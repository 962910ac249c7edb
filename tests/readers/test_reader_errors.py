"""Bad input: every case raises FileNotFoundError or SlideError naming the path and reason.

The broken files are real files written by the writers and then damaged on disk
(truncated, a tag or a tile's bytes overwritten) — the damage is the only fake.
"""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
import tifffile
import zarr

from readers import SlideError, open_slide
from readers.synthetic import write_tiff_pyramid

TIFF_BACKENDS = ["auto", "openslide", "tifffile"]
ALL_BACKENDS = [*TIFF_BACKENDS, "zarr"]


def damaged_copy(src, tmp_path, name: str):
    dst = tmp_path / name
    shutil.copy(src, dst)
    return dst


def overwrite(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def check_names_path(excinfo, path, *words):
    message = str(excinfo.value)
    assert str(path) in message and excinfo.value.path == str(path)
    for word in words:
        assert word in message


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_missing_file(tmp_path, backend):
    with pytest.raises(FileNotFoundError, match="nowhere.svs"):
        open_slide(tmp_path / "nowhere.svs", backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_file(tmp_path, backend):
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(SlideError) as excinfo:
        open_slide(path, backend=backend)
    check_names_path(excinfo, path)


def test_empty_file_reason(tmp_path):
    path = tmp_path / "empty.svs"
    path.write_bytes(b"")
    with pytest.raises(SlideError) as excinfo:
        open_slide(path)
    check_names_path(excinfo, path, "empty")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_text_file_named_svs(tmp_path, backend):
    path = tmp_path / "notes.svs"
    path.write_text("these are not pixels\n" * 50)
    with pytest.raises(SlideError) as excinfo:
        open_slide(path, backend=backend)
    check_names_path(excinfo, path)


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_file(deflate_tiff, tmp_path, backend, keep):
    path = damaged_copy(deflate_tiff, tmp_path, "truncated.tif")
    os.truncate(path, int(os.path.getsize(path) * keep))
    with pytest.raises(SlideError) as excinfo:
        open_slide(path, backend=backend)
    check_names_path(excinfo, path)


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_unsupported_compression(deflate_tiff, tmp_path, backend):
    path = damaged_copy(deflate_tiff, tmp_path, "unknown-codec.tif")
    with tifffile.TiffFile(path) as tif:
        offsets = [page.tags["Compression"].valueoffset for page in tif.pages]
    for offset in offsets:
        overwrite(path, offset, (60000).to_bytes(2, "little"))  # no codec has this number
    with pytest.raises(SlideError) as excinfo:
        open_slide(path, backend=backend)
    check_names_path(excinfo, path, "compression", "60000")


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
@pytest.mark.parametrize("source", ["jpeg_tiff", "deflate_tiff"])
def test_corrupt_tile_named_at_read(request, tmp_path, backend, source):
    path = damaged_copy(request.getfixturevalue(source), tmp_path, "corrupt.tif")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = 1 * -(-page.imagewidth // page.tilewidth) + 2  # tile (y=1, x=2)
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    overwrite(path, offset, np.random.default_rng(0).integers(0, 256, count, np.uint8).tobytes())
    with open_slide(path, backend=backend) as slide:
        level = slide.levels[0]
        th, tw = level.tile_shape
        level.read_patches([[0, 0]], (th, tw))  # intact tiles still read
        with pytest.raises(SlideError) as excinfo:
            # Only the corrupt tile: OpenSlide's error state is sticky per handle, so
            # with an intact tile decoded in a parallel thread, that thread can fail
            # first with the same message and name its own tile.
            level.read_patches([[th + 3, 2 * tw + 3]], (16, 16))
    check_names_path(excinfo, path, "level 0", "tile (y=1, x=2)")


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_non_ascii_path(tmp_path, backend):
    directory = tmp_path / "lames-é-スライド"
    directory.mkdir()
    path = directory / "coupe ß.tif"
    write_tiff_pyramid(path, (300, 257), tile=64, n_levels=2, compression="deflate")
    with open_slide(path, backend=backend) as slide:
        assert slide.path == str(path)
        patch = slide.levels[1].read_patches([[10, 10]], (32, 32))
        assert patch.shape == (1, 32, 32, 3) and patch.any()


def test_non_ascii_zarr_path(tmp_path, ome_zarr):
    path = tmp_path / "lame-é.ome.zarr"
    shutil.copytree(ome_zarr, path)
    with open_slide(path) as slide:
        assert slide.backend == "zarr" and slide.read_patches([[0, 0]], (8, 8)).any()


def test_directory_not_zarr(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(SlideError) as excinfo:
        open_slide(tmp_path / "junk")
    check_names_path(excinfo, tmp_path / "junk", "Zarr")


def test_zarr_group_without_multiscales(tmp_path):
    path = tmp_path / "plain-group.zarr"
    zarr.open_group(path, mode="w").create_array("0", shape=(4, 4, 3), dtype=np.uint8)
    with pytest.raises(SlideError) as excinfo:
        open_slide(path)
    check_names_path(excinfo, path, "multiscales")


def test_wrong_backend_for_file(jpeg_tiff):
    with pytest.raises(SlideError) as excinfo:
        open_slide(jpeg_tiff, backend="zarr")
    check_names_path(excinfo, jpeg_tiff)


def test_unknown_backend(jpeg_tiff):
    with pytest.raises(ValueError, match="bioformats"):
        open_slide(jpeg_tiff, backend="bioformats")


def test_slide_error_pickles():
    error = pickle.loads(pickle.dumps(SlideError("a/b.svs", "bad tile")))
    assert (error.path, error.reason, str(error)) == ("a/b.svs", "bad tile", "a/b.svs: bad tile")

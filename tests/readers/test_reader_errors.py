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
from readers.testing import write_tiff_pyramid

TIFF_BACKENDS = ["auto", "openslide", "tifffile"]
ALL_BACKENDS = [*TIFF_BACKENDS, "zarr"]
NAMED_BACKENDS = ["openslide", "tifffile", "zarr"]


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


@pytest.mark.parametrize("backend", [*ALL_BACKENDS, "auto"])
def test_a_fifo_is_refused_without_being_opened(tmp_path, backend):
    path = tmp_path / "slide.tif"
    os.mkfifo(path)  # opening it for reading would block until a writer comes
    with pytest.raises(SlideError, match=r"not a regular file \(a FIFO\)") as excinfo:
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


def unknown_codec_copy(src, tmp_path):
    """A copy of ``src`` whose pages all name compression 60000 (no codec has it)."""
    path = damaged_copy(src, tmp_path, "unknown-codec.tif")
    with tifffile.TiffFile(path) as tif:
        offsets = [page.tags["Compression"].valueoffset for page in tif.pages]
    for offset in offsets:
        overwrite(path, offset, (60000).to_bytes(2, "little"))
    return path


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_unsupported_compression(deflate_tiff, tmp_path, backend):
    path = unknown_codec_copy(deflate_tiff, tmp_path)
    with pytest.raises(SlideError) as excinfo:
        open_slide(path, backend=backend)
    check_names_path(excinfo, path, "compression", "60000")


@pytest.mark.parametrize("backend", NAMED_BACKENDS)
@pytest.mark.parametrize(
    "content",
    [b"", b"these are not pixels\n" * 50, b"II*\x00" + bytes(60)],
    ids=["empty", "text", "tiff-header"],
)
def test_failed_open_names_the_backend(tmp_path, backend, content):
    path = tmp_path / "bad.svs"
    path.write_bytes(content)
    with pytest.raises(SlideError) as excinfo:
        open_slide(path, backend=backend)
    check_names_path(excinfo, path, f"{backend}: ")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_failed_open_closes_its_handles(deflate_tiff, tmp_path, backend):
    path = unknown_codec_copy(deflate_tiff, tmp_path)  # fails after the file is opened
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(SlideError):
            open_slide(path, backend=backend)
    assert len(os.listdir("/proc/self/fd")) == before


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


def zarr_array(shape: tuple[int, ...], dtype=np.uint8):
    """Writer of a plain Zarr array of ``shape`` and ``dtype``."""

    def write(path) -> None:
        zarr.create_array(path, shape=shape, dtype=dtype, chunks=shape or (1,))

    return write


def ome_group(ome: dict):
    """Writer of a Zarr v3 group with attribute ``ome``: array ``"0"`` ``uint8 [3, 8, 8]``
    and an empty subgroup ``"labels"``."""

    def write(path) -> None:
        group = zarr.open_group(path, mode="w", zarr_format=3)
        group.create_array("0", shape=(3, 8, 8), dtype=np.uint8)
        group.create_group("labels")
        group.attrs["ome"] = ome

    return write


def multiscale(axes=("c", "y", "x"), **entry) -> dict:
    """NGFF 0.5 metadata of one multiscale: ``axes`` (``None``: left out) and
    ``entry``, whose ``datasets`` default to array ``"0"``."""
    entry = {"datasets": [{"path": "0"}], **entry}
    if axes is not None:
        entry["axes"] = list(axes)
    return {"version": "0.5", "multiscales": [entry]}


def scaled(scale: list[float]) -> list[dict]:
    """``datasets`` naming array ``"0"`` with a ``scale`` transform."""
    return [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]


MALFORMED_ZARR = {
    # name: (writer, words the reason must hold)
    "float array": (zarr_array((8, 8, 3), np.float32), ["dtype float32", "uint8"]),
    "4-D array": (zarr_array((2, 8, 8, 3)), ["shape (2, 8, 8, 3)", "[H, W, C]"]),
    "1-D array": (zarr_array((8,)), ["shape (8,)"]),
    "empty array": (zarr_array((0, 8, 3)), ["shape (0, 8)", "positive"]),
    "2-channel array": (zarr_array((8, 8, 2)), ["2 channels"]),
    "OME group without axes": (ome_group(multiscale(axes=None)), ["without axes"]),
    "OME axes z, y, x": (ome_group(multiscale(axes=("z", "y", "x"))), ["unsupported axes", "'z'"]),
    "OME axis without a name": (
        ome_group(multiscale(axes=({"type": "channel"}, "y", "x"))),
        ["axes"],
    ),
    "OME axes y, x for a 3-D array": (
        ome_group(multiscale(axes=("y", "x"))),
        ["shape (3, 8, 8)", "'yx'"],
    ),
    "OME multiscales not a list": (
        ome_group({"multiscales": {"axes": ["y", "x"]}}),
        ["multiscales"],
    ),
    "OME without datasets": (ome_group(multiscale(datasets=[])), ["without datasets"]),
    "OME dataset without path": (ome_group(multiscale(datasets=[{}])), ["no path"]),
    "OME missing dataset": (
        ome_group(multiscale(datasets=[{"path": "9"}])),
        ["missing dataset '9'"],
    ),
    "OME dataset is a group": (
        ome_group(multiscale(datasets=[{"path": "labels"}])),
        ["'labels' is a group"],
    ),
    "OME scale too short": (
        ome_group(multiscale(datasets=scaled([1.0, 0.5]))),
        ["scale [1.0, 0.5]"],
    ),
    "OME scale of zero": (ome_group(multiscale(datasets=scaled([1.0, 0.0, 0.5]))), ["positive"]),
}


@pytest.mark.parametrize("backend", ["auto", "zarr"])
@pytest.mark.parametrize("case", MALFORMED_ZARR)
def test_malformed_zarr(tmp_path, backend, case):
    write, words = MALFORMED_ZARR[case]
    path = tmp_path / "bad.zarr"
    write(path)
    with pytest.raises(SlideError) as excinfo:
        open_slide(path, backend=backend)
    check_names_path(excinfo, path, "zarr: ", *words)
    # The backend's own reason, not a library exception (KeyError...) wrapped as is.
    assert "Error" not in excinfo.value.reason


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


def test_a_tiff_whose_first_page_lies_past_its_end_is_one_clear_error(jpeg_tiff, tmp_path, capfd):
    """A truncated SVS as users meet it: the header points past the end of the file.
    One SlideError saying so, and nothing of tifffile's own logging on stderr."""
    path = damaged_copy(jpeg_tiff, tmp_path, "cut.tif")
    overwrite(path, 4, (os.path.getsize(path) + 1000).to_bytes(4, "little"))
    with pytest.raises(SlideError, match=r"no image in the file \(.* truncated or damaged\?\)"):
        open_slide(path, backend="tifffile")
    assert capfd.readouterr().err == ""  # tifffile's "invalid offset" line is kept off it

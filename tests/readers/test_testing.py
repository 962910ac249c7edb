"""The synthetic writers: pixels, layout and metadata, checked with tifffile and zarr directly."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

import readers
from readers import open_slide
from readers.testing import pyramid_shapes, render_he, write_ome_zarr, write_tiff_pyramid


def test_pyramid_shapes_are_not_powers_of_two(synth_spec):
    assert synth_spec.level_shapes == [(1001, 1303), (501, 652), (251, 326)]
    assert synth_spec.downsample(1) != 2.0 and synth_spec.downsample(2) != 4.0
    assert pyramid_shapes((5000, 300), 256, None)[-1] == (157, 10)  # default: down to a tile


def test_deflate_levels_are_the_renderer(deflate_tiff, synth_spec):
    with tifffile.TiffFile(deflate_tiff) as tif:
        assert len(tif.pages) == synth_spec.levels
        for k, page in enumerate(tif.pages):
            assert page.is_tiled and (page.tilelength, page.tilewidth) == (synth_spec.tile,) * 2
            assert page.subfiletype == (0 if k == 0 else 1)  # top-level pages, not SubIFDs
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            expected = render_he(0, 0, *synth_spec.level_shapes[k], synth_spec.downsample(k))
            np.testing.assert_array_equal(page.asarray(), expected)


def test_jpeg_levels_are_close_to_the_renderer(jpeg_tiff, synth_spec):
    with tifffile.TiffFile(jpeg_tiff) as tif:
        for k, page in enumerate(tif.pages):
            assert page.compression == tifffile.COMPRESSION.JPEG
            error = page.asarray().astype(float) - render_he(
                0, 0, *synth_spec.level_shapes[k], synth_spec.downsample(k)
            )
            psnr = 10 * np.log10(255**2 / np.mean(error**2))
            assert psnr > 35  # quality 90


def test_ome_zarr_layout(ome_zarr, synth_spec):
    group = zarr.open_group(ome_zarr, mode="r")
    meta = group.attrs["ome"]
    assert meta["version"] == "0.5" and group.metadata.zarr_format == 3
    multiscale = meta["multiscales"][0]
    assert [a["name"] for a in multiscale["axes"]] == ["c", "y", "x"]
    for k, dataset in enumerate(multiscale["datasets"]):
        array = group[dataset["path"]]
        assert array.shape == (3, *synth_spec.level_shapes[k]) and array.chunks == (
            3,
            synth_spec.tile,
            synth_spec.tile,
        )
        scale = dataset["coordinateTransformations"][0]["scale"]
        assert scale[1] == pytest.approx(
            synth_spec.mpp * synth_spec.shape[0] / synth_spec.level_shapes[k][0]
        )
        np.testing.assert_array_equal(
            np.moveaxis(array[:], 0, -1),
            render_he(0, 0, *synth_spec.level_shapes[k], synth_spec.downsample(k)),
        )


def test_reads_ngff_04_with_yxc_axes(tmp_path):
    # The other common layout: Zarr format 2, NGFF 0.4, channels last.
    path = tmp_path / "v04.zarr"
    group = zarr.open_group(path, mode="w", zarr_format=2)
    pixels = [render_he(0, 0, 90, 70, 1.0), render_he(0, 0, 45, 35, 2.0)]
    for k, level in enumerate(pixels):
        group.create_array(str(k), shape=level.shape, chunks=(32, 32, 3), dtype=np.uint8)[:] = level
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [
                {"name": "y", "type": "space", "unit": "micrometer"},
                {"name": "x", "type": "space", "unit": "micrometer"},
                {"name": "c", "type": "channel"},
            ],
            "datasets": [
                {
                    "path": str(k),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [0.25 * 2**k, 0.25 * 2**k, 1]}
                    ],
                }
                for k in range(2)
            ],
        }
    ]
    with open_slide(path) as slide:
        assert slide.mpp == (0.25, 0.25) and slide.levels[1].downsample == 2.0
        assert slide.levels[0].tile_shape == (32, 32)
        np.testing.assert_array_equal(
            slide.levels[1].read_patches([[0, 0]], (45, 35))[0], pixels[1]
        )


@pytest.mark.parametrize("writer", [write_tiff_pyramid, write_ome_zarr])
def test_renderer_output_is_validated(tmp_path, writer):
    def wrong(y0, x0, h, w, ds):
        return np.zeros((h, w), np.uint8)

    with pytest.raises(ValueError, match="render must return"):
        writer(tmp_path / "bad", (64, 64), wrong, tile=32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 100}, "tile"),
        ({"compression": "lzma"}, "compression"),
        ({"mpp": -1}, "mpp"),
        ({"n_levels": 0}, "n_levels"),
    ],
)
def test_writer_arguments_are_validated(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_tiff_pyramid(tmp_path / "bad.tif", (64, 64), **kwargs)


def test_writers_are_not_reader_api():
    exported = set(readers.__all__) | set(vars(readers))
    assert not {"render_he", "write_tiff_pyramid", "write_ome_zarr"} & exported

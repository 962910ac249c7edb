"""The reader contract, run unchanged on every backend and test file.

Each concrete class names a backend and a file fixture and states what that file
holds; the tests themselves never branch on the backend.
"""

from __future__ import annotations

import pickle
from collections import Counter
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from readers import Slide, open_slide
from readers.base import STREAM_BLOCK


class Expected(NamedTuple):
    """What a test file holds: level ``(h, w)`` shapes, tile ``(h, w)``, mpp ``(y, x)``."""

    shapes: list[tuple[int, int]]
    tile: tuple[int, int]
    mpp: tuple[float, float] | None


def reference_patches(level_pixels: np.ndarray, offsets, size, fill: int) -> np.ndarray:
    """Naive: cut each patch from the whole decoded level padded with ``fill`` on all sides."""
    margin = int(np.abs(offsets).max()) + max(size)
    padded = np.pad(
        level_pixels, ((margin, margin), (margin, margin), (0, 0)), constant_values=fill
    )
    return np.stack(
        [
            padded[y + margin : y + margin + size[0], x + margin : x + margin + size[1]]
            for y, x in offsets
        ]
    )


def awkward_offsets(level) -> np.ndarray:
    """Aligned, unaligned, straddling tiles and borders, partly and wholly outside."""
    H, W = level.shape[:2]
    th, tw = level.tile_shape
    return np.array(
        [
            [0, 0],
            [th, tw],
            [th - 5, tw - 7],
            [H // 3, W // 2],
            [H - 40, W - 33],
            [H - 1, W - 1],
            [-30, -50],
            [-5, W - 10],
            [H + 5, 10],
            [-400, -400],
            [th + 1, 3],
        ]
    )


class ReaderContract:
    """Behaviour every backend shares. Subclasses set ``backend``, ``source`` and ``expected``."""

    backend: str
    source: str  # name of the fixture giving the file

    @pytest.fixture
    def expected(self) -> Expected:
        raise NotImplementedError

    @pytest.fixture
    def slide(self, request) -> Slide:
        with open_slide(request.getfixturevalue(self.source), backend=self.backend) as slide:
            yield slide

    @pytest.fixture
    def level_pixels(self, slide) -> list[np.ndarray]:
        return [np.asarray(level.to_dask()) for level in slide.levels]

    def test_metadata(self, slide, expected):
        assert slide.backend == self.backend
        assert [lv.shape for lv in slide.levels] == [(h, w, 3) for h, w in expected.shapes]
        assert slide.shape == slide.levels[0].shape
        H0, W0 = expected.shapes[0]
        for k, (h, w) in enumerate(expected.shapes):
            level = slide.levels[k]
            assert level.index == k
            assert level.downsample == pytest.approx((H0 / h + W0 / w) / 2, rel=1e-12)
            assert level.tile_shape == expected.tile
        if expected.mpp is None:
            assert slide.mpp is None
        else:
            assert slide.mpp == pytest.approx(expected.mpp, rel=1e-6)
        assert slide.properties and all(
            isinstance(k, str) and isinstance(v, str) for k, v in slide.properties.items()
        )

    def test_to_dask_is_one_chunk_per_tile(self, slide):
        for level in slide.levels:
            array = level.to_dask()
            assert array.shape == level.shape and array.dtype == np.uint8
            assert array.numblocks[:2] == level.grid_shape
            assert array.chunks[0][0] == level.tile_shape[0]
            assert array.chunks[1][0] == level.tile_shape[1]

    @pytest.mark.parametrize("fill", [0, 7])
    def test_read_patches_equals_slicing(self, slide, level_pixels, fill):
        for level, pixels in zip(slide.levels, level_pixels, strict=True):
            offsets = awkward_offsets(level)
            th, tw = level.tile_shape
            for size in [(37, 53), (th + 30, 2 * tw + 11)]:  # inside one tile; larger than one
                got = level.read_patches(offsets, size, fill=fill)
                assert got.shape == (len(offsets), *size, 3) and got.dtype == np.uint8
                np.testing.assert_array_equal(got, reference_patches(pixels, offsets, size, fill))

    def test_each_touched_tile_decoded_once(self, slide, monkeypatch):
        level = slide.levels[0]
        th, tw = level.tile_shape
        H, W = level.shape[:2]
        # Overlapping patches share tiles; one patch is wholly outside.
        offsets = np.array(
            [[th - 10, tw - 10], [th + 5, tw + 5], [th - 10, tw - 10], [H - 20, W - 20], [-500, 3]]
        )
        size = (40, 2 * tw + 1)
        calls = Counter()
        decode = level._read_tile

        def counting(ty, tx, box):  # observes the backend's own decode, changes nothing
            calls[(ty, tx)] += 1
            return decode(ty, tx, box)

        monkeypatch.setattr(level, "_read_tile", counting)
        level.read_patches(offsets, size)
        touched = {
            (ty, tx)
            for ty in range(level.grid_shape[0])
            for tx in range(level.grid_shape[1])
            for y, x in offsets
            if y < (ty + 1) * th
            and ty * th < y + size[0]
            and x < (tx + 1) * tw
            and tx * tw < x + size[1]
        }
        assert set(calls) == touched
        assert set(calls.values()) == {1}

    def test_read_region_uses_level0_location(self, slide, level_pixels):
        k = len(slide.levels) - 1
        level = slide.levels[k]
        location = (int(3 * level.downsample * 10) + 1, 17)
        got = slide.read_region(location, k, (20, 30))
        y, x = (int(np.floor(v / level.downsample)) for v in location)
        np.testing.assert_array_equal(got, level_pixels[k][y : y + 20, x : x + 30])

    def test_slide_read_patches_is_level0(self, slide):
        offsets = np.array([[5, 9], [300, 200]])
        np.testing.assert_array_equal(
            slide.read_patches(offsets, (16, 16)), slide.levels[0].read_patches(offsets, (16, 16))
        )

    def test_thumbnail_equals_unstreamed_reduction(self, slide, level_pixels):
        H, W = slide.shape[:2]
        thumb = slide.thumbnail((96, 128))
        d = max(H / 96, W / 128)
        assert thumb.shape == (round(H / d), round(W / d), 3) and thumb.dtype == np.uint8
        assert thumb.flags.writeable  # torch.from_numpy warns on read-only arrays
        # The same reduction computed naively on the whole level in memory.
        k = slide.level_for_downsample(d)
        factor = max(1, int(d / slide.levels[k].downsample))
        pixels = level_pixels[k].astype(np.float64)
        h, w = pixels.shape[:2]
        padded = np.zeros((-(-h // factor) * factor, -(-w // factor) * factor, 3))
        weight = np.zeros(padded.shape[:2])
        padded[:h, :w], weight[:h, :w] = pixels, 1
        shape = (padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
        sums = padded.reshape(*shape, 3).sum(axis=(1, 3))
        small = np.rint(sums / weight.reshape(shape).sum(axis=(1, 3))[..., None]).astype(np.uint8)
        if small.shape != thumb.shape:
            small = np.asarray(Image.fromarray(small).resize(thumb.shape[1::-1], Image.BOX))
        np.testing.assert_array_equal(thumb, small)

    def test_thumbnail_of_a_level_size_is_that_level(self, slide, level_pixels):
        for level, pixels in zip(slide.levels, level_pixels, strict=True):
            np.testing.assert_array_equal(slide.thumbnail(level.shape[:2]), pixels)

    def test_thumbnail_is_streamed(self, slide, monkeypatch):
        # Observe every read the thumbnail makes: bounded blocks, each tile decoded once.
        level = slide.levels[
            slide.level_for_downsample(max(slide.shape[0] / 64, slide.shape[1] / 64))
        ]
        reads, decodes = [], Counter()
        read_patches, decode = level.read_patches, level._read_tile

        def recording_read(offsets, size, fill=0):
            reads.append(len(offsets) * size[0] * size[1])
            return read_patches(offsets, size, fill)

        def counting_decode(ty, tx, box):
            decodes[(ty, tx)] += 1
            return decode(ty, tx, box)

        monkeypatch.setattr(level, "read_patches", recording_read)
        monkeypatch.setattr(level, "_read_tile", counting_decode)
        slide.thumbnail((64, 64))
        th, tw = level.tile_shape
        assert max(reads) <= max(th, STREAM_BLOCK) * max(tw, STREAM_BLOCK)
        assert sum(reads) == level.shape[0] * level.shape[1]
        assert set(decodes.values()) == {1}
        assert len(decodes) == level.grid_shape[0] * level.grid_shape[1]

    def test_level_choice(self, slide):
        for level in slide.levels:
            assert slide.level_for_downsample(level.downsample) == level.index
            assert slide.level_for_downsample(level.downsample * 1.0001) == level.index
        assert slide.level_for_downsample(0.5) == 0
        if slide.mpp is not None:
            coarsest = slide.levels[-1]
            assert slide.level_for_mpp(coarsest.downsample * sum(slide.mpp) / 2) == coarsest.index

    def test_pickle_reopens(self, slide):
        clone = pickle.loads(pickle.dumps(slide))
        try:
            assert type(clone) is type(slide) and clone.path == slide.path
            assert clone.backend == slide.backend and clone is not slide
            offsets = np.array([[11, 13], [200, 300]])
            np.testing.assert_array_equal(
                clone.read_patches(offsets, (50, 70)), slide.read_patches(offsets, (50, 70))
            )
            level = pickle.loads(pickle.dumps(slide.levels[-1]))
            assert level.shape == slide.levels[-1].shape
        finally:
            clone.close()

    def test_read_after_close(self, request):
        slide = open_slide(request.getfixturevalue(self.source), backend=self.backend)
        with slide:
            pass
        slide.close()  # idempotent
        with pytest.raises(ValueError, match="closed"):
            slide.read_patches([[0, 0]], (4, 4))

    def test_empty_request(self, slide):
        assert slide.levels[0].read_patches(np.zeros((0, 2), int), (8, 9)).shape == (0, 8, 9, 3)

    @pytest.mark.parametrize(
        ("offsets", "size", "fill", "error"),
        [
            (np.zeros((2, 3), int), (8, 8), 0, ValueError),
            (np.zeros((2, 2), float), (8, 8), 0, TypeError),
            (np.zeros((2, 2), int), (0, 8), 0, ValueError),
            (np.zeros((2, 2), int), 8, 0, TypeError),
            (np.zeros((2, 2), int), (8, 8), 256, ValueError),
        ],
    )
    def test_bad_arguments(self, slide, offsets, size, fill, error):
        with pytest.raises(error):
            slide.levels[0].read_patches(offsets, size, fill=fill)

    def test_bad_level(self, slide):
        with pytest.raises(ValueError, match="level"):
            slide.read_region((0, 0), len(slide.levels), (4, 4))

    def test_numpy_integers_accepted(self, slide):
        k, i64 = len(slide.levels) - 1, np.int64
        np.testing.assert_array_equal(
            slide.read_region((i64(41), i64(23)), i64(k), (i64(20), i64(30))),
            slide.read_region((41, 23), k, (20, 30)),
        )
        offsets = np.array([[5, 9], [300, 200]])
        np.testing.assert_array_equal(
            slide.levels[0].read_patches(offsets, np.array([16, 12]), fill=i64(7)),
            slide.levels[0].read_patches(offsets, (16, 12), fill=7),
        )
        np.testing.assert_array_equal(
            slide.thumbnail(np.array([64, 48])), slide.thumbnail((64, 48))
        )

    @pytest.mark.parametrize(
        ("call", "name"),
        [
            (lambda slide: slide.read_region((1.7, 0), 0, (4, 4)), "location"),
            (lambda slide: slide.read_region(np.array([2.0, 3.0]), 0, (4, 4)), "location"),
            (lambda slide: slide.read_region((0, 0), 0, (4.0, 4)), "size"),
            (lambda slide: slide.read_region((0, 0), 0.0, (4, 4)), "level"),
            (lambda slide: slide.levels[0].read_patches([[0, 0]], (4, 4.5)), "size"),
            (lambda slide: slide.levels[0].read_patches([[0, 0]], (4, 4), fill=1.0), "fill"),
            (lambda slide: slide.thumbnail((64.0, 64)), "max_size"),
        ],
        ids=["location", "numpy-location", "size", "level", "patch-size", "fill", "max_size"],
    )
    def test_float_arguments_are_type_errors(self, slide, call, name):
        with pytest.raises(TypeError, match=name):
            call(slide)


class SynthContract(ReaderContract):
    @pytest.fixture
    def expected(self, synth_spec) -> Expected:
        return Expected(synth_spec.level_shapes, (synth_spec.tile,) * 2, (synth_spec.mpp,) * 2)


class CMUContract(ReaderContract):
    source = "cmu_svs"

    @pytest.fixture
    def expected(self) -> Expected:
        return Expected([(2967, 2220)], (240, 240), (0.499, 0.499))


class TestTifffileJpeg(SynthContract):
    backend, source = "tifffile", "jpeg_tiff"


class TestTifffileDeflate(SynthContract):
    backend, source = "tifffile", "deflate_tiff"


class TestOpenSlideJpeg(SynthContract):
    backend, source = "openslide", "jpeg_tiff"


class TestOpenSlideDeflate(SynthContract):
    backend, source = "openslide", "deflate_tiff"


class TestZarr(SynthContract):
    backend, source = "zarr", "ome_zarr"


class TestZarrUnscaled(SynthContract):
    backend, source = "zarr", "ome_zarr_unscaled"

    @pytest.fixture
    def expected(self, synth_spec) -> Expected:
        return Expected(synth_spec.level_shapes, (synth_spec.tile,) * 2, None)


class TestTifffileCMU(CMUContract):
    backend = "tifffile"


class TestOpenSlideCMU(CMUContract):
    backend = "openslide"


def test_real_slide_without_pyramid_streams_its_thumbnail(cmu_svs, monkeypatch):
    """The CMU slide has one 2967 x 2220 level: the thumbnail reads it block by block."""
    with open_slide(cmu_svs, backend="tifffile") as slide:
        level = slide.levels[0]
        reads = []
        read_patches = level.read_patches

        def recording_read(offsets, size, fill=0):
            reads.append(size)
            return read_patches(offsets, size, fill)

        monkeypatch.setattr(level, "read_patches", recording_read)
        thumb = slide.thumbnail((256, 256))
    assert thumb.shape == (256, round(2220 * 256 / 2967), 3)
    assert len(reads) == 12 and max(h * w for h, w in reads) == 960 * 960  # 4 x 240 tiles
    assert max(h * w for h, w in reads) < level.shape[0] * level.shape[1] / 7


def test_closing_a_tifffile_slide_frees_its_tifffile_objects_at_once(jpeg_tiff):
    """tifffile's objects refer to each other; left to the cyclic garbage collector,
    every slide a long batch closed would linger until its next full pass."""
    import gc

    def tifffile_objects() -> int:
        modules = (getattr(type(o), "__module__", None) for o in gc.get_objects())
        return sum(isinstance(m, str) and m.startswith("tifffile") for m in modules)

    def open_read_close() -> None:
        with open_slide(jpeg_tiff, backend="tifffile") as slide:
            assert tifffile_objects() > before  # open: the TiffFile, pages, tags
            slide.read_patches([[5, 7]], (40, 30))

    before = 0
    open_read_close()  # tifffile's module-level caches (codecs, tag names) fill once
    gc.collect()
    gc.disable()
    try:
        before = tifffile_objects()
        for _ in range(3):
            open_read_close()
        assert tifffile_objects() == before
    finally:
        gc.enable()

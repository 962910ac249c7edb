"""Synthetic slides for tests, demos and benchmarks; not part of the reader API.

Writers of pyramidal slides (``write_tiff_pyramid``, ``write_ome_zarr``) and a
renderer of an H&E-like texture (``render_he``), used by the tests, the scripts,
``ats-wsi synth`` and the demo. ``import readers`` does not import this module.

A *renderer* draws any region of any level directly at that level's scale, so a
pyramid of any size is written tile by tile in bounded memory::

    render(y0, x0, h, w, downsample) -> uint8 [h, w, 3]

renders the ``h x w`` region whose top-left is ``(y0, x0)`` in the pixel grid of
a level whose pixels are ``downsample`` level-0 pixels wide (level pixel ``(i, j)``
covers level-0 ``[(y0 + i) * downsample, (y0 + i + 1) * downsample)`` in y).

Level ``k`` is ``(ceil(H / 2**k), ceil(W / 2**k))``, so with odd sizes the
downsamples are not powers of two; they are the mean of the height and width
ratios to level 0, which is what every backend reports.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from readers._types import as_hw, as_int
from readers.base import Level

Renderer = Callable[[int, int, int, int, float], np.ndarray]

# Optical densities (R, G, B) of haematoxylin and eosin (Ruifrok & Johnston).
_OD_HAEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_OD_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)


def render_he(y0: int, x0: int, h: int, w: int, downsample: float) -> np.ndarray:
    """A smooth pink H&E-like texture: eosin-stained tissue with purple nuclei dots.

    Deterministic, defined everywhere (no random state), with detail at a few
    level-0 pixels so that misplaced reads show. Cheap: every trigonometric term
    is separable (``sin(a + b) = sin a cos b + cos a sin b``), so only 1-D
    functions and outer products are evaluated, in float32.
    """
    y = ((y0 + np.arange(h, dtype=np.float64) + 0.5) * downsample)[:, None]
    x = ((x0 + np.arange(w, dtype=np.float64) + 0.5) * downsample)[None, :]

    def sin_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # sin(a + b), a [h, 1], b [1, w]
        return (np.sin(a) * np.cos(b) + np.cos(a) * np.sin(b)).astype(np.float32)

    swirl = sin_sum(y / 211, np.cos(x / 157)) + sin_sum(-y / 131, x / 97)
    tissue = np.clip(0.55 + 0.3 * swirl, 0, 1)
    dots = (np.sin(y / 9.0) * np.sin(x / 11.0)).astype(np.float32) * sin_sum(y / 37.0, x / 37.0)
    nuclei = np.clip(dots, 0, 1) ** 2
    hema = tissue * (0.25 + 1.2 * nuclei)
    eosin = 0.6 * tissue
    od = hema[..., None] * _OD_HAEMATOXYLIN + eosin[..., None] * _OD_EOSIN  # [h, w, 3]
    return np.rint(255 * np.exp(-od)).astype(np.uint8)


def pyramid_shapes(
    shape_hw: tuple[int, int], tile: int, n_levels: int | None
) -> list[tuple[int, int]]:
    """Level sizes ``(ceil(H / 2**k), ceil(W / 2**k))``; by default down to one tile."""
    H, W = as_hw(shape_hw, "shape_hw")
    if n_levels is None:
        n_levels = 1 + max(0, math.ceil(math.log2(max(H, W) / tile)))
    n_levels = as_int(n_levels, "n_levels")
    if n_levels < 1:
        raise ValueError(f"n_levels must be a positive int or None, got {n_levels!r}")
    return [(math.ceil(H / 2**k), math.ceil(W / 2**k)) for k in range(n_levels)]


def _mpp_pair(mpp) -> tuple[float, float]:
    y, x = (mpp, mpp) if isinstance(mpp, (int, float)) else mpp
    if not (y > 0 and x > 0):
        raise ValueError(f"mpp must be positive (y, x) microns per pixel, got {mpp!r}")
    return float(y), float(x)


def _tiles(
    render: Renderer, shape: tuple[int, int], tile: int, downsample: float, pad: bool
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Row-major ``(y, x, pixels)`` of a level's tiles; edge tiles padded to full if ``pad``."""
    H, W = shape
    for y in range(0, H, tile):
        for x in range(0, W, tile):
            h, w = min(tile, H - y), min(tile, W - x)
            pixels = render(y, x, h, w, downsample)
            if pixels.shape != (h, w, 3) or pixels.dtype != np.uint8:
                raise ValueError(
                    f"render must return uint8 [{h}, {w}, 3], got {pixels.dtype} {pixels.shape}"
                )
            if pad and (h, w) != (tile, tile):
                pixels = np.pad(pixels, ((0, tile - h), (0, tile - w), (0, 0)), mode="edge")
            yield y, x, pixels


def write_tiff_pyramid(
    path: str | os.PathLike,
    shape_hw: tuple[int, int],
    render: Renderer = render_he,
    *,
    tile: int = 256,
    n_levels: int | None = None,
    mpp: float | tuple[float, float] = 0.5,
    compression: str = "jpeg",
    quality: int = 90,
    description: str = "ats-wsi synthetic slide",
) -> None:
    """Write a tiled pyramidal TIFF that OpenSlide ("generic-tiff") and tifffile both read.

    Args:
        path: output file (``.tif``); BigTIFF when the raw pixels exceed 2 GiB.
        shape_hw: level-0 ``(H, W)``; up to 100k x 100k is fine (written tile by tile).
        render: the renderer (module docstring); default :func:`render_he`.
        tile: tile side in pixels (a multiple of 16, as TIFF requires).
        n_levels: number of levels (default: down to a level of about one tile).
        mpp: microns per level-0 pixel, one number or ``(y, x)``; stored in the
            resolution tags (unit centimeter), scaled per level.
        compression: ``"jpeg"`` (YCbCr, ``quality``) or ``"deflate"`` (lossless).
        description: ImageDescription of level 0 (OpenSlide's ``openslide.comment``).

    Levels are successive top-level pages, reduced ones flagged ``subfiletype=1``
    (not SubIFDs): the layout OpenSlide's generic TIFF reader takes as a pyramid.
    """
    import tifffile

    tile = as_int(tile, "tile")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile!r}")
    if compression not in ("jpeg", "deflate"):
        raise ValueError(f"compression must be 'jpeg' or 'deflate', got {compression!r}")
    shapes = pyramid_shapes(shape_hw, tile, n_levels)
    mpp_y, mpp_x = _mpp_pair(mpp)
    args = {"level": quality} if compression == "jpeg" else None
    bigtiff = shapes[0][0] * shapes[0][1] * 3 * 4 // 3 > 2**31
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for k, (h, w) in enumerate(shapes):
            ds = Level.mean_ratio(shapes[0], (h, w))
            tif.write(
                (pixels for _, _, pixels in _tiles(render, (h, w), tile, ds, pad=True)),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                compressionargs=args,
                subfiletype=0 if k == 0 else 1,
                # pixels per centimeter (x, y) at this level
                resolution=(1e4 * w / (mpp_x * shapes[0][1]), 1e4 * h / (mpp_y * shapes[0][0])),
                resolutionunit="CENTIMETER",
                description=description if k == 0 else None,
                metadata=None,
            )


def write_ome_zarr(
    path: str | os.PathLike,
    shape_hw: tuple[int, int],
    render: Renderer = render_he,
    *,
    tile: int = 256,
    n_levels: int | None = None,
    mpp: float | tuple[float, float] = 0.5,
    name: str = "ats-wsi synthetic slide",
) -> None:
    """Write an OME-Zarr multiscale pyramid (Zarr format 3, NGFF 0.5).

    Arrays ``"0"``, ``"1"``, ... are ``uint8 [3, H_k, W_k]`` with axes ``c, y, x``
    (NGFF puts channels before space), chunks ``(3, tile, tile)``, zstd-compressed;
    the ``scale`` transforms give microns per pixel per level, from the level sizes.
    Written one chunk at a time, in bounded memory.
    """
    import zarr

    shapes = pyramid_shapes(shape_hw, tile, n_levels)
    mpp_y, mpp_x = _mpp_pair(mpp)
    group = zarr.open_group(os.fspath(path), mode="w", zarr_format=3)
    datasets = []
    for k, (h, w) in enumerate(shapes):
        array = group.create_array(
            str(k), shape=(3, h, w), chunks=(3, tile, tile), dtype=np.uint8, fill_value=0
        )
        ds = Level.mean_ratio(shapes[0], (h, w))
        for y, x, pixels in _tiles(render, (h, w), tile, ds, pad=False):
            array[:, y : y + pixels.shape[0], x : x + pixels.shape[1]] = pixels.transpose(2, 0, 1)
        scale = [1.0, mpp_y * shapes[0][0] / h, mpp_x * shapes[0][1] / w]
        datasets.append(
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "name": name,
                "axes": [
                    {"name": "c", "type": "channel"},
                    {"name": "y", "type": "space", "unit": "micrometer"},
                    {"name": "x", "type": "space", "unit": "micrometer"},
                ],
                "datasets": datasets,
            }
        ],
    }


BOMB_COMPRESSIONS = ("jpeg", "jpeg2000", "png", "webp")
"""Codecs ``write_decoder_bomb`` can write: image codecs whose header states the size."""


def write_decoder_bomb(
    path: str | os.PathLike, compression: str = "jpeg", side: int = 65500
) -> None:
    """A 512 x 512 tiled TIFF (256 x 256 tiles, ``compression`` one of
    ``BOMB_COMPRESSIONS``) whose first level-0 tile's header declares ``side`` x
    ``side`` pixels (at most 16,383 for WebP): a decoder that trusts the header
    allocates ``3 side^2`` bytes (12 GB for 65500) from a file of a few hundred KB."""
    import tifffile

    if compression not in BOMB_COMPRESSIONS:
        raise ValueError(f"compression must be one of {BOMB_COMPRESSIONS}, got {compression!r}")
    pixels = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", compression=compression, metadata=None
    )
    with tifffile.TiffFile(path) as tif:
        offset, count = tif.pages[0].dataoffsets[0], tif.pages[0].databytecounts[0]
    data = bytearray(Path(path).read_bytes())
    tile = memoryview(data)[offset : offset + count]
    _declare_size(tile, compression, side)
    Path(path).write_bytes(bytes(data))


def _declare_size(tile: memoryview, compression: str, side: int) -> None:
    """Overwrite, in place, the image size that ``tile``'s header declares."""
    data = bytes(tile)
    if compression == "jpeg":
        at = next(i for i in range(2, len(data) - 1) if data[i : i + 2] == b"\xff\xc0") + 5
        tile[at : at + 4] = side.to_bytes(2, "big") * 2
    elif compression == "jpeg2000":
        at = data.index(b"\xff\x4f\xff\x51") + 8  # Xsiz, Ysiz
        tile[at : at + 8] = side.to_bytes(4, "big") * 2
    elif compression == "png":
        tile[16:24] = side.to_bytes(4, "big") * 2
    else:  # webp: sizes minus one, little-endian, as the first chunk lays them out
        side = min(side, 16383)
        kind = data[12:16]
        if kind == b"VP8L":
            bits = int.from_bytes(data[21:25], "little") & ~0xFFFFFFF
            bits |= (side - 1) << 14 | (side - 1)
            tile[21:25] = bits.to_bytes(4, "little")
        elif kind == b"VP8X":
            tile[24:30] = (side - 1).to_bytes(3, "little") * 2
        else:
            tile[26:30] = side.to_bytes(2, "little") * 2


def write_sparse_tiff(path: str | os.PathLike, side: int = 1_000_000, tile: int = 4096) -> None:
    """A single-level ``side`` x ``side`` RGB TIFF that stores no tile at all (every
    tile offset and byte count 0: read as empty), written by hand in a few hundred KB:
    a slide without a pyramid that declares 10^12 pixels."""
    import struct

    n = math.ceil(side / tile) ** 2
    entries = [  # (tag, type, count, value or offset); types 3 SHORT, 4 LONG
        (256, 4, 1, side),  # ImageWidth
        (257, 4, 1, side),  # ImageLength
        (258, 3, 3, None),  # BitsPerSample 8, 8, 8
        (259, 3, 1, 1),  # Compression none
        (262, 3, 1, 2),  # Photometric RGB
        (277, 3, 1, 3),  # SamplesPerPixel
        (284, 3, 1, 1),  # PlanarConfiguration contiguous
        (322, 4, 1, tile),  # TileWidth
        (323, 4, 1, tile),  # TileLength
        (324, 4, n, None),  # TileOffsets
        (325, 4, n, None),  # TileByteCounts
    ]
    ifd = 8  # SHORT values sit in the low bytes of their field (little-endian)
    extra = ifd + 2 + 12 * len(entries) + 4
    bits_at, tables_at = extra, extra + 6
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd) + struct.pack("<H", len(entries)))
    for tag, kind, count, value in entries:
        if tag == 258:
            value = bits_at
        elif tag in (324, 325):
            value = tables_at if tag == 324 else tables_at + 4 * n
        out += struct.pack("<HHII", tag, kind, count, value)
    out += struct.pack("<I", 0) + struct.pack("<3H", 8, 8, 8)
    out += bytes(8 * n)  # every offset and byte count 0
    Path(path).write_bytes(bytes(out))

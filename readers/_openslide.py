"""OpenSlide backend: SVS, NDPI, MRXS, SCN, BIF, generic tiled TIFF, DICOM.

``openslide`` is imported when a slide is opened, not with ``readers``.
OpenSlide has no raw-tile call, so reading a tile is one ``read_region`` inside
one cell of the level's stored tile grid (``openslide.level[k].tile-height/width``),
limited to the box the patches need: OpenSlide decodes that stored tile and its
cost grows with the pixels it paints.

OpenSlide takes level-0 ``(x, y)``; the conversion happens in ``_read_tile`` only.
At a level whose downsample is not an integer, a tile's level-0 origin is not an
integer either: OpenSlide then paints the level shifted by the rounding error
(at most ``0.5 / downsample`` pixel) with bilinear interpolation. Pixels of such
levels therefore differ slightly from the stored ones; level 0 and integral
downsamples are exact.
"""

from __future__ import annotations

import numpy as np

from readers.base import Box, Level, Slide

_FALLBACK_TILE = 256
"""Read granularity for formats whose levels state no tile size."""


class OpenSlideLevel(Level):
    def __init__(self, slide: OpenSlideSlide, index: int):
        osr = slide._osr
        props = osr.properties
        w, h = osr.level_dimensions[index]
        tile = (
            int(props.get(f"openslide.level[{index}].tile-height", _FALLBACK_TILE)),
            int(props.get(f"openslide.level[{index}].tile-width", _FALLBACK_TILE)),
        )
        super().__init__(slide, index, (h, w), tile, osr.level_downsamples[index])
        self._osr = osr

    def _read_tile(self, ty: int, tx: int, box: Box) -> np.ndarray:
        y0, x0 = ty * self.tile_shape[0], tx * self.tile_shape[1]
        by, bx = box[0], box[2]
        if (
            not ((y0 + by) * self.downsample).is_integer()
            or not ((x0 + bx) * self.downsample).is_integer()
        ):
            # A fractional level-0 origin is resampled differently for each origin:
            # paint from the tile's own origin so every read of the tile agrees.
            by, bx = 0, 0
        location = (round((x0 + bx) * self.downsample), round((y0 + by) * self.downsample))
        region = self._osr.read_region(location, self.index, (box[3] - bx, box[1] - by))  # (x, y)
        return np.asarray(region)[box[0] - by :, box[2] - bx :]


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide; RGBA is returned as RGB."""

    backend = "openslide"

    @staticmethod
    def accepts(path: str) -> bool:
        """A file whose format OpenSlide recognises."""
        return OpenSlideSlide.vendor(path) is not None

    @staticmethod
    def vendor(path: str) -> str | None:
        """OpenSlide's name for the file's format (``"aperio"``, ``"generic-tiff"``...) or None."""
        import openslide

        try:
            return openslide.OpenSlide.detect_format(path)
        except Exception:  # detect_format raises on unreadable files in some versions
            return None

    _osr = None  # the openslide.OpenSlide handle while open

    def _open(self) -> None:
        import openslide

        self._osr = openslide.OpenSlide(self.path)
        self.properties = dict(self._osr.properties)
        if {openslide.PROPERTY_NAME_MPP_Y, openslide.PROPERTY_NAME_MPP_X} <= self.properties.keys():
            self.mpp = (
                float(self.properties[openslide.PROPERTY_NAME_MPP_Y]),
                float(self.properties[openslide.PROPERTY_NAME_MPP_X]),
            )
        self.levels.extend(OpenSlideLevel(self, k) for k in range(self._osr.level_count))

    def _close(self) -> None:
        if self._osr is not None:
            self._osr.close()
            self._osr = None

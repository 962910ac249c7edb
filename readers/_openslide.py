"""OpenSlide backend: SVS, NDPI, MRXS, SCN, BIF, generic tiled TIFF, DICOM.

``openslide`` is imported when a slide is opened, not with ``readers``.
OpenSlide has no raw-tile call, so a "tile" here is one ``read_region`` over the
level's stored tile grid (``openslide.level[k].tile-height/width``), which
OpenSlide serves by decoding that stored tile alone.

OpenSlide takes level-0 ``(x, y)``; the conversion happens in ``_read_tile`` only.
At a level whose downsample is not an integer, a tile's level-0 origin is not an
integer either: OpenSlide then paints the level shifted by the rounding error
(at most ``0.5 / downsample`` pixel) with bilinear interpolation. Pixels of such
levels therefore differ slightly from the stored ones; level 0 and integral
downsamples are exact.
"""

from __future__ import annotations

import os

import numpy as np

from readers.base import Level, Slide
from readers.errors import SlideError

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
        super().__init__(slide, index, (h, w, 3), osr.level_downsamples[index], tile)
        self._osr = osr

    def _read_tile(self, ty: int, tx: int) -> np.ndarray:
        th, tw = self.tile_shape
        h, w = min(th, self.shape[0] - ty * th), min(tw, self.shape[1] - tx * tw)
        x0 = round(tx * tw * self.downsample)
        y0 = round(ty * th * self.downsample)
        region = self._osr.read_region((x0, y0), self.index, (w, h))  # (x, y), (w, h)
        return np.asarray(region)


class OpenSlideSlide(Slide):
    """A slide read through OpenSlide; RGBA is returned as RGB."""

    backend = "openslide"

    @staticmethod
    def accepts(path: str) -> bool:
        """A file whose format OpenSlide recognises."""
        import openslide

        try:
            return openslide.OpenSlide.detect_format(path) is not None
        except Exception:  # detect_format raises on unreadable files in some versions
            return False

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import openslide

        path = os.fspath(path)
        try:
            self._osr = openslide.OpenSlide(path)
        except openslide.OpenSlideError as exc:
            raise SlideError(path, f"OpenSlide cannot open it: {exc}") from exc
        try:
            props = dict(self._osr.properties)
            mpp = None
            if openslide.PROPERTY_NAME_MPP_X in props and openslide.PROPERTY_NAME_MPP_Y in props:
                mpp = (
                    float(props[openslide.PROPERTY_NAME_MPP_Y]),
                    float(props[openslide.PROPERTY_NAME_MPP_X]),
                )
            levels = [OpenSlideLevel(self, k) for k in range(self._osr.level_count)]
            super().__init__(path, levels, mpp, props, threads)
        except openslide.OpenSlideError as exc:
            self.close()
            raise SlideError(path, f"OpenSlide cannot read it: {exc}") from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if getattr(self, "_osr", None) is not None:
            self._osr.close()
            self._osr = None

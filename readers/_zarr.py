"""Zarr backend: OME-Zarr multiscale pyramids (NGFF 0.4 and 0.5) and plain arrays.

The axes are taken from the multiscale metadata; any order of ``y``, ``x`` and
``c`` is read (``synthetic.write_ome_zarr`` writes ``c, y, x``, the NGFF order).
A plain Zarr array ``[H, W, C]`` (or ``[H, W]``) is a one-level slide. One stored
chunk is one tile.
"""

from __future__ import annotations

import os

import numpy as np
import zarr

from readers.base import Box, Level, Slide
from readers.errors import SlideError

_UM_PER_UNIT = {"nanometer": 1e-3, "micrometer": 1.0, "millimeter": 1e3, "centimeter": 1e4}


class ZarrLevel(Level):
    def __init__(
        self, slide: ZarrSlide, index: int, array: zarr.Array, axes: str, downsample: float
    ):
        if set(axes) - {"c"} != {"y", "x"} or array.ndim != len(axes):
            raise SlideError(
                slide.path,
                f"unsupported axes {axes!r} for an array of shape "
                f"{array.shape} (expected y, x and optionally c)",
            )
        if array.dtype != np.uint8:
            raise SlideError(slide.path, f"unsupported dtype {array.dtype} (expected uint8)")
        size = dict(zip(axes, array.shape, strict=True))
        chunk = dict(zip(axes, array.chunks, strict=True))
        super().__init__(
            slide, index, (size["y"], size["x"], 3), downsample, (chunk["y"], chunk["x"])
        )
        self._array = array
        self._axes = axes
        self._to_yxc = [axes.index(a) for a in "yxc" if a in axes]

    def _read_tile(self, ty: int, tx: int, box: Box) -> np.ndarray:
        y, x = ty * self.tile_shape[0], tx * self.tile_shape[1]
        bounds = {
            "y": slice(y + box[0], y + box[1]),
            "x": slice(x + box[2], x + box[3]),
            "c": slice(None),
        }
        return self._array[tuple(bounds[a] for a in self._axes)].transpose(self._to_yxc)


class ZarrSlide(Slide):
    """An OME-Zarr multiscale image (first multiscale) or a plain Zarr array."""

    backend = "zarr"

    @staticmethod
    def accepts(path: str) -> bool:
        """A directory or a path ending in ``.zarr``."""
        return os.path.isdir(path) or path.rstrip("/").endswith(".zarr")

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        path = os.fspath(path)
        try:
            node = zarr.open(path, mode="r")
        except Exception as exc:
            raise SlideError(path, f"not a Zarr array or group: {exc}") from exc
        if isinstance(node, zarr.Array):
            axes = "yxc" if node.ndim == 3 else "yx"
            levels = [ZarrLevel(self, 0, node, axes, 1.0)]
            super().__init__(
                path, levels, None, {"zarr.format": str(node.metadata.zarr_format)}, threads
            )
            return
        attrs = node.attrs.asdict()
        meta = attrs.get("ome", attrs)  # NGFF 0.5 nests under "ome"; 0.4 does not
        if not meta.get("multiscales"):
            raise SlideError(path, "a Zarr group without OME multiscales metadata")
        multiscale = meta["multiscales"][0]
        axes_meta = multiscale["axes"]
        axes = "".join(a["name"] if isinstance(a, dict) else a for a in axes_meta)
        scales = [_scale(d) for d in multiscale["datasets"]]
        try:
            arrays = [node[d["path"]] for d in multiscale["datasets"]]
        except KeyError as exc:
            raise SlideError(path, f"multiscales names a missing dataset {exc}") from exc
        iy, ix = axes.index("y"), axes.index("x")
        levels = []
        for k, array in enumerate(arrays):
            if scales[k] is not None and scales[0] is not None:
                ds = (scales[k][iy] / scales[0][iy] + scales[k][ix] / scales[0][ix]) / 2
            else:
                ds = (
                    arrays[0].shape[iy] / array.shape[iy] + arrays[0].shape[ix] / array.shape[ix]
                ) / 2
            levels.append(ZarrLevel(self, k, array, axes, ds))
        props = {
            "ome.version": str(meta.get("version", multiscale.get("version", ""))),
            "ome.name": str(multiscale.get("name", "")),
        }
        super().__init__(path, levels, _mpp(axes_meta, scales[0], iy, ix), props, threads)


def _scale(dataset: dict) -> list[float] | None:
    for transform in dataset.get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            return [float(v) for v in transform["scale"]]
    return None


def _mpp(
    axes_meta: list, scale: list[float] | None, iy: int, ix: int
) -> tuple[float, float] | None:
    if scale is None or not all(isinstance(a, dict) for a in axes_meta):
        return None
    units = [_UM_PER_UNIT.get(axes_meta[i].get("unit")) for i in (iy, ix)]
    if None in units:
        return None
    return scale[iy] * units[0], scale[ix] * units[1]

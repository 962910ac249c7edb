"""Zarr backend: OME-Zarr multiscale pyramids (NGFF 0.4 and 0.5) and plain arrays.

The axes are taken from the multiscale metadata; any order of ``y``, ``x`` and
``c`` is read (``readers.testing.write_ome_zarr`` writes ``c, y, x``, the NGFF order).
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
    """A level backed by one Zarr array; one stored chunk is one tile.

    ``axes`` names the array's dimensions in order, e.g. ``"cyx"`` for
    ``uint8 [C, H, W]``: ``y`` and ``x`` once each, ``c`` (1, 3 or 4 channels) optional.
    """

    def __init__(
        self,
        slide: ZarrSlide,
        index: int,
        array: zarr.Array,
        axes: str,
        downsample: float | None = None,
    ):
        if array.ndim != len(axes):
            raise SlideError(
                slide.path,
                f"level {index} array has shape {array.shape}, expected one dimension "
                f"per axis {axes!r}",
            )
        if array.dtype != np.uint8:
            raise SlideError(
                slide.path, f"level {index} array has dtype {array.dtype}, expected uint8"
            )
        size = dict(zip(axes, array.shape, strict=True))
        if size.get("c", 1) not in (1, 3, 4):
            raise SlideError(
                slide.path, f"level {index} array has {size['c']} channels, expected 1, 3 or 4"
            )
        chunk = dict(zip(axes, array.chunks, strict=True))
        super().__init__(slide, index, (size["y"], size["x"]), (chunk["y"], chunk["x"]), downsample)
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

    def _open(self) -> None:
        try:
            node = zarr.open(self.path, mode="r")
        except Exception as exc:
            raise SlideError(self.path, f"not a Zarr array or group: {exc}") from exc
        if isinstance(node, zarr.Array):
            if node.ndim not in (2, 3):
                raise SlideError(
                    self.path,
                    f"array has shape {node.shape}, expected [H, W] or [H, W, C]",
                )
            self.properties = {"zarr.format": str(node.metadata.zarr_format)}
            self.levels.append(ZarrLevel(self, 0, node, "yxc"[: node.ndim]))
            return
        attrs = node.attrs.asdict()
        meta = attrs.get("ome", attrs)  # NGFF 0.5 nests under "ome"; 0.4 does not
        multiscale = _first_multiscale(self.path, meta)
        axes = _axis_names(self.path, multiscale)
        arrays = [_dataset(self.path, node, d) for d in multiscale["datasets"]]
        scales = [_scale(self.path, d, len(axes)) for d in multiscale["datasets"]]
        iy, ix = axes.index("y"), axes.index("x")
        for k, array in enumerate(arrays):
            ds = None  # no stored pixel sizes: Level takes the ratio of the shapes
            if scales[k] is not None and scales[0] is not None:
                ds = Level.mean_ratio(
                    (scales[k][iy], scales[k][ix]), (scales[0][iy], scales[0][ix])
                )
            self.levels.append(ZarrLevel(self, k, array, axes, ds))
        self.mpp = _mpp(multiscale["axes"], scales[0], iy, ix)
        self.properties = {
            "ome.version": str(meta.get("version", multiscale.get("version", ""))),
            "ome.name": str(multiscale.get("name", "")),
        }


def _first_multiscale(path: str, meta: dict) -> dict:
    """The first entry of OME ``multiscales``, with a non-empty list of ``datasets``."""
    multiscales = meta.get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        raise SlideError(path, "a Zarr group without OME multiscales metadata")
    multiscale = multiscales[0]
    datasets = multiscale.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise SlideError(path, "OME multiscales metadata without datasets")
    return multiscale


def _axis_names(path: str, multiscale: dict) -> str:
    """The axes as one letter each, e.g. ``"cyx"``: NGFF 0.4+ dicts or 0.3 strings."""
    axes = multiscale.get("axes")
    if not isinstance(axes, list):
        raise SlideError(path, "OME multiscales metadata without axes (NGFF 0.3 or later)")
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    if not all(isinstance(n, str) for n in names) or sorted(names) not in (
        ["x", "y"],
        ["c", "x", "y"],
    ):
        raise SlideError(path, f"unsupported axes {axes!r} (expected y, x and optionally c)")
    return "".join(names)


def _dataset(path: str, group: zarr.Group, dataset: object) -> zarr.Array:
    """The array a ``multiscales`` dataset entry names."""
    name = dataset.get("path") if isinstance(dataset, dict) else None
    if not isinstance(name, str):
        raise SlideError(path, f"multiscales dataset {dataset!r} has no path")
    try:
        array = group[name]
    except KeyError:
        raise SlideError(path, f"multiscales names a missing dataset {name!r}") from None
    if not isinstance(array, zarr.Array):
        raise SlideError(path, f"multiscales dataset {name!r} is a group, not an array")
    return array


def _scale(path: str, dataset: dict, ndim: int) -> list[float] | None:
    """The dataset's ``scale`` transform, one positive number per axis, or None."""
    for transform in dataset.get("coordinateTransformations", []):
        if isinstance(transform, dict) and transform.get("type") == "scale":
            scale = transform.get("scale")
            if (
                not isinstance(scale, list)
                or len(scale) != ndim
                or not all(isinstance(v, (int, float)) and v > 0 for v in scale)
            ):
                raise SlideError(
                    path,
                    f"dataset {dataset['path']!r} has scale {scale!r}, "
                    f"expected {ndim} positive numbers",
                )
            return [float(v) for v in scale]
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

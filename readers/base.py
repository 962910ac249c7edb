"""``Slide`` and ``Level``: everything the backends share.

A backend subclasses :class:`Slide` (``_open``: open the file, build its levels,
give the metadata; ``_close``) and :class:`Level` (decode one stored tile,
``_read_tile``). Opening (base state, errors as :class:`SlideError`, cleanup on
failure), validation, clipping, ``fill`` outside the image, tile bookkeeping, the
Dask batching, the low-resolution view and pickling all live here, once.

Conventions (``readers._types``): locations are ``(y, x)``, sizes ``(h, w)``,
images are ``uint8 [h, w, 3]`` RGB.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from abc import ABC, abstractmethod
from collections import defaultdict
from typing import Any, ClassVar

import numpy as np

from readers._types import HW, HWC, YX, as_hw, as_int, as_yx
from readers.errors import SlideError
from readers.limits import Limits, over
from readers.pool import run_each

Box = tuple[int, int, int, int]
"""Rows and columns ``(y0, y1, x0, x1)`` of a tile, relative to its top-left corner."""

# A paste job: (patch index, patch rows, patch cols, tile rows, tile cols),
# each a (start, stop) pair, copying tile[rows, cols] into patches[i, rows, cols].
_Paste = tuple[int, int, int, int, int, int, int, int, int]

STREAM_BLOCK = 1024
"""Side (level pixels, rounded down to whole tiles) of one block streamed by ``downsampled``."""


def default_threads() -> int:
    """Threads used to decode tiles when a slide is opened without ``threads=``."""
    return max(1, min(8, os.cpu_count() or 1))


def _as_offsets(offsets: Any) -> np.ndarray:
    arr = np.asarray(offsets)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"offsets must have shape [N, 2] (y, x), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"offsets must be integers (y, x), got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_fill(fill: Any) -> int:
    fill = as_int(fill, "fill")
    if not 0 <= fill <= 255:
        raise ValueError(f"fill must be an int in [0, 255], got {fill!r}")
    return fill


def _as_rgb(tile: np.ndarray) -> np.ndarray:
    """``uint8 [h, w, C]`` with C in 1, 3, 4 (or ``[h, w]``) -> ``uint8 [h, w, 3]``."""
    if tile.ndim == 2:
        tile = tile[:, :, None]
    if tile.shape[2] == 1:
        return np.repeat(tile, 3, axis=2)
    # RGBA (OpenSlide): the alpha channel is dropped, as OpenSlide's own RGB
    # conversion does for opaque pixels.
    return tile[:, :, :3]


def _grid(extent: int, tile: int) -> tuple[int, ...]:
    return (tile,) * (extent // tile) + ((extent % tile,) if extent % tile else ())


class Level(ABC):
    """One resolution level of a slide.

    Attributes:
        shape: ``(H, W, C)`` of the level, ``C == 3`` (RGB).
        downsample: level-0 pixels per pixel of this level, as the file stores it or,
            when the file stores none, the mean of the height and width ratios to
            level 0 (OpenSlide's rule). Never assumed to be a power of two.
        tile_shape: ``(h, w)`` of the stored tiles (strips count as tiles).
        index: position in ``slide.levels``.
    """

    def __init__(
        self,
        slide: Slide,
        index: int,
        shape: HW | HWC,
        tile_shape: HW,
        downsample: float | None = None,
    ):
        """``shape`` and ``tile_shape`` start with ``(h, w)``; ``downsample`` as the file
        stores it, or ``None`` when it stores none: then the mean of the ratios of
        ``slide.levels[0]`` (built first, so already appended) to ``shape``.
        """
        if min(shape[0], shape[1], tile_shape[0], tile_shape[1]) < 1:
            raise SlideError(
                slide.path,
                f"level {index} has shape {tuple(shape[:2])} and tiles {tuple(tile_shape)}, "
                f"expected positive heights and widths",
            )
        limits = slide.limits
        if over(max(shape[0], shape[1]), limits.side):
            raise SlideError(
                slide.path,
                f"level {index} is {shape[0]} x {shape[1]} pixels, more than the limit of "
                f"{limits.side} per side (readers.Limits.side)",
            )
        if over(tile_shape[0] * tile_shape[1], limits.tile_pixels):
            raise SlideError(
                slide.path,
                f"level {index} has tiles of {tile_shape[0]} x {tile_shape[1]} pixels, more "
                f"than the limit of {limits.tile_pixels} (readers.Limits.tile_pixels)",
            )
        self.slide = slide
        self.index = index
        self.shape: HWC = (int(shape[0]), int(shape[1]), 3)
        self.tile_shape: HW = (int(tile_shape[0]), int(tile_shape[1]))
        if downsample is None:
            level0 = self.shape if index == 0 else slide.levels[0].shape
            downsample = Level.mean_ratio(level0[:2], self.shape[:2])
        self.downsample = float(downsample)

    @staticmethod
    def mean_ratio(numerator: tuple[float, float], denominator: tuple[float, float]) -> float:
        """A downsample as OpenSlide computes it: the mean of the ``y`` and ``x`` ratios.

        From level sizes ``(h, w)``, level 0 over the level: level 0
        ``(1001, 1303)`` and a level ``(501, 652)`` give ``mean_ratio((1001, 1303),
        (501, 652)) = (1001 / 501 + 1303 / 652) / 2 = 1.9982``, not 2. From pixel
        sizes ``(y, x)`` (OME-Zarr ``scale``), the level over level 0.
        """
        return (numerator[0] / denominator[0] + numerator[1] / denominator[1]) / 2

    @abstractmethod
    def _read_tile(self, ty: int, tx: int, box: Box) -> np.ndarray | None:
        """Decode stored tile ``(ty, tx)`` (row, column of the tile grid); return ``box`` of it.

        ``box = (y0, y1, x0, x1)`` are rows and columns relative to the tile's
        top-left corner, inside the level. Returns ``uint8 [y1 - y0, x1 - x0, C]``
        (C in 1, 3, 4; or ``[h, w]``), or ``None`` for a tile the file does not
        store (read as ``fill``). Backends that decode whole tiles crop; OpenSlide
        paints just the box, its cost growing with the pixels painted.
        """

    def __repr__(self) -> str:
        return (
            f"Level({self.index}, shape={self.shape}, downsample={self.downsample:.6g}, "
            f"tile_shape={self.tile_shape})"
        )

    def __reduce__(self):
        return (_level_of, (self.slide, self.index))

    @property
    def grid_shape(self) -> HW:
        """Number of stored tiles ``(rows, cols)``."""
        return (
            math.ceil(self.shape[0] / self.tile_shape[0]),
            math.ceil(self.shape[1] / self.tile_shape[1]),
        )

    def tile(self, ty: int, tx: int, box: Box | None = None) -> np.ndarray | None:
        """Stored tile ``(ty, tx)``, or its ``box`` (as in ``_read_tile``), or ``None``.

        Returns ``uint8 [h, w, 3]``: the tile cropped to the level by default.
        Any decoding failure becomes a :class:`SlideError` naming the level and tile.
        """
        if self.slide.closed:
            raise ValueError(f"{self.slide.path}: the slide is closed")
        if box is None:
            th, tw = self.tile_shape
            box = (0, min(th, self.shape[0] - ty * th), 0, min(tw, self.shape[1] - tx * tw))
        self.slide.check_time(f"level {self.index} tile (y={ty}, x={tx})")
        try:
            data = self._read_tile(ty, tx, box)
        except SlideError:
            raise
        except Exception as exc:  # decoders raise anything: name the file, level, tile
            raise SlideError(
                self.slide.path,
                f"cannot decode level {self.index} tile (y={ty}, x={tx}): "
                f"{type(exc).__name__}: {exc}",
            ) from exc
        if data is None:
            return None
        if data.ndim not in (2, 3) or data.shape[:2] != (box[1] - box[0], box[3] - box[2]):
            raise SlideError(
                self.slide.path,
                f"level {self.index} tile (y={ty}, x={tx}) decoded to shape {data.shape}, "
                f"expected ({box[1] - box[0]}, {box[3] - box[2]}, C)",
            )
        return _as_rgb(np.asarray(data, dtype=np.uint8))

    def read_patches(self, offsets: Any, size: HW, fill: int = 0) -> np.ndarray:
        """Patches of this level, decoding only the stored tiles they touch.

        Args:
            offsets: ``int [N, 2]`` top-left corners ``(y, x)`` in this level's pixel
                grid; may lie partly or wholly outside the level.
            size: ``(h, w)`` of every patch, any size (larger than a tile is fine);
                ints of any integer type (``numpy.int64``), not floats.
            fill: value of the pixels outside the level, an int in ``[0, 255]``.

        Returns:
            ``uint8 [N, h, w, 3]`` RGB.

        Each touched tile is decoded once per call, whatever the number of patches
        sharing it, on ``slide.threads`` threads: the caller and helpers of the
        process's decode pool (``readers.pool``), each taking the next tile, so a
        call inside a Dask worker stays in-process and starts no thread.
        """
        offsets = _as_offsets(offsets)
        h, w = as_hw(size)
        out = np.full((len(offsets), h, w, 3), _as_fill(fill), dtype=np.uint8)
        jobs = self._paste_jobs(offsets, h, w)
        if not jobs:
            return out

        def paste(key: YX) -> None:
            # Threads write disjoint (patch, rows, cols) regions of `out`; only the part
            # of the tile some patch needs is returned (and painted).
            box = (
                min(job[5] for job in jobs[key]),
                max(job[6] for job in jobs[key]),
                min(job[7] for job in jobs[key]),
                max(job[8] for job in jobs[key]),
            )
            data = self.tile(*key, box)
            if data is None:
                return
            for i, py0, py1, px0, px1, ty0, ty1, tx0, tx1 in jobs[key]:
                out[i, py0:py1, px0:px1] = data[
                    ty0 - box[0] : ty1 - box[0], tx0 - box[2] : tx1 - box[2]
                ]

        # Row-major: neighbouring tiles share file pages.
        run_each(paste, sorted(jobs), self.slide.threads)
        return out

    def _paste_jobs(self, offsets: np.ndarray, h: int, w: int) -> dict[YX, list[_Paste]]:
        """For each touched tile, where its pixels go in which patches."""
        th, tw = self.tile_shape
        H, W = self.shape[:2]
        y0 = np.clip(offsets[:, 0], 0, H)
        y1 = np.clip(offsets[:, 0] + h, 0, H)
        x0 = np.clip(offsets[:, 1], 0, W)
        x1 = np.clip(offsets[:, 1] + w, 0, W)
        jobs: dict[YX, list[_Paste]] = defaultdict(list)
        for i in np.flatnonzero((y1 > y0) & (x1 > x0)).tolist():
            oy, ox = int(offsets[i, 0]), int(offsets[i, 1])
            for ty in range(int(y0[i]) // th, (int(y1[i]) - 1) // th + 1):
                ry0, ry1 = max(int(y0[i]), ty * th), min(int(y1[i]), (ty + 1) * th)
                for tx in range(int(x0[i]) // tw, (int(x1[i]) - 1) // tw + 1):
                    rx0, rx1 = max(int(x0[i]), tx * tw), min(int(x1[i]), (tx + 1) * tw)
                    jobs[(ty, tx)].append(
                        (
                            i,
                            ry0 - oy,
                            ry1 - oy,
                            rx0 - ox,
                            rx1 - ox,
                            ry0 - ty * th,
                            ry1 - ty * th,
                            rx0 - tx * tw,
                            rx1 - tx * tw,
                        )
                    )
        return jobs

    def to_dask(self):
        """The whole level as a lazy ``dask.array`` ``uint8 [H, W, 3]``, one chunk per tile.

        Nothing is decoded until computed; the graph is blockwise (not
        materialised per tile), so building it costs nothing for huge levels.
        """
        import dask.array as da

        chunks = (
            _grid(self.shape[0], self.tile_shape[0]),
            _grid(self.shape[1], self.tile_shape[1]),
            (3,),
        )
        return da.map_blocks(
            _TileBlock(self),
            dtype=np.uint8,
            chunks=chunks,
            meta=np.empty((0, 0, 0), np.uint8),
            name=f"level-{self.index}-{uuid.uuid4().hex}",
        )

    def downsampled(self, factor: int) -> np.ndarray:
        """The level reduced by an integer ``factor`` (mean of ``factor x factor`` blocks).

        Returns ``uint8 [ceil(H / factor), ceil(W / factor), 3]``; blocks at the
        right and bottom edges average only the pixels inside the level. Streamed:
        the level is read in tile-aligned blocks of about ``1024 x 1024`` pixels,
        each tile decoded once, summed into the output; memory is bounded by the
        output and one block, never by the level.
        """
        factor = as_int(factor, "factor")
        if factor < 1:
            raise ValueError(f"factor must be an int >= 1, got {factor!r}")
        H, W = self.shape[:2]
        th, tw = self.tile_shape
        sums = np.zeros((math.ceil(H / factor), math.ceil(W / factor), 3), np.uint64)
        bh, bw = th * max(1, STREAM_BLOCK // th), tw * max(1, STREAM_BLOCK // tw)
        for y in range(0, H, bh):
            for x in range(0, W, bw):
                block = self.read_patches([[y, x]], (min(bh, H - y), min(bw, W - x)))[0]
                rows, cols = (
                    _bin_starts(y, block.shape[0], factor),
                    _bin_starts(x, block.shape[1], factor),
                )
                # Summed in uint64 without a uint64 copy of the block (8x its bytes).
                part = np.add.reduceat(np.add.reduceat(block, rows, 0, dtype=np.uint64), cols, 1)
                r0, c0 = (y + rows[0]) // factor, (x + cols[0]) // factor
                sums[r0 : r0 + len(rows), c0 : c0 + len(cols)] += part
        rows = np.minimum(factor, H - factor * np.arange(sums.shape[0]))
        cols = np.minimum(factor, W - factor * np.arange(sums.shape[1]))
        return np.rint(sums / (rows[:, None, None] * cols[None, :, None])).astype(np.uint8)


def _bin_starts(start: int, length: int, factor: int) -> np.ndarray:
    """Indices in ``[0, length)`` where pixel ``start + i`` begins a new ``factor``-bin."""
    return np.unique(np.r_[0, np.arange((-start) % factor, length, factor)])


class _TileBlock:
    """The ``map_blocks`` function of ``Level.to_dask``: chunk ``block_id`` = tile."""

    def __init__(self, level: Level):
        self.level = level

    def __call__(self, block_id: tuple[int, int, int]) -> np.ndarray:
        ty, tx = block_id[0], block_id[1]
        th, tw = self.level.tile_shape
        data = self.level.tile(ty, tx)
        if data is None:
            h = min(th, self.level.shape[0] - ty * th)
            w = min(tw, self.level.shape[1] - tx * tw)
            return np.zeros((h, w, 3), np.uint8)
        return data


def _level_of(slide: Slide, index: int) -> Level:
    return slide.levels[index]


def _reopen(cls: type[Slide], path: str, options: dict[str, Any]) -> Slide:
    return cls(path, **options)


class Slide(ABC):
    """A whole-slide image opened lazily; nothing is decoded until asked for.

    Attributes:
        path: the file or directory.
        backend: name of the backend that opened it (``"openslide"``, ``"tifffile"``,
            ``"zarr"``).
        levels: tuple of the resolution levels, level 0 (full resolution) first.
        mpp: ``(y, x)`` microns per level-0 pixel, or ``None`` when the file does not say.
        properties: ``dict[str, str]`` of the file's metadata.
        threads: threads used to decode the tiles of one ``read_patches`` call.
        limits: the ``readers.Limits`` the file is held to (tile size, level size,
            thumbnail streaming, read time).

    A slide is a context manager; it pickles as ``(backend class, path, options)``
    and reopens the file when unpickled (file handles are never pickled), so it
    can be sent to Dask workers.
    """

    backend: ClassVar[str]

    def __init__(
        self, path: str | os.PathLike, threads: int | None = None, limits: Limits | None = None
    ):
        """Open ``path``: the base state first, then the backend's ``_open``.

        ``limits`` bound what the file may cost (``readers.Limits``; the defaults
        when ``None``): a file over one raises :class:`SlideError` naming it.

        Anything ``_open`` raises becomes a :class:`SlideError` naming the path and,
        in its reason, the backend (``"zarr: array has dtype float32, expected
        uint8"``); the handles opened so far are closed.
        """
        if threads is not None:
            threads = as_int(threads, "threads")
            if threads < 1:
                raise ValueError(f"threads must be a positive int or None, got {threads!r}")
        if limits is not None and not isinstance(limits, Limits):
            raise TypeError(f"limits must be a readers.Limits or None, got {limits!r}")
        self.path = os.fspath(path)
        self.threads = threads or default_threads()
        self.limits = limits or Limits()
        self._deadline = self.limits.deadline()
        self._options: dict[str, Any] = {"threads": threads, "limits": limits}
        self.closed = False
        self.mpp: tuple[float, float] | None = None
        self.properties: dict[str, str] = {}
        # A list while ``_open`` appends to it, level 0 first; a tuple once open.
        self.levels: list[Level] | tuple[Level, ...] = []
        try:
            self._open()
            if not self.levels:
                raise SlideError(self.path, "the file holds no image level")
        except SlideError as exc:
            self.close()
            raise SlideError(self.path, f"{self.backend}: {exc.reason}") from exc
        except Exception as exc:  # libraries raise anything on a malformed file
            self.close()
            raise SlideError(self.path, f"{self.backend}: {type(exc).__name__}: {exc}") from exc
        except BaseException:  # KeyboardInterrupt...: still release the handles
            self.close()
            raise
        self.levels = tuple(self.levels)

    @abstractmethod
    def _open(self) -> None:
        """Open ``self.path``: append the levels to ``self.levels``, set ``mpp``, ``properties``.

        Called once by ``__init__`` with the base state set. Raise :class:`SlideError`
        (``self.path`` and a reason, without the backend name) for what the file lacks;
        anything else raised is wrapped the same way. Handles opened here are
        released by ``_close``, also when ``_open`` fails half-way.
        """

    @staticmethod
    @abstractmethod
    def accepts(path: str) -> bool:
        """Cheap check that this backend may read ``path`` (for ``backend="auto"``)."""

    def close(self) -> None:
        """Release the file handles (idempotent); later reads raise ``ValueError``."""
        self.closed = True
        self._close()

    def _close(self) -> None:  # noqa: B027 - backends without handles keep the no-op
        """Release the backend's handles."""

    def start_clock(self) -> None:
        """Restart the ``limits.seconds`` clock: later reads get the whole limit again
        (a slide read ahead, then used, gets it once for each stage)."""
        self._deadline = self.limits.deadline()

    def check_time(self, what: str) -> None:
        """Raise :class:`SlideError` when the ``limits.seconds`` clock has run out;
        ``what`` names the read that was about to start."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise SlideError(
                self.path,
                f"reading took more than the time limit of {self.limits.seconds:g} s "
                f"(stopped before {what})",
            )

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __reduce__(self):
        return (_reopen, (type(self), self.path, self._options))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.path!r}, backend={self.backend!r}, shape={self.shape}, "
            f"levels={len(self.levels)}, mpp={self.mpp})"
        )

    @property
    def shape(self) -> HWC:
        """Level-0 ``(H, W, C)``."""
        return self.levels[0].shape

    def read_patches(self, offsets: Any, size: HW, fill: int = 0) -> np.ndarray:
        """``levels[0].read_patches``: lets a slide serve as a high-resolution input."""
        return self.levels[0].read_patches(offsets, size, fill)

    def _level(self, level: int) -> Level:
        index = as_int(level, "level")
        if not 0 <= index < len(self.levels):
            raise ValueError(f"level must be an int in [0, {len(self.levels) - 1}], got {level!r}")
        return self.levels[index]

    def read_region(self, location: YX, level: int, size: HW) -> np.ndarray:
        """A region, OpenSlide's convention in ``(y, x)`` order.

        Args:
            location: ``(y, x)`` top-left in **level-0** pixels; the level's pixel
                is ``floor(location / level.downsample)``. Example: at a level of
                downsample 4.0, ``location=(4000, 800)`` starts at level pixel (1000, 200).
            level: index into ``levels``.
            size: ``(h, w)`` in **the level's** pixels.

        ``location``, ``level`` and ``size`` take any integer type (``numpy.int64``);
        a float is a ``TypeError`` (a location ``(1.7, 0)`` is not pixel 1).

        Returns:
            ``uint8 [h, w, 3]`` RGB, 0 outside the slide.
        """
        lvl = self._level(level)
        y, x = as_yx(location)
        origin = [[math.floor(y / lvl.downsample), math.floor(x / lvl.downsample)]]
        return lvl.read_patches(origin, size)[0]

    def level_for_downsample(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample is at most ``downsample``.

        (OpenSlide's ``get_best_level_for_downsample``; level 0 when none is.)
        """
        if not downsample > 0:
            raise ValueError(f"downsample must be > 0, got {downsample!r}")
        best = 0
        for level in self.levels:
            if level.downsample <= downsample * (1 + 1e-9):
                best = level.index
        return best

    def level_for_mpp(self, mpp: float) -> int:
        """Index of the coarsest level whose pixels are at most ``mpp`` microns wide.

        Raises ``ValueError`` when the slide does not state its microns per pixel.
        """
        if self.mpp is None:
            raise ValueError(f"{self.path}: the file states no microns per pixel")
        return self.level_for_downsample(mpp / (sum(self.mpp) / 2))

    def thumbnail(self, max_size: HW) -> np.ndarray:
        """A low-resolution view of the whole slide fitting in ``max_size`` ``(h, w)`` (ints).

        Returns ``uint8 [h, w, 3]`` with ``h <= max_size[0]``, ``w <= max_size[1]``
        and the slide's aspect ratio (``h, w = round(H / d), round(W / d)`` for one
        downsample ``d >= 1``). It is reduced from the coarsest stored level that is
        at least as fine; when that level is much larger (a slide without a pyramid),
        it is first block-averaged in streamed blocks (``Level.downsampled``), so
        memory stays bounded by the output, never by the level. A level to stream
        over ``limits.stream_pixels`` is a :class:`SlideError`.

        A stored level that fits in ``max_size`` and reaches it in one dimension
        is returned as stored: ``thumbnail(level.shape[:2])`` is that whole level
        (its size may differ from ``round(H / d)`` by rounding of the level sizes).
        """
        mh, mw = as_hw(max_size, "max_size")
        for level in self.levels:
            h, w = level.shape[:2]
            if h <= mh and w <= mw and (h == mh or w == mw):
                return level.downsampled(1)
        H, W = self.shape[:2]
        d = max(H / mh, W / mw, 1.0)
        out_hw = (max(1, min(mh, round(H / d))), max(1, min(mw, round(W / d))))
        level = self.levels[self.level_for_downsample(d)]
        pixels = level.shape[0] * level.shape[1]
        if over(pixels, self.limits.stream_pixels):
            raise SlideError(
                self.path,
                f"a thumbnail would stream level {level.index} of {level.shape[0]} x "
                f"{level.shape[1]} pixels (no coarser level stored), more than the limit "
                f"of {self.limits.stream_pixels} pixels (readers.Limits.stream_pixels)",
            )
        factor = max(1, int(d / level.downsample))
        small = level.downsampled(factor)
        if small.shape[:2] == out_hw:
            return small
        from PIL import Image

        resized = Image.fromarray(small).resize(out_hw[::-1], Image.Resampling.BOX)
        return np.array(resized)  # writable, unlike a view of the PIL buffer

"""A slide made ready for the classifier: its attention view and its patch level.

The attention view is the slide's thumbnail (``Slide.thumbnail``, bounded memory
for any slide) plus its tissue mask; patches come from one pyramid level chosen by
index, or from a view at exactly the requested microns per pixel (``resolution``;
a slide whose mpp is unknown, and not given by the user, is a ``UserError``). The
mapping of attention cells to that level is the core's (``x_low`` size vs the level's
size), so any aspect ratio and any level downsample work.

``prefetch`` reads the next slide's view in a background thread while the caller
computes on the current one: thumbnails are mostly file reads and JPEG decoding,
which release the GIL.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from pipeline.app.config import ModelConfig
from pipeline.app.slide import resolution
from pipeline.app.slide.tissue import tissue_mask

if TYPE_CHECKING:  # readers is imported when a slide is opened
    import readers

T = TypeVar("T")


@dataclass
class SlideView:
    """What the classifier needs from one open slide.

    Attributes:
        path: the slide file.
        slide: the open ``readers.Slide`` (closed by ``close`` / the context manager).
        thumbnail: uint8 [h, w, 3], the attention view.
        tissue: bool [h, w], True on tissue (all True when the mask is off).
        patch_level: what patches are read from: a ``readers.Level``, or a
            ``resolution.ResampledLevel`` at the requested mpp.
        patch_mpp: microns per pixel of the patches (None when the slide's is unknown).
    """

    path: Path
    slide: readers.Slide
    thumbnail: np.ndarray
    tissue: np.ndarray
    patch_level: readers.Level | resolution.ResampledLevel
    patch_mpp: float | None = None

    def x_low(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``float [1, 3, h, w]`` on ``device``: the thumbnail's RGB in [0, 1]."""
        return low_res_tensor(self.thumbnail, device)

    @property
    def level0_scale(self) -> float:
        """Level-0 pixels per pixel of the patch level."""
        return float(self.patch_level.downsample)

    def close(self) -> None:
        self.slide.close()

    def __enter__(self) -> SlideView:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def low_res_tensor(thumbnail: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 [h, w, 3] thumbnail -> ``float [1, 3, h, w]`` in [0, 1] on ``device``."""
    # np.array copies: a caller's array may be read-only, and torch wants writable.
    rgb = torch.from_numpy(np.array(thumbnail[..., :3])).to(device)
    # contiguous: the same memory layout as stacked views, hence the same conv kernels.
    return (rgb.permute(2, 0, 1).float() / 255.0)[None].contiguous()


def sampling_mask(tissue: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """bool [h, w] tissue mask -> ``BoolTensor [1, h, w]`` on ``device``, or ``None``
    (sample anywhere) when it is all True (mask off) or all False: a view without
    detected tissue keeps every cell rather than an empty distribution."""
    if tissue.all() or not tissue.any():
        return None
    return torch.from_numpy(np.array(tissue, dtype=bool))[None].to(device)


MAX_VIEW_PIXELS = 4096 * 4096
"""Largest attention view read when a level is asked for by index or mpp."""


def choose_level(slide: readers.Slide, index: int, what: str) -> readers.Level:
    """Level ``index`` of ``slide``; ``what`` names its use in the error."""
    if index >= len(slide.levels):
        raise ValueError(
            f"{slide.path}: {what} level {index} requested, "
            f"the slide has levels 0..{len(slide.levels) - 1}"
        )
    return slide.levels[index]


def attention_view(slide: readers.Slide, config: ModelConfig, mpp0: float | None) -> np.ndarray:
    """The attention view, uint8 [h, w, 3]: the thumbnail of longer side
    ``low_res_max_side``; the whole slide at exactly ``low_res_mpp`` microns per
    pixel (``mpp0`` is the slide's level-0 mpp) or the whole level ``low_res_level``
    when either is set (at most ``MAX_VIEW_PIXELS``)."""
    if config.low_res_mpp is not None:
        mpp0 = resolution.require_mpp(mpp0, slide.path, "--low-res-mpp", config.low_res_mpp)
        h, w = resolution.view_shape(slide, mpp0, config.low_res_mpp)
        what = f"at {config.low_res_mpp:g} mpp"
    elif config.low_res_level is not None:
        h, w = choose_level(slide, config.low_res_level, "attention").shape[:2]
        what = f"level {config.low_res_level}"
    else:
        side = config.low_res_max_side
        return slide.thumbnail((side, side))
    if h * w > MAX_VIEW_PIXELS:
        raise ValueError(
            f"{slide.path}: the attention view {what} is {h} x {w} pixels, more than "
            f"{MAX_VIEW_PIXELS} for a low-resolution view; ask for a coarser level or mpp"
        )
    return slide.thumbnail((h, w))  # a stored level of that size is returned as it is


def patch_view(
    slide: readers.Slide, config: ModelConfig, mpp0: float | None
) -> tuple[readers.Level | resolution.ResampledLevel, float | None]:
    """What patches are read from and its microns per pixel: the view at exactly
    ``patch_mpp`` when set (``resolution.patch_source``), else level ``patch_level``."""
    if config.patch_mpp is not None:
        mpp0 = resolution.require_mpp(mpp0, slide.path, "--patch-mpp", config.patch_mpp)
        return resolution.patch_source(slide, mpp0, config.patch_mpp)
    level = choose_level(slide, config.patch_level, "patch")
    return level, None if mpp0 is None else mpp0 * float(level.downsample)


def level0_mpp(slide: readers.Slide, config: ModelConfig) -> float | None:
    """The slide's level-0 mpp as the user's options and the file give it."""
    return resolution.slide_mpp(slide, slide.path, config.assume_mpp, config.slide_mpp)


def open_view(
    path: str | os.PathLike, config: ModelConfig, time_limit: float | None = None
) -> SlideView:
    """Open ``path`` and read its attention view; the caller closes the view.

    ``time_limit``: seconds the slide's reads may take from its opening, and again
    from each ``view.slide.start_clock()`` (``readers.Limits.seconds``); the other
    ``readers.Limits`` are the defaults.

    Raises what ``readers.open_slide`` raises (``FileNotFoundError``,
    ``readers.SlideError``) for files that cannot be read.
    """
    import readers

    slide = readers.open_slide(path, limits=readers.Limits(seconds=time_limit))
    try:
        mpp0 = level0_mpp(slide, config)
        thumbnail = attention_view(slide, config, mpp0)
        tissue = (
            tissue_mask(thumbnail) if config.tissue_mask else np.ones(thumbnail.shape[:2], bool)
        )
        patch_level, patch_mpp = patch_view(slide, config, mpp0)
        return SlideView(Path(path), slide, thumbnail, tissue, patch_level, patch_mpp)
    except BaseException:
        slide.close()
        raise


def prefetch(
    items: Iterable[T], load: Callable[[T], object], ahead: int = 1
) -> Iterator[tuple[T, object, BaseException | None]]:
    """Yield ``(item, load(item), None)`` in order, loading up to ``ahead`` items
    in a background thread while the consumer works on the current one.

    A failed load yields ``(item, None, exception)`` instead, so one unreadable
    slide does not stop a batch. Results the consumer never takes (it stopped
    early) are closed if they have a ``close`` method.
    """
    items = list(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ats-prefetch") as pool:
        futures = [pool.submit(load, item) for item in items[: ahead + 1]]
        next_index = len(futures)
        try:
            for item in items:
                future = futures.pop(0)
                try:
                    result = future.result()
                except Exception as e:  # reported per item, the batch goes on
                    yield item, None, e
                else:
                    yield item, result, None
                if next_index < len(items):
                    futures.append(pool.submit(load, items[next_index]))
                    next_index += 1
        finally:
            for future in futures:
                if future.cancel() or future.exception() is not None:
                    continue
                close = getattr(future.result(), "close", None)
                if close is not None:
                    close()

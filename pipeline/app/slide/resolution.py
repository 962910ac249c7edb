"""Exact physical resolution: a pyramid level presented at a requested microns per pixel.

An mpp request means that mpp exactly (docs/estimator.md, physical resolution).
``patch_source`` picks the coarsest level at least as fine as the request and, unless
the two agree within ``TOLERANCE``, wraps it in a ``ResampledLevel``: a virtual image
at the requested mpp whose ``read_patches`` reads, for each patch, the level region of
the same field of view and resamples **that patch only** (never the level). Example: a
40x slide at 0.25 mpp whose next level is at 1.0 mpp, asked for 0.5 mpp patches of
224 x 224, reads 448 x 448 level-0 regions and shrinks each to 224 x 224 (area
averaging). The virtual image satisfies the core's ``PatchSource`` protocol, so
sampling, patch mapping and the feature net need no change; its ``downsample``
(level-0 pixels per virtual pixel) gives the patches' true level-0 footprint.

Microns per pixel are isotropic here: a slide's ``(y, x)`` mpp is averaged, as
``readers.Slide.level_for_mpp`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.app.errors import UserError
from pipeline.app.files import read_table

if TYPE_CHECKING:
    import readers

TOLERANCE = 0.01
"""A level within 1 % of the requested mpp is read as it is, without resampling."""


class ResampledLevel:
    """``level`` seen at ``scale`` level pixels per virtual pixel (> 1 shrinks).

    Attributes:
        level: the ``readers.Level`` (or any ``PatchSource`` with ``downsample``) read.
        scale: level pixels per virtual pixel, e.g. 2.0 for 0.5 mpp from 0.25 mpp.
        shape: virtual ``(H, W, C)``: the level's ``(H, W)`` divided by ``scale``, rounded.
        downsample: level-0 pixels per virtual pixel (``level.downsample * scale``).
    """

    def __init__(self, level: Any, scale: float) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.level = level
        self.scale = float(scale)
        h, w, c = level.shape
        self.shape = (max(1, round(h / self.scale)), max(1, round(w / self.scale)), c)
        self.downsample = float(level.downsample) * self.scale

    def __repr__(self) -> str:
        return f"ResampledLevel({self.level!r}, scale={self.scale:.4g})"

    def read_patches(self, offsets: np.ndarray, size: Sequence[int], fill: int = 0) -> np.ndarray:
        """Patches of the virtual image.

        Args:
            offsets: int [N, 2] ``(y, x)`` top-left corners in virtual pixels.
            size: ``(h, w)`` in virtual pixels.

        Returns:
            uint8 [N, h, w, C]: each the level region at ``round(offset * scale)`` of
            ``round(size * scale)`` pixels, resampled to ``size`` (area averaging when
            shrinking, antialiased bilinear when enlarging).
        """
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        h, w = (int(s) for s in size)
        source_size = (max(1, round(h * self.scale)), max(1, round(w * self.scale)))
        source_offsets = np.rint(offsets * self.scale).astype(np.int64)
        raw = self.level.read_patches(source_offsets, source_size, fill)  # [N, sh, sw, C]
        return resize_patches(raw, (h, w))


def resize_patches(patches: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[N, h, w, C]`` -> uint8 ``[N, *size, C]``: area averaging when shrinking
    (an exact box mean for integer factors), antialiased bilinear otherwise."""
    if patches.shape[1:3] == tuple(size):
        return patches
    x = torch.from_numpy(np.ascontiguousarray(patches)).permute(0, 3, 1, 2).float()
    if patches.shape[1] >= size[0] and patches.shape[2] >= size[1]:
        y = F.interpolate(x, size=size, mode="area")
    else:
        y = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def slide_mpp(
    slide: readers.Slide,
    path: str | os.PathLike,
    assume_mpp: float | None,
    table: Sequence[tuple[str, float]],
) -> float | None:
    """Microns per level-0 pixel of ``slide``: its entry in ``table`` (``(file name,
    mpp)`` pairs; the name with or without its suffix), else what the file states
    (mean of y and x), else ``assume_mpp``, else None."""
    name = Path(path).name
    for key, mpp in table:
        if key in (name, Path(name).stem, Path(name).stem.removesuffix(".ome")):
            return float(mpp)
    if slide.mpp is not None:
        return float(sum(slide.mpp) / 2)
    return assume_mpp


def read_slide_mpp(path: str | os.PathLike) -> tuple[tuple[str, float], ...]:
    """``(slide, mpp)`` pairs of a CSV with columns ``slide`` (file name, with or
    without its suffix) and ``mpp`` (microns per level-0 pixel, > 0)."""
    rows = read_table(path, required=("slide", "mpp"))
    pairs = []
    for line, row in enumerate(rows, start=2):
        try:
            mpp = float(row["mpp"])
        except (TypeError, ValueError):
            mpp = float("nan")
        if not mpp > 0:
            raise UserError(f"{path}, line {line}: mpp {row['mpp']!r} is not a number > 0")
        pairs.append((row["slide"].strip(), mpp))
    return tuple(pairs)


def require_mpp(mpp: float | None, path: str | os.PathLike, option: str, wanted: float) -> float:
    """``mpp``, or the ``UserError`` of a slide whose mpp is unknown."""
    if mpp is None:
        raise UserError(
            f"{path}: the slide states no microns per pixel, needed for {option} {wanted:g}; "
            f"give it with --slide-mpp CSV (columns slide,mpp) or --assume-mpp X"
        )
    return mpp


def patch_source(
    slide: readers.Slide, mpp0: float, target: float
) -> tuple[readers.Level | ResampledLevel, float]:
    """The image to read patches of ``target`` mpp from, and the mpp it really has.

    ``mpp0`` is the slide's level-0 mpp. The coarsest level at least as fine as
    ``target`` (level 0 when none is) is returned as it is when its mpp is within
    ``TOLERANCE`` of ``target``, else wrapped in a ``ResampledLevel`` at ``target``.
    """
    level = slide.levels[slide.level_for_downsample(target / mpp0)]
    level_mpp = mpp0 * float(level.downsample)
    scale = target / level_mpp
    if abs(scale - 1.0) <= TOLERANCE:
        return level, level_mpp
    return ResampledLevel(level, scale), target


def view_shape(slide: readers.Slide, mpp0: float, target: float) -> tuple[int, int]:
    """``(h, w)`` of the whole slide at ``target`` mpp (level-0 size x mpp0 / target)."""
    height, width = slide.shape[:2]
    return max(1, round(height * mpp0 / target)), max(1, round(width * mpp0 / target))

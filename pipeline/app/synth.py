"""Labelled synthetic slide datasets that only high resolution can solve, one per task.

Each slide is pink tissue-like texture (a few irregular blobs, about a third of the
area) on white glass, dotted with dark "cells" of radius ~10 level-0 pixels, which
stay visible as dark dots in a thumbnail. In a **positive** slide some of the cells
are *atypical*: their inside carries a fine checkerboard (2-pixel squares, +/-
``CHECKER_AMPLITUDE``) whose average over every 4 x 4 block is zero, so every
level with downsample >= 4 (and any thumbnail) of an atypical cell equals that of a
normal one. The label is therefore invisible at low resolution: a classifier on the
thumbnail is at chance, while the attention model can find the cells on the
thumbnail and read the checkerboard in level-0 patches.

A second high-resolution marker, *striped* cells (horizontal stripes of 2 pixels,
zero mean over every 4 x 4 block, so equally invisible in a thumbnail), serves the
multi-label task. Per task (``write_dataset(task=...)``, ``ats-wsi synth --task``),
the target is set by those cells:

- ``classification``: ``label`` negative (no atypical cell) or positive (half the
  cells atypical), alternating;
- ``regression``: ``value``, the share of atypical cells, uniform in [0, 0.6];
- ``survival``: ``time`` and ``event``: the hazard is ``0.05 exp(6 share)``, the share
  of atypical cells as above, with uniform censoring on [0, 20] (about a quarter
  censored; knowing the share exactly gives a C-index of 0.745 ± 0.052 on 32 slides);
- ``multilabel``: ``atypical`` and ``striped``, each present (half the cells) in half
  the slides, independently; each cell of the CSV is missing (empty) with
  probability 0.1.

Rendering is analytic and tile by tile, at each level's own scale, so slides of any
size are written in bounded memory (``readers.testing.write_tiff_pyramid``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

CLASS_NAMES = ("negative", "positive")
LABELS_CSV = "labels.csv"
TASK_COLUMNS = {
    "classification": ("label",),
    "regression": ("value",),
    "survival": ("time", "event"),
    "multilabel": ("atypical", "striped"),
}
"""The target columns of each task's ``labels.csv``."""
MAX_SHARE = 0.6
MISSING = 0.1

BACKGROUND = np.array([242.0, 242.0, 242.0], dtype=np.float32)
TISSUE = np.array([222.0, 150.0, 190.0], dtype=np.float32)
TISSUE_VARIATION = np.array([22.0, 35.0, 22.0], dtype=np.float32)
CELL = np.array([110.0, 60.0, 140.0], dtype=np.float32)
CHECKER_AMPLITUDE = 50.0
_TEXTURE_SIDE = 512


@dataclass(frozen=True)
class SlideLayout:
    """Geometry of one synthetic slide, in level-0 pixels.

    Attributes:
        shape: ``(H, W)`` of level 0.
        tissue: float [K, 6] blobs ``(cy, cx, ry, rx, angle, phase)``: ellipses
            whose radius wobbles with angle.
        cells: float [M, 2] cell centres ``(y, x)``, all inside tissue.
        atypical: bool [M], cells carrying the high-resolution checkerboard.
        cell_radius: in level-0 pixels.
        striped: bool [M], cells carrying the high-resolution stripes (none of them
            atypical); ``None``: none.
    """

    shape: tuple[int, int]
    tissue: np.ndarray
    cells: np.ndarray
    atypical: np.ndarray
    cell_radius: float
    striped: np.ndarray | None = None

    @property
    def positive(self) -> bool:
        return bool(self.atypical.any())

    def tissue_inside(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """bool mask of level-0 points ``(y, x)`` (broadcastable arrays) in tissue."""
        inside = np.zeros(np.broadcast_shapes(y.shape, x.shape), dtype=bool)
        for cy, cx, ry, rx, angle, phase in self.tissue:
            dy, dx = y - cy, x - cx
            c, s = math.cos(angle), math.sin(angle)
            u, v = (c * dy + s * dx) / ry, (-s * dy + c * dx) / rx
            wobble = 1.0 + 0.12 * np.sin(3.0 * np.arctan2(u, v) + phase)
            inside |= u * u + v * v < wobble * wobble
        return inside

    def render(self, y0: int, x0: int, h: int, w: int, downsample: float) -> np.ndarray:
        """Region ``[y0:y0+h, x0:x0+w]`` of the level with ``downsample`` -> uint8 [h, w, 3]."""
        d = float(downsample)
        img = np.empty((h, w, 3), dtype=np.float32)
        img[:] = BACKGROUND
        # Level-0 coordinates of this level's pixel centres.
        ys = (y0 + np.arange(h, dtype=np.float64) + 0.5) * d
        xs = (x0 + np.arange(w, dtype=np.float64) + 0.5) * d
        if not self._touches_tissue(ys[0] - d, ys[-1] + d, xs[0] - d, xs[-1] + d):
            return img.astype(np.uint8)
        inside = self.tissue_inside(ys[:, None], xs[None, :])
        texture = _texture_at(ys, xs, d)
        tissue_rgb = TISSUE + texture[..., None] * TISSUE_VARIATION
        img[inside] = tissue_rgb[inside]
        self._draw_cells(img, y0, x0, d)
        return img.clip(0, 255).astype(np.uint8)

    def _touches_tissue(self, y_lo: float, y_hi: float, x_lo: float, x_hi: float) -> bool:
        for cy, cx, ry, rx, _, _ in self.tissue:
            reach = 1.15 * max(ry, rx)
            if (
                y_hi >= cy - reach
                and y_lo <= cy + reach
                and x_hi >= cx - reach
                and x_lo <= cx + reach
            ):
                return True
        return False

    def _draw_cells(self, img: np.ndarray, y0: int, x0: int, d: float) -> None:
        h, w = img.shape[:2]
        r = self.cell_radius / d  # radius in this level's pixels
        centres = self.cells / d  # this level's pixel grid
        near = (
            (centres[:, 0] > y0 - r - 1)
            & (centres[:, 0] < y0 + h + r + 1)
            & (centres[:, 1] > x0 - r - 1)
            & (centres[:, 1] < x0 + w + r + 1)
        )
        # Checker squares are 2 level-0 pixels: 2 pixels here, 1 at downsample 2,
        # and they average out entirely from downsample 4 on.
        square = 2 if d < 1.5 else (1 if d < 3 else 0)
        striped = np.zeros_like(self.atypical) if self.striped is None else self.striped
        for (cy, cx), atypical, stripes in zip(
            centres[near], self.atypical[near], striped[near], strict=True
        ):
            top, left = max(int(cy - r - 1), y0), max(int(cx - r - 1), x0)
            bottom, right = min(int(cy + r + 2), y0 + h), min(int(cx + r + 2), x0 + w)
            yy = np.arange(top, bottom)[:, None]
            xx = np.arange(left, right)[None, :]
            dist = np.hypot(yy + 0.5 - cy, xx + 0.5 - cx)
            cover = np.clip(r - dist + 0.5, 0.0, 1.0)[..., None]
            window = img[top - y0 : bottom - y0, left - x0 : right - x0]
            colour = np.broadcast_to(CELL, window.shape)
            if (atypical or stripes) and square:
                pattern = self._checker(yy, xx, cy * d, cx * d, d, square, stripes=bool(stripes))
                colour = colour + pattern[..., None]
            window[:] = window * (1 - cover) + colour * cover

    def _checker(
        self, yy, xx, cy0, cx0, d: float, square: int, stripes: bool = False
    ) -> np.ndarray:
        """Checkerboard (or, with ``stripes``, horizontal stripe) offsets at this
        level's pixels ``yy, xx`` of a cell centred at level-0 ``(cy0, cx0)``. It fills
        the aligned 4 x 4 level-0 blocks whose centre lies inside the cell, whole
        blocks only, so that every such block sums to zero and the cell's block
        averages are those of a normal cell."""
        block_y = (np.floor((yy + 0.5) * d / 4) * 4 + 2) - cy0
        block_x = (np.floor((xx + 0.5) * d / 4) * 4 + 2) - cx0
        inside = np.hypot(block_y, block_x) < self.cell_radius - 3  # blocks wholly in the cell
        phase = yy // square if stripes else yy // square + xx // square
        sign = (phase % 2) * 2.0 - 1.0
        return CHECKER_AMPLITUDE * sign * inside


@lru_cache(maxsize=1)
def _texture_tiles() -> np.ndarray:
    """float32 [2T, 2T]: periodic smooth noise in about [-1, 1] (fixed for all
    slides), tiled 2 x 2 so any window of side <= T is a contiguous slice."""
    rng = np.random.default_rng(12345)
    noise = rng.standard_normal((_TEXTURE_SIDE, _TEXTURE_SIDE))
    f = np.fft.fftfreq(_TEXTURE_SIDE)
    radius2 = f[:, None] ** 2 + f[None, :] ** 2
    smooth = np.fft.ifft2(np.fft.fft2(noise) * np.exp(-radius2 * (2 * math.pi * 6.0) ** 2)).real
    smooth /= 3 * smooth.std()
    return np.tile(smooth.clip(-1, 1).astype(np.float32), (2, 2))


def _texture_at(ys: np.ndarray, xs: np.ndarray, d: float) -> np.ndarray:
    """Texture sampled at level-0 points (outer product of ``ys`` and ``xs``).

    The texture is smooth over tens of pixels, so point sampling at lower levels
    shows the same pattern as area averaging would."""
    tiles = _texture_tiles()
    iy = ys.astype(np.int64) % _TEXTURE_SIDE
    ix = xs.astype(np.int64) % _TEXTURE_SIDE
    if d == 1.0 and len(iy) <= _TEXTURE_SIDE and len(ix) <= _TEXTURE_SIDE:
        return tiles[iy[0] : iy[0] + len(iy), ix[0] : ix[0] + len(ix)]  # fast path: level 0
    return tiles[np.ix_(iy, ix)]


def make_layout(
    shape: tuple[int, int],
    seed: int,
    positive: bool,
    cell_density: float = 120.0,
    atypical_fraction: float = 0.5,
    cell_radius: float = 10.0,
    striped_fraction: float = 0.0,
) -> SlideLayout:
    """Draw a slide's geometry.

    Args:
        shape: level-0 ``(H, W)``.
        seed: fixes tissue and cells; ``positive`` only decides which cells are
            atypical, so the same seed gives a positive and a negative slide with
            identical thumbnails.
        cell_density: cells per megapixel of tissue (120 -> about 4 % of the tissue
            area is cells at radius 10).
        atypical_fraction: share of cells that are atypical in a positive slide
            (at least one).
        striped_fraction: share of the other cells that are striped (0: none).
    """
    if len(shape) != 2 or min(shape) < 64:
        raise ValueError(f"shape: expected (height, width) >= 64, got {shape}")
    if not 0.0 < atypical_fraction <= 1.0:
        raise ValueError(f"atypical_fraction: expected in (0, 1], got {atypical_fraction}")
    height, width = shape
    rng = np.random.default_rng([seed, 0])
    n_blobs = int(rng.integers(1, 4))
    blobs = []
    for _ in range(n_blobs):
        scale = math.sqrt(0.40 / n_blobs / math.pi)  # each blob ~ 40% / n of the area
        blobs.append(
            (
                height * rng.uniform(0.3, 0.7),
                width * rng.uniform(0.3, 0.7),
                height * scale * rng.uniform(0.8, 1.25),
                width * scale * rng.uniform(0.8, 1.25),
                rng.uniform(0, math.pi),
                rng.uniform(0, 2 * math.pi),
            )
        )
    layout = SlideLayout(
        shape=(int(height), int(width)),
        tissue=np.array(blobs, dtype=np.float64),
        cells=np.zeros((0, 2)),
        atypical=np.zeros(0, dtype=bool),
        cell_radius=float(cell_radius),
    )
    margin = cell_radius + 2
    n_candidates = int(cell_density * height * width / 1e6)
    ys = rng.uniform(margin, height - margin, n_candidates)
    xs = rng.uniform(margin, width - margin, n_candidates)
    keep = layout.tissue_inside(ys, xs)
    cells = np.stack([ys[keep], xs[keep]], axis=1)
    atypical = np.zeros(len(cells), dtype=bool)
    if positive and len(cells):
        chooser = np.random.default_rng([seed, 1])
        n_atypical = max(1, round(atypical_fraction * len(cells)))
        atypical[chooser.choice(len(cells), n_atypical, replace=False)] = True
    striped = None
    if striped_fraction > 0 and (~atypical).any():
        chooser = np.random.default_rng([seed, 2])
        others = np.flatnonzero(~atypical)
        striped = np.zeros(len(cells), dtype=bool)
        n_striped = max(1, round(striped_fraction * len(others)))
        striped[chooser.choice(others, n_striped, replace=False)] = True
    return SlideLayout(layout.shape, layout.tissue, cells, atypical, layout.cell_radius, striped)


def write_slide(path: str | os.PathLike, layout: SlideLayout, tile: int = 256) -> None:
    """Write ``layout`` as a JPEG-compressed tiled TIFF pyramid (0.5 um/px)."""
    from readers.testing import write_tiff_pyramid

    write_tiff_pyramid(path, layout.shape, layout.render, tile=tile, mpp=0.5, compression="jpeg")


def write_dataset(
    out_dir: str | os.PathLike,
    n: int = 40,
    size: int = 2048,
    seed: int = 0,
    progress: bool = False,
    workers: int = 1,
    task: str = "classification",
    **layout_options,
) -> Path:
    """Write ``n`` slides of ``size x size`` pixels and ``labels.csv`` (``slide`` and
    the task's target columns, ``TASK_COLUMNS``; the module docstring says how each
    target is drawn).

    Classification classes alternate so the dataset is balanced; slide ``i``'s
    layout seed is ``seed * 100003 + i`` and its target draws come from ``(seed, i)``.
    ``workers`` > 1 writes slides in that many processes (same files).
    ``layout_options`` go to ``make_layout``. Returns the labels CSV path.
    """
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    from pipeline.app.files import write_csv

    if n < 1 or size < 64:
        raise ValueError(f"need n >= 1 and size >= 64, got n={n}, size={size}")
    if task not in TASK_COLUMNS:
        raise ValueError(f"task: expected one of {sorted(TASK_COLUMNS)}, got {task!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs, rows = [], []
    for i in range(n):
        options, targets = _targets(task, seed, i, layout_options)
        path = out / f"slide_{i:03d}.tiff"
        jobs.append((path, (size, size), seed * 100_003 + i, options.pop("positive"), options))
        rows.append({"slide": path.name, **targets})
    bar = tqdm(total=n, desc="synth", unit="slide", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(_write_job, jobs):
                bar.update()
    else:
        for job in jobs:
            _write_job(job)
            bar.update()
    bar.close()
    labels = out / LABELS_CSV
    write_csv(labels, ["slide", *TASK_COLUMNS[task]], rows)
    return labels


def _targets(task: str, seed: int, i: int, options: dict) -> tuple[dict, dict[str, str]]:
    """Slide ``i``'s layout options (with ``positive``) and its labels-CSV cells."""
    if task == "classification":
        positive = i % 2 == 1
        return {**options, "positive": positive}, {"label": CLASS_NAMES[int(positive)]}
    rng = np.random.default_rng([seed, i, 7])
    if task == "multilabel":
        atypical, striped = rng.random() < 0.5, rng.random() < 0.5
        missing = rng.random(2) < MISSING
        layout = {**options, "positive": atypical, "striped_fraction": 0.5 if striped else 0.0}
        cells = {
            name: "" if gone else str(int(value))
            for name, value, gone in zip(
                TASK_COLUMNS[task], (atypical, striped), missing, strict=True
            )
        }
        return layout, cells
    share = round(float(rng.uniform(0.0, MAX_SHARE)), 3)
    layout = {**options, "positive": share > 0, "atypical_fraction": max(share, 1e-3)}
    if task == "regression":
        return layout, {"value": f"{share:g}"}
    time = rng.exponential(1.0 / (0.05 * math.exp(6.0 * share)))
    censor = rng.uniform(0.0, 20.0)
    return layout, {"time": f"{min(time, censor):.3f}", "event": str(int(time <= censor))}


def _write_job(job: tuple) -> None:
    path, shape, seed, positive, options = job
    write_slide(path, make_layout(shape, seed=seed, positive=positive, **options))

"""Tissue detection on a slide's low-resolution view.

Stained tissue is coloured while glass, background and most pen-free artefacts are
grey or white, so the HSV saturation separates them; Otsu's threshold on its
histogram adapts to the stain intensity of each slide.
"""

from __future__ import annotations

import numpy as np

MIN_SATURATION = 0.05
"""Saturation below which a pixel is never tissue, whatever Otsu says: on a slide
that is nearly all glass, Otsu would split the background noise itself."""


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of ``rgb`` (uint8 [H, W, 3]) -> float32 [H, W] in [0, 1]."""
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"rgb: expected an [H, W, 3] image, got shape {rgb.shape}")
    rgb = rgb[..., :3].astype(np.float32)
    high = rgb.max(axis=2)
    low = rgb.min(axis=2)
    return np.where(high > 0, (high - low) / np.maximum(high, 1.0), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """The threshold on ``values`` (any shape, in [0, 1]) maximising the
    between-class variance of the two sides."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)  # pixels at or below each bin
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean0 = m0 / w0
        mean1 = (m0[-1] - m0) / w1
        between = w0 * w1 * (mean0 - mean1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray, min_saturation: float = MIN_SATURATION) -> np.ndarray:
    """Tissue pixels of a low-resolution RGB view.

    Args:
        rgb: uint8 [H, W, 3] (a thumbnail; a full level would not fit in memory).
        min_saturation: floor of the threshold, see ``MIN_SATURATION``.

    Returns:
        bool [H, W], True on tissue.
    """
    sat = saturation(rgb)
    return sat > max(otsu_threshold(sat), min_saturation)

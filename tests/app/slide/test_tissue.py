"""Tissue mask on synthetic slides: compared with the layout's exact tissue region."""

import numpy as np
import pytest

import readers
from pipeline.app.slide.tissue import otsu_threshold, tissue_mask
from pipeline.app.synth import make_layout, write_slide


def test_otsu_splits_two_populations():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.1, 0.02, 5000), rng.normal(0.6, 0.05, 3000)])
    t = otsu_threshold(values.clip(0, 1))
    assert 0.16 < t < 0.45


def test_mask_matches_layout_tissue_on_a_written_slide(tmp_path):
    layout = make_layout((1536, 1280), seed=11, positive=True)
    path = tmp_path / "s.tiff"
    write_slide(path, layout)
    with readers.open_slide(path) as slide:
        thumb = slide.thumbnail((192, 192))
    mask = tissue_mask(thumb)
    h, w = mask.shape
    ys = (np.arange(h) + 0.5) * layout.shape[0] / h
    xs = (np.arange(w) + 0.5) * layout.shape[1] / w
    truth = layout.tissue_inside(ys[:, None], xs[None, :])
    assert 0.2 < truth.mean() < 0.6  # the layout is about a third tissue
    # Disagreement only along the boundary (a pixel or two of the thumbnail).
    assert (mask != truth).mean() < 0.03


def test_blank_glass_has_no_tissue():
    glass = np.full((64, 64, 3), 242, np.uint8)
    glass[10:20, 10:20] = 230  # grey dust is not tissue
    assert not tissue_mask(glass).any()


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match=r"expected an \[H, W, 3\] image, got shape \(4, 4\)"):
        tissue_mask(np.zeros((4, 4), np.uint8))

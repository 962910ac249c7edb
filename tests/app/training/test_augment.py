"""Augmentation keeps attention and patches aligned: on a coordinate-coded slide (red
encodes y, green encodes x), each patch read through the transformed view has the
colour of the transformed attention view's cell it was sampled for."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tifffile
import torch

import readers
from pipeline.app.slide.views import low_res_tensor
from pipeline.app.training.augment import Augmentation, transform_source, transform_tensor
from pipeline.patches import gather_patches

H, W = 512, 768


@pytest.fixture(scope="module")
def coded_slide(tmp_path_factory):
    """uint8 RGB: red = 255 y / H, green = 255 x / W, blue = 0; lossless tiles."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([255 * y / H, 255 * x / W, np.zeros_like(y)], axis=-1)
    path = tmp_path_factory.mktemp("coded") / "coded.tif"
    tifffile.imwrite(
        path,
        np.rint(rgb).astype(np.uint8),
        tile=(128, 128),
        photometric="rgb",
        compression="deflate",
    )
    return path


def cell_and_patch_colours(x_low: torch.Tensor, source, cells: torch.Tensor, patch: int):
    """Colour of each cell ``[N, 2]`` of ``x_low [1, 3, h, w]`` (one cell per pixel) and
    mean colour of the patch the core reads for it from ``source``, both in [0, 1]."""
    size = tuple(x_low.shape[2:])
    patches, _ = gather_patches([source], cells[None], size, size, (patch, patch))
    cell = x_low[0, :, cells[:, 0], cells[:, 1]].T  # [N, 3]
    return cell, patches[0].mean(dim=(-2, -1))  # [N, 3]


@pytest.mark.parametrize("flip,rotations", list(itertools.product([False, True], range(4))))
def test_transformed_view_and_patches_stay_aligned(coded_slide, flip, rotations):
    with readers.open_slide(coded_slide) as slide:
        x_low = low_res_tensor(slide.thumbnail((64, 96)))
        x_t = transform_tensor(x_low, flip, rotations)
        source = transform_source(slide.levels[0], flip, rotations)
        assert tuple(source.shape[:2]) == (H, W) if rotations % 2 == 0 else (W, H)
        h, w = x_t.shape[2:]
        cells = torch.tensor([[0, 0], [h - 1, 0], [0, w - 1], [h // 3, w // 2], [h - 1, w - 1]])
        cell, patch = cell_and_patch_colours(x_t, source, cells, patch=8)
    # A cell of 8 x 8 level-0 pixels: the patch centred on it has its mean colour.
    torch.testing.assert_close(patch[:, :2], cell[:, :2], atol=3 / 255, rtol=0)


def test_augmentation_draws_one_transform_for_view_mask_and_patches(coded_slide):
    augmentation = Augmentation(flips=True)
    seen = set()
    with readers.open_slide(coded_slide) as slide:
        x_low = low_res_tensor(slide.thumbnail((64, 96)))
        mask = torch.zeros(1, 64, 96, dtype=torch.bool)
        mask[0, :10, :5] = True  # marks the top-left corner
        generator = torch.Generator().manual_seed(0)
        for _ in range(16):
            x_t, mask_t, source = augmentation.apply(x_low, mask, slide.levels[0], generator)
            corner = tuple(int(v) for v in mask_t[0].nonzero()[0])  # where the corner went
            seen.add(corner)
            cells = mask_t[0].nonzero()[:3]
            cell, patch = cell_and_patch_colours(x_t, source, cells, patch=8)
            torch.testing.assert_close(patch[:, :2], cell[:, :2], atol=3 / 255, rtol=0)
            assert float(cell[:, 0].max()) < 0.2  # still the slide's top rows (red ~ y)
    assert len(seen) >= 3  # several transforms were drawn


def test_colour_and_stain_jitter_change_patches_only(coded_slide):
    with readers.open_slide(coded_slide) as slide:
        level = slide.levels[0]
        x_low = low_res_tensor(slide.thumbnail((64, 96)))
        offsets = np.array([[100, 200], [300, 50]])
        plain = level.read_patches(offsets, (16, 16))
        for augmentation in (Augmentation(color_jitter=0.4), Augmentation(hed_jitter=0.1)):
            generator = torch.Generator().manual_seed(1)
            x_t, _, source = augmentation.apply(x_low, None, level, generator)
            assert x_t is x_low  # the attention view is not jittered
            jittered = source.read_patches(offsets, (16, 16))
            assert jittered.shape == plain.shape and jittered.dtype == np.uint8
            assert np.abs(jittered.astype(int) - plain).mean() > 1
        off = Augmentation()
        assert off.apply(x_low, None, level, torch.Generator())[2] is level

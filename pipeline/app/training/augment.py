"""Training augmentation of one slide: a random flip / 90-degree rotation of the whole
slide, and colour and stain (HED) jitter of the sampled patches only.

The geometric transform is applied to the attention view ``x_low`` and its mask as
tensors, and to the patch image through a *view* (``FlippedSource`` /
``RotatedSource``, the core's ``PatchSource`` protocol) that maps each requested
patch back to the untransformed image, reads it there and transforms only that
patch. Attention cells and the patches read for them therefore stay aligned, and no
level is ever transformed whole. Colour and stain jitter act on the patches the view
returns, so they cost N patches, not a slide. Prediction never augments.

Conventions: ``flip`` mirrors left-right (``x -> W - 1 - x``); a rotation is
``torch.rot90(image, 1, dims=(-2, -1))`` (counter-clockwise: pixel ``(y, x)`` of the
result is ``(x, W - 1 - y)`` of the input, whose shape becomes ``(W, H)``); a slide's
transform is the flip (if any) followed by ``k`` rotations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.app.config import TrainConfig

RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64
)
"""Stain vectors (rows: haematoxylin, eosin, DAB) in optical density (Ruifrok and
Johnston 2001, as in scikit-image's ``rgb2hed``)."""
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


class FlippedSource:
    """``source`` mirrored left-right, as a ``PatchSource`` of the same shape."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.shape = tuple(source.shape)

    def read_patches(self, offsets: np.ndarray, size: tuple[int, int], fill: int = 0):
        """uint8 [N, h, w, C]: columns ``[x, x + w)`` here are ``[W - x - w, W - x)``
        of the source, mirrored."""
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        width = self.shape[1]
        source_offsets = np.stack([offsets[:, 0], width - offsets[:, 1] - size[1]], axis=1)
        return np.ascontiguousarray(
            self.source.read_patches(source_offsets, size, fill)[:, :, ::-1]
        )


class RotatedSource:
    """``source`` rotated by 90 degrees counter-clockwise (``torch.rot90``), as a
    ``PatchSource`` of shape ``(W, H, C)``."""

    def __init__(self, source: Any) -> None:
        self.source = source
        h, w, c = source.shape
        self.shape = (w, h, c)

    def read_patches(self, offsets: np.ndarray, size: tuple[int, int], fill: int = 0):
        """uint8 [N, h, w, C]: the patch at ``(y, x)`` of size ``(h, w)`` here is the
        source's patch at ``(x, W - y - h)`` of size ``(w, h)``, rotated."""
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        h, w = size
        source_width = self.shape[0]
        source_offsets = np.stack([offsets[:, 1], source_width - offsets[:, 0] - h], axis=1)
        patches = self.source.read_patches(source_offsets, (w, h), fill)
        return np.ascontiguousarray(np.rot90(patches, 1, axes=(1, 2)))


class JitteredSource:
    """``source`` whose patches get ``Augmentation``'s colour and stain jitter, each
    patch its own random factors from ``rng``."""

    def __init__(self, source: Any, augmentation: Augmentation, rng: np.random.Generator):
        self.source = source
        self.shape = tuple(source.shape)
        self.augmentation = augmentation
        self.rng = rng

    def read_patches(self, offsets: np.ndarray, size: tuple[int, int], fill: int = 0):
        patches = self.source.read_patches(offsets, size, fill)
        rgb = patches.astype(np.float32) / 255.0  # [N, h, w, 3]
        if self.augmentation.hed_jitter > 0:
            rgb = hed_jitter(rgb, self.augmentation.hed_jitter, self.rng)
        if self.augmentation.color_jitter > 0:
            rgb = color_jitter(rgb, self.augmentation.color_jitter, self.rng)
        return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def color_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation of float ``[N, h, w, 3]`` RGB in [0, 1], each
    scaled by a factor drawn per patch from ``[1 - strength, 1 + strength]``."""
    n = rgb.shape[0]
    brightness, contrast, saturation = rng.uniform(
        1 - strength, 1 + strength, (3, n, 1, 1, 1)
    ).astype(np.float32)
    rgb = rgb * brightness
    gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # [N, h, w]
    mean = gray.mean(axis=(1, 2))[:, None, None, None]
    rgb = (rgb - mean) * contrast + mean
    gray = (rgb @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    return gray + (rgb - gray) * saturation


def hed_jitter(rgb: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Stain jitter (Tellez et al. 2018) of float ``[N, h, w, 3]`` RGB in [0, 1]: in
    HED optical density, each stain of each patch is scaled by a factor in
    ``[1 - strength, 1 + strength]`` and shifted by ``[-strength, strength]``."""
    n = rgb.shape[0]
    density = -np.log10(np.clip(rgb, 1e-3, 1.0))  # [N, h, w, 3] optical density
    hed = density @ HED_FROM_RGB.astype(np.float32)
    scale = rng.uniform(1 - strength, 1 + strength, (n, 1, 1, 3)).astype(np.float32)
    shift = rng.uniform(-strength, strength, (n, 1, 1, 3)).astype(np.float32)
    density = (hed * scale + shift) @ RGB_FROM_HED.astype(np.float32)
    return np.power(10.0, -density, dtype=np.float32)


def transform_tensor(x: torch.Tensor, flip: bool, rotations: int) -> torch.Tensor:
    """The slide transform of ``x [..., H, W]`` (flip, then ``rotations`` x 90 degrees)."""
    if flip:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, rotations % 4, dims=(-2, -1)) if rotations % 4 else x


def transform_source(source: Any, flip: bool, rotations: int) -> Any:
    """The same transform of a ``PatchSource``, as a view (nothing is read here)."""
    if flip:
        source = FlippedSource(source)
    for _ in range(rotations % 4):
        source = RotatedSource(source)
    return source


@dataclass(frozen=True)
class Augmentation:
    """What is done to one training slide (``TrainConfig`` names the same options).

    Attributes:
        flips: random flip and 90-degree rotation (8 equally likely transforms).
        color_jitter / hed_jitter: strengths, 0 = off (see the functions above).
    """

    flips: bool = False
    color_jitter: float = 0.0
    hed_jitter: float = 0.0

    @classmethod
    def from_config(cls, config: TrainConfig) -> Augmentation:
        return cls(config.augment_flips, config.color_jitter, config.hed_jitter)

    @property
    def active(self) -> bool:
        return self.flips or self.color_jitter > 0 or self.hed_jitter > 0

    def choose(self, generator: torch.Generator) -> Transform | None:
        """This slide's random transform, drawn from ``generator`` (so a seeded run
        repeats it); ``None`` when nothing is augmented."""
        if not self.active:
            return None
        draw = torch.randint(0, 2**62, (3,), generator=generator, device=generator.device)
        return Transform(bool(draw[0] % 2), int(draw[1] % 4), int(draw[2]))

    def source(self, source: Any, transform: Transform | None) -> Any:
        """The patch source seen through ``transform`` (a view: nothing is read)."""
        if transform is None:
            return source
        if self.flips:
            source = transform_source(source, transform.flip, transform.rotations)
        if self.color_jitter > 0 or self.hed_jitter > 0:
            source = JitteredSource(source, self, np.random.default_rng(transform.seed))
        return source

    def image(self, x: torch.Tensor, transform: Transform | None) -> torch.Tensor:
        """An attention view or mask ``[..., H, W]`` under ``transform``'s geometry."""
        if transform is None or not self.flips:
            return x
        return transform_tensor(x, transform.flip, transform.rotations)

    def apply(
        self,
        x_low: torch.Tensor,
        mask: torch.Tensor | None,
        source: Any,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Augmented ``(x_low [1, 3, h, w], mask [1, h, w] | None, patch source)``."""
        transform = self.choose(generator)
        mask = None if mask is None else self.image(mask, transform)
        return self.image(x_low, transform), mask, self.source(source, transform)


@dataclass(frozen=True)
class Transform:
    """One slide's augmentation: a left-right ``flip``, then ``rotations`` x 90 degrees
    (module docstring), and the ``seed`` of its colour and stain jitter."""

    flip: bool
    rotations: int
    seed: int

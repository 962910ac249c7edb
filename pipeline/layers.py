"""The attention-sampling layers: sample patches, and the whole low-to-high pipeline.

``attention_sampling(attention, feature, ...)`` wires an attention network (on the
low-resolution view), :func:`sample`, patch reading from the high-resolution image and
:func:`expectation` into one ``nn.Module``, like the reference library's function of
the same name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks
from .expectation import ESTIMATORS, expectation
from .patches import HighResolution, gather_patches
from .sampling import mask_attention, sample


def sample_patches(
    x_low: Tensor,
    x_high: HighResolution,
    attention: Tensor,
    n_patches: int,
    patch_size: int | Sequence[int],
    receptive_field: int = 0,
    replace: bool = False,
    use_logits: bool = False,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Sample ``n_patches`` cells of ``attention`` and read their patches from ``x_high``.

    Args:
        x_low (Tensor[B, C, *low]): the low-resolution view the attention was computed
            on; only its spatial size is used (to map cells to ``x_high``).
        x_high: the high-resolution image, see ``patches.HighResolution``.
        attention (Tensor[B, *att]): probabilities (logits when ``use_logits``), one
            axis per spatial axis of ``x_low``.
        n_patches, replace, use_logits, generator: as in ``sample``.
        patch_size: ``(height, width)`` in ``x_high`` pixels (one int for all axes).
        receptive_field: of the attention network, in ``x_low`` pixels (see
            ``patch_offsets`` for the mapping).
        mask (BoolTensor[B, *att] | None): True where sampling is allowed.

    Returns:
        patches (Tensor[B, N, C, *patch_size]) on ``x_low``'s device,
        sampled_attention (Tensor[B, N]), offsets (LongTensor[B, N, d]) in ``x_high``.
    """
    _checks.tensor(x_low, "x_low", min_dim=3)
    _checks.tensor(attention, "attention", min_dim=2)
    _checks.same_batch(x_low.shape[0], attention.shape[0], "attention")
    low_size = tuple(x_low.shape[2:])
    if attention.dim() - 1 != len(low_size):
        raise ValueError(
            f"attention must have one axis per spatial axis of x_low {low_size}, got shape "
            f"{tuple(attention.shape)}"
        )
    patch_size = _checks.size_tuple(patch_size, len(low_size), "patch_size")
    if mask is not None:
        attention = mask_attention(attention, mask, use_logits)
    samples, sampled_attention = sample(n_patches, attention, replace, use_logits, generator)
    patches, offsets = gather_patches(
        x_high,
        samples,
        attention.shape[1:],
        low_size,
        patch_size,
        receptive_field,
        device=x_low.device,
    )
    return patches, sampled_attention, offsets


class SamplePatches(nn.Module):
    """Module form of :func:`sample_patches`.

    ``forward(x_low, x_high, attention, return_offsets=False, mask=None)`` returns
    ``(patches [B, N, C, *patch_size], sampled_attention [B, N])``, plus the top-left
    ``offsets [B, N, 2]`` in ``x_high``'s grid when ``return_offsets``.
    """

    def __init__(
        self,
        n_patches: int,
        patch_size: int | Sequence[int],
        receptive_field: int = 0,
        replace: bool = False,
        use_logits: bool = False,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.n_patches = _checks.positive_int(n_patches, "n_patches")
        self.patch_size = patch_size
        self.receptive_field = receptive_field
        self.replace = replace
        self.use_logits = use_logits
        self.generator = generator

    def forward(
        self,
        x_low: Tensor,
        x_high: HighResolution,
        attention: Tensor,
        return_offsets: bool = False,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, ...]:
        patches, sampled_attention, offsets = sample_patches(
            x_low,
            x_high,
            attention,
            self.n_patches,
            self.patch_size,
            self.receptive_field,
            self.replace,
            self.use_logits,
            self.generator,
            mask,
        )
        return (
            (patches, sampled_attention, offsets)
            if return_offsets
            else (patches, sampled_attention)
        )

    def extra_repr(self) -> str:
        return (
            f"n_patches={self.n_patches}, patch_size={self.patch_size}, "
            f"receptive_field={self.receptive_field}, replace={self.replace}, "
            f"use_logits={self.use_logits}"
        )


class Draw(NamedTuple):
    """Everything one draw of :class:`AttentionSampling` produced.

    Attributes:
        features (Tensor[B, D]): the estimate of the attention-weighted feature mean.
        attention (Tensor[B, *att]): the attention map the patches were drawn from
            (restricted to ``mask`` when one was given).
        patches (Tensor[B, N, C, *patch_size]): the patches the feature net saw.
        offsets (LongTensor[B, N, ndim]): their top-left corners in ``x_high``'s
            grid, ``(y, x)`` for images.
        sampled_attention (Tensor[B, N]): the attention probability of each patch.
        regularizer (Tensor[]): the attention regularizer's value on ``attention``
            (a constant 0 without regularizer), to add to the training loss.
    """

    features: Tensor
    attention: Tensor
    patches: Tensor
    offsets: Tensor
    sampled_attention: Tensor
    regularizer: Tensor


class AttentionSampling(nn.Module):
    """The attention-sampling pipeline; build it with :func:`attention_sampling`.

    ``forward(x_low, x_high, mask=None)`` returns
    ``(features [B, D], attention [B, *att], patches [B, N, C, *patch_size])``;
    ``draw(x_low, x_high, mask=None, generator=None)`` returns all of one draw as a
    :class:`Draw`, the regularizer's value included: the training loop adds
    ``draw.regularizer`` to its loss.
    """

    def __init__(
        self,
        attention: Callable[[Tensor], Tensor],
        feature: Callable[[Tensor], Tensor],
        patch_size: int | Sequence[int] | None,
        n_patches: int,
        replace: bool,
        attention_regularizer: Callable[[Tensor], Tensor] | None,
        receptive_field: int,
        estimator: str,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.attention = attention  # registered as a submodule when it is one
        self.feature = feature
        self.attention_regularizer = attention_regularizer
        self.patch_size = patch_size
        self.n_patches = _checks.positive_int(n_patches, "n_patches")
        self.replace = replace
        self.receptive_field = receptive_field
        self.estimator = estimator
        self.generator = generator

    def draw(
        self,
        x_low: Tensor,
        x_high: HighResolution,
        mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Draw:
        """One draw of patches and its estimate.

        Args:
            x_low (Tensor[B, C, *low]): the low-resolution view.
            x_high: the high-resolution image, see ``patches.HighResolution``.
            mask (BoolTensor[B, *m] | None): True where sampling is allowed (e.g.
                tissue). On the attention grid, or on any finer grid such as
                ``x_low``'s (a cell is allowed when any mask pixel inside it is
                True, by adaptive max pooling). The attention is restricted and
                renormalised for the sampling, the expectation and the regularizer.
            generator: overrides the module's ``generator`` for this draw.
        """
        _checks.tensor(x_low, "x_low", min_dim=3)
        attention = self.attention(x_low)
        if attention.dim() == x_low.dim() and attention.shape[1] == 1:
            attention = attention.squeeze(1)  # [B, 1, *att] -> [B, *att]
        if mask is not None:
            attention = mask_attention(attention, mask_on_grid(mask, attention.shape[1:]))
        regularizer = (
            attention.new_zeros(())
            if self.attention_regularizer is None
            else self.attention_regularizer(attention)
        )
        patch_size = x_low.shape[2:] if self.patch_size is None else self.patch_size
        patches, sampled_attention, offsets = sample_patches(
            x_low,
            x_high,
            attention,
            self.n_patches,
            patch_size,
            self.receptive_field,
            self.replace,
            generator=self.generator if generator is None else generator,
        )
        batch, n = sampled_attention.shape
        features = self.feature(patches.flatten(0, 1))  # [B * N, ...]
        features = features.reshape(batch, n, *features.shape[1:])  # [B, N, ...]
        features = expectation(features, sampled_attention, self.replace, self.estimator)
        return Draw(features, attention, patches, offsets, sampled_attention, regularizer)

    def forward(
        self, x_low: Tensor, x_high: HighResolution, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(features, attention, patches)`` of :meth:`draw`."""
        out = self.draw(x_low, x_high, mask)
        return out.features, out.attention, out.patches


def mask_on_grid(mask: Tensor, grid: Sequence[int]) -> Tensor:
    """``mask (BoolTensor[B, *m])`` reduced to ``grid`` (the attention's spatial
    shape) by adaptive max pooling: a cell is True when any of its pixels is."""
    _checks.tensor(mask, "mask", min_dim=2)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    grid = tuple(grid)
    if tuple(mask.shape[1:]) == grid:
        return mask
    if mask.dim() - 1 != len(grid) or not 1 <= len(grid) <= 3:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected [B, *grid] with the attention's "
            f"{len(grid)} spatial axes (grid {grid})"
        )
    pool = (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d)[len(grid) - 1]
    return pool(mask[:, None].float(), grid)[:, 0] > 0.5


def attention_sampling(
    attention: Callable[[Tensor], Tensor],
    feature: Callable[[Tensor], Tensor],
    patch_size: int | Sequence[int] | None = None,
    n_patches: int = 10,
    replace: bool = False,
    attention_regularizer: Callable[[Tensor], Tensor] | None = None,
    receptive_field: int = 0,
    *,
    estimator: str = "unbiased",
    generator: torch.Generator | None = None,
) -> AttentionSampling:
    """Build the attention-sampling pipeline as one ``nn.Module``.

    Args:
        attention: maps ``x_low [B, C, *low]`` to probabilities ``[B, *att]`` or
            ``[B, 1, *att]`` (e.g. a CNN ending in ``SampleSoftmax``).
        feature: maps patches ``[M, C, *patch_size]`` to features ``[M, D]`` (any
            trailing shape); called once on all ``M = B * N`` patches.
        patch_size: ``(height, width)`` in ``x_high`` pixels; ``None`` means the size
            of ``x_low``, as in the reference library.
        n_patches: ``N`` per batch item.
        replace: sample with replacement (if in doubt, don't).
        attention_regularizer: called on the attention map ``[B, *att]`` at every
            forward, e.g. ``MultinomialEntropy``; its value is
            ``module.draw(...).regularizer``, to be added to the training loss.
        receptive_field: of the attention network in ``x_low`` pixels (0 for
            ``padding="same"`` networks); see ``patch_offsets``.
        estimator: ``"unbiased"`` or ``"reference"``, see ``expectation``.
        generator: a ``torch.Generator`` on the attention's device to repeat runs.

    Returns:
        ``AttentionSampling``: ``forward(x_low, x_high, mask=None)`` ->
        ``(features [B, D], attention [B, *att], patches [B, N, C, *patch_size])``;
        ``draw(x_low, x_high, mask=None, generator=None)`` -> :class:`Draw`.
    """
    return AttentionSampling(
        attention,
        feature,
        patch_size,
        n_patches,
        replace,
        attention_regularizer,
        receptive_field,
        estimator,
        generator,
    )


class SampleSoftmax(nn.Module):
    """Softmax over all the positions of each batch item, optionally smoothed.

    ``forward(x [B, *S])`` -> ``(1 - smooth) * softmax + smooth / P`` of shape ``[B, *S]``
    (``P`` positions), or ``[B, *S[1:]]`` with ``squeeze_channels`` (``x [B, 1, ...]``,
    channels first). ``smooth`` in ``[0, 1)`` keeps every position sampleable.
    """

    def __init__(self, squeeze_channels: bool = False, smooth: float = 0.0) -> None:
        super().__init__()
        if not 0 <= smooth < 1:
            raise ValueError(f"smooth must be in [0, 1), got {smooth}")
        self.squeeze_channels = squeeze_channels
        self.smooth = smooth

    def forward(self, x: Tensor) -> Tensor:
        _checks.tensor(x, "x", min_dim=2)
        if self.squeeze_channels and x.shape[1] != 1:
            raise ValueError(f"squeeze_channels needs x of shape [B, 1, ...], got {tuple(x.shape)}")
        flat = torch.softmax(x.flatten(1), dim=1)  # [B, P]
        if self.smooth > 0:
            flat = (1 - self.smooth) * flat + self.smooth / flat.shape[1]
        out = flat.view_as(x)
        return out.squeeze(1) if self.squeeze_channels else out

    def extra_repr(self) -> str:
        return f"squeeze_channels={self.squeeze_channels}, smooth={self.smooth}"

"""Default networks and the slide classifier built from a ``ModelConfig``.

The attention view ``x_low`` of a slide is ``float [B, 4, h, w]``: RGB in [0, 1]
plus a tissue channel (1 on tissue, 0 elsewhere; all ones when the mask is off).
The attention network gives zero probability to cells without tissue, so sampling
never leaves the tissue and the heatmap shows it. Patches reach the feature network
as ``float [M, 3, ph, pw]`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import pipeline
from pipeline.app.config import ModelConfig


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    # He initialisation: PyTorch's default shrinks activations layer after layer,
    # which leaves these small networks nearly constant at the start of training.
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.ReLU())


def _standardise(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> roughly zero mean, unit spread (fixed, no statistics kept)."""
    return (rgb - 0.5) / 0.25


class SmallAttentionCNN(nn.Module):
    """``x_low [B, 4, h, w]`` -> attention probabilities ``[B, ceil(h/2), ceil(w/2)]``.

    Three 3x3 convolutions ("same" padding, receptive field 0 in the mapping sense),
    the first with stride 2 so the rest runs on a quarter of the pixels, a 1x1 logit
    layer, and a softmax over the tissue cells."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(3, width, stride=2), _conv(width, width), _conv(width, width)
        )
        self.logits = nn.Conv2d(width, 1, 1)

    def forward(self, x_low: torch.Tensor) -> torch.Tensor:
        rgb, tissue = x_low[:, :3], x_low[:, 3:4]
        logits = self.logits(self.body(_standardise(rgb)))  # [B, 1, h', w']
        # A cell is allowed when any of its pixels is tissue.
        allowed = F.adaptive_max_pool2d(tissue, logits.shape[-2:]) > 0.5
        # A view without tissue keeps every cell rather than an empty distribution.
        allowed = allowed | ~allowed.flatten(1).any(1)[:, None, None, None]
        logits = logits.masked_fill(~allowed, float("-inf"))
        return torch.softmax(logits.flatten(1), dim=1).view(logits.shape[0], *logits.shape[-2:])


class SmallFeatureCNN(nn.Module):
    """Patches ``[M, 3, ph, pw]`` -> features ``[M, 2 * width]``: four 3x3
    convolutions (two with stride 2) and a global max pool, so a small structure
    anywhere in the patch shows."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.out_features = 2 * width
        self.body = nn.Sequential(
            _conv(3, width),
            _conv(width, 2 * width, stride=2),
            _conv(2 * width, 2 * width),
            _conv(2 * width, 2 * width, stride=2),
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return torch.amax(self.body(_standardise(patches)), dim=(-2, -1))


ATTENTION_NETS: dict[str, Callable[[int], nn.Module]] = {"small": SmallAttentionCNN}
FEATURE_NETS: dict[str, Callable[[int], nn.Module]] = {"small": SmallFeatureCNN}


def _build(registry: dict[str, Callable[[int], nn.Module]], kind: str, name: str, width: int):
    try:
        factory = registry[name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} network {name!r}; choose from {sorted(registry)}"
        ) from None
    return factory(width)


class Sampled(NamedTuple):
    """One forward of a ``SlideClassifier``.

    Attributes:
        logits: [B, n_classes].
        attention: [B, h', w'] attention probabilities (0 outside tissue).
        offsets: LongTensor [B, N, 2], ``(y, x)`` top-left of each patch in the patch
            level's pixel grid.
        sampled_attention: [B, N] attention probability of each patch.
        regularizer: scalar, the entropy regularizer's loss (0 when disabled).
    """

    logits: torch.Tensor
    attention: torch.Tensor
    offsets: torch.Tensor
    sampled_attention: torch.Tensor
    regularizer: torch.Tensor


class SlideClassifier(nn.Module):
    """Attention-sampling classifier of ``config``.

    ``sample(x_low, x_high, generator=None)`` -> ``Sampled``; ``forward`` returns
    only the logits. ``x_high`` is a tensor, a slide level (anything with ``shape``
    and ``read_patches``) or a list of them, one per batch item.

    It composes the core's ``sample_patches`` and ``expectation`` (rather than
    ``attention_sampling``) because prediction needs the sampled offsets and their
    attention, for the GeoJSON output.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.attention_net = _build(ATTENTION_NETS, "attention", config.attention_net, config.width)
        self.feature_net = _build(FEATURE_NETS, "feature", config.feature_net, config.width)
        self.head = nn.Linear(self.feature_net.out_features, len(config.class_names))
        self.regularizer = (
            pipeline.MultinomialEntropy(config.entropy_strength)
            if config.entropy_strength > 0
            else None
        )

    def sample(
        self, x_low: torch.Tensor, x_high, generator: torch.Generator | None = None
    ) -> Sampled:
        c = self.config
        attention = self.attention_net(x_low)  # [B, h', w']
        patches, sampled_attention, offsets = pipeline.sample_patches(
            x_low, x_high, attention, c.n_patches, c.patch_size, c.receptive_field,
            c.replace, generator=generator,
        )  # fmt: skip
        batch, n = sampled_attention.shape
        features = self.feature_net(patches.flatten(0, 1)).view(batch, n, -1)  # [B, N, D]
        features = pipeline.expectation(features, sampled_attention, c.replace)  # [B, D]
        regularizer = (
            self.regularizer(attention) if self.regularizer is not None else attention.new_zeros(())
        )
        return Sampled(self.head(features), attention, offsets, sampled_attention, regularizer)

    def forward(self, x_low: torch.Tensor, x_high) -> torch.Tensor:
        return self.sample(x_low, x_high).logits


class LowResClassifier(nn.Module):
    """The baseline that sees only the thumbnail: the same feature CNN applied to
    the whole RGB view ``[B, 3, h, w]`` (tissue channel dropped) and a linear head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.feature_net = _build(FEATURE_NETS, "feature", config.feature_net, config.width)
        self.head = nn.Linear(self.feature_net.out_features, len(config.class_names))

    def forward(self, x_low: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_net(x_low[:, :3]))

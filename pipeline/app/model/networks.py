"""Default networks and the slide classifier built from a ``ModelConfig``.

The attention view ``x_low`` of a slide is ``float [B, 3, h, w]``, RGB in [0, 1];
the tissue mask travels beside it as the core's ``mask`` (``BoolTensor [B, h, w]``),
so any attention network gives zero probability outside tissue without knowing
about it. Patches reach the feature network as ``float [M, 3, ph, pw]`` in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

import pipeline
from pipeline.app.config import ModelConfig
from pipeline.app.model import encoders
from pipeline.app.tasks import task_of


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)
    # He initialisation: PyTorch's default shrinks activations layer after layer,
    # which leaves these small networks nearly constant at the start of training.
    nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.ReLU())


def _standardise(rgb: torch.Tensor) -> torch.Tensor:
    """RGB ``[B, 3, h, w]`` in [0, 1] -> roughly zero mean, unit spread (fixed, no
    statistics kept), stored channels-last: with 3 to 16 channels the convolutions run
    several times faster that way on the CPU (the attention net's forward and backward
    on 4 views of 256² took 23 ms in the default order, 6 ms channels-last)."""
    return ((rgb - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)


class SmallAttentionCNN(nn.Module):
    """``x_low [B, 3, h, w]`` -> attention probabilities ``[B, ceil(h/2), ceil(w/2)]``.

    Three 3x3 convolutions ("same" padding, receptive field 0 in the mapping sense),
    the first with stride 2 so the rest runs on a quarter of the pixels, a 1x1 logit
    layer, and a softmax over all cells."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(3, width, stride=2), _conv(width, width), _conv(width, width)
        )
        self.logits = nn.Conv2d(width, 1, 1)
        self.softmax = pipeline.SampleSoftmax(squeeze_channels=True)

    def forward(self, x_low: torch.Tensor) -> torch.Tensor:
        return self.softmax(self.logits(self.body(_standardise(x_low))))


CPU_CHUNK_PIXELS = 8 * 224 * 224
"""On the CPU, ``SmallFeatureCNN`` runs on its patches in chunks of at most this many
pixels, so that each layer's activations stay in cache: 64 patches of 224² took 2x
longer in one call than in four calls of 16, forward and backward (the result is the
same: the network has no layer that mixes patches)."""


class SmallFeatureCNN(nn.Module):
    """Patches ``[M, 3, ph, pw]`` -> features ``[M, 2 * width]``: four 3x3
    convolutions (two with stride 2) and a global max pool, so a small structure
    anywhere in the patch shows. On the CPU, large inputs go through in chunks of
    ``CPU_CHUNK_PIXELS``."""

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
        per_chunk = max(1, CPU_CHUNK_PIXELS // (patches.shape[-2] * patches.shape[-1]))
        if patches.device.type == "cpu" and len(patches) > per_chunk:
            return torch.cat([self.forward(chunk) for chunk in patches.split(per_chunk)])
        return torch.amax(self.body(_standardise(patches)), dim=(-2, -1))


ATTENTION_NETS: dict[str, Callable[[int], nn.Module]] = {"small": SmallAttentionCNN}
FEATURE_NETS: dict[str, Callable[[int], nn.Module]] = {"small": SmallFeatureCNN}


def build_feature_net(config: ModelConfig) -> nn.Module:
    """The feature network of ``config`` with random weights: a built-in one of
    ``FEATURE_NETS``, or an external ``encoders.Encoder`` (``timm:`` / factory); it
    has ``out_features``. Pretrained weights are loaded by ``encoders.load_weights``."""
    if encoders.is_external(config.feature_net):
        return encoders.build_external(config)
    return _build(FEATURE_NETS, "feature", config.feature_net, config.width)


def _build(registry: dict[str, Callable[[int], nn.Module]], kind: str, name: str, width: int):
    try:
        factory = registry[name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} network {name!r}; choose from {sorted(registry)}"
        ) from None
    return factory(width)


class Classified(NamedTuple):
    """One forward of a ``SlideClassifier``.

    Attributes:
        logits: [B, n_outputs], the head's outputs (``model.task`` turns them into
            a loss and scores).
        draw: the core's ``pipeline.Draw`` the logits came from: attention
            ``[B, h', w']`` (0 outside the mask), ``offsets [B, N, 2]`` (``(y, x)``
            top-left in the patch level's pixels), ``sampled_attention [B, N]``,
            ``regularizer`` (0 when the entropy regularizer is off), ...
    """

    logits: torch.Tensor
    draw: pipeline.Draw


class SlideClassifier(nn.Module):
    """Attention-sampling model of ``config``: the core's ``AttentionSampling`` with
    the configured networks, and a linear head on the estimated features whose size
    the model's task (``task``, ``tasks.task_of(config)``) sets.

    ``classify(x_low, x_high, mask=None, generator=None, prior=None, step=None)`` ->
    ``Classified``; ``forward`` returns only the logits. ``x_high`` is a tensor, a
    slide level (anything with ``shape`` and ``read_patches``) or a list of them, one
    per batch item; ``mask`` restricts sampling (e.g. tissue, at ``x_low``'s
    resolution); ``prior`` and ``step`` serve exploration in training (the core's
    ``AttentionSampling.draw``; its weights are ``sampler.exploration`` and
    ``sampler.prior_weight``).

    With ``config.freeze_features`` the feature network's parameters do not require
    gradients and it stays in eval mode (batch norm statistics fixed) whatever
    ``train()`` is asked.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        features = build_feature_net(config)
        regularizer = (
            pipeline.MultinomialEntropy(config.entropy_strength)
            if config.entropy_strength > 0
            else None
        )
        self.sampler = pipeline.attention_sampling(
            _build(ATTENTION_NETS, "attention", config.attention_net, config.width),
            features,
            patch_size=config.patch_size,
            n_patches=config.n_patches,
            replace=config.replace,
            attention_regularizer=regularizer,
            receptive_field=config.receptive_field,
            estimator=config.estimator,
        )
        self.task = task_of(config)
        self.head = nn.Linear(features.out_features, self.task.n_outputs)
        if config.freeze_features:
            features.requires_grad_(False)

    def train(self, mode: bool = True) -> SlideClassifier:
        super().train(mode)
        if self.config.freeze_features:
            self.feature_net.eval()
        return self

    @property
    def attention_net(self) -> nn.Module:
        return self.sampler.attention

    @property
    def feature_net(self) -> nn.Module:
        return self.sampler.feature

    def classify(
        self,
        x_low: torch.Tensor,
        x_high,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        prior: torch.Tensor | None = None,
        step: int | None = None,
    ) -> Classified:
        draw = self.sampler.draw(x_low, x_high, mask, generator, prior, step)
        return Classified(self.head(draw.features), draw)

    def forward(self, x_low: torch.Tensor, x_high, mask: torch.Tensor | None = None):
        return self.classify(x_low, x_high, mask).logits


class LowResClassifier(nn.Module):
    """The baseline that sees only the thumbnail: the same feature CNN applied to
    the whole RGB view ``[B, 3, h, w]`` and a linear head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.task = task_of(config)
        self.feature_net = build_feature_net(config)
        self.head = nn.Linear(self.feature_net.out_features, self.task.n_outputs)

    def forward(self, x_low: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_net(x_low))

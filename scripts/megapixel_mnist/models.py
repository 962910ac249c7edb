"""The paper's Megapixel MNIST networks and the two baselines.

Every model maps `(x_low float32[B, 1, h, w], x_high float32[B, 1, H, W])` to an
`Output`: class logits `[B, 10]` and the attention regularizer's value (a scalar
tensor; zero for models without attention), so one training loop serves all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import nn

import pipeline

N_CLASSES = 10


class Output(NamedTuple):
    """logits [B, 10]; regularizer: scalar, to add to the training loss."""

    logits: torch.Tensor
    regularizer: torch.Tensor


class AttentionNet(nn.Sequential):
    """Three 3x3 convolutions (8, 8, 1 channels, tanh between) and a smoothed softmax.

    [B, 1, h, w] -> attention [B, h, w] (each map sums to 1).
    """

    def __init__(self, smooth: float = 1e-5) -> None:
        super().__init__(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, 1, 3, padding=1),
            pipeline.SampleSoftmax(squeeze_channels=True, smooth=smooth),
        )


class FeatureNet(nn.Module):
    """7x7 then three 3x3 unpadded convolutions (32 channels, ReLU), global max pooling,
    L2 normalisation: [M, 1, p, p] -> [M, 32].

    `trunk` is the convolutional part alone, which the full model runs densely over a
    whole canvas.
    """

    channels = 32

    def __init__(self) -> None:
        super().__init__()
        c = self.channels
        self.trunk = nn.Sequential(
            nn.Conv2d(1, c, 7),
            nn.ReLU(),
            nn.Conv2d(c, c, 3),
            nn.ReLU(),
            nn.Conv2d(c, c, 3),
            nn.ReLU(),
            nn.Conv2d(c, c, 3),
            nn.ReLU(),
        )

    @property
    def shrink(self) -> int:
        """Pixels lost per axis by the unpadded convolutions (a p patch -> p - shrink)."""
        return sum(m.kernel_size[0] - 1 for m in self.trunk if isinstance(m, nn.Conv2d))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return _l2_normalize(self.trunk(patches).amax(dim=(2, 3)))


def keras_init(model: nn.Module) -> None:
    """Glorot-uniform weights and zero biases, the original Keras code's defaults;
    convolution weights stored channels-last.

    With zero biases an empty (all-zero) patch has all-zero activations, so early in
    training the max-pooled features respond to strokes only; with PyTorch's default
    initialisation the networks here barely leave chance level in the first hundred
    steps, which the quick preset cannot afford.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)
    # Channels-last convolution weights make PyTorch's CPU convolutions channels-last
    # even on these 1-channel inputs: the feature net's forward and backward on 320
    # patches of 50^2 took 1.6x less time.
    model.to(memory_format=torch.channels_last)


def _l2_normalize(features: torch.Tensor, dim: int = 1) -> torch.Tensor:
    return torch.nn.functional.normalize(features, dim=dim, eps=1e-12)


class ATSModel(nn.Module):
    """Attention sampling (the library) with the paper's networks and a linear head.

    estimator: "unbiased" (docs/estimator.md) or "reference" (the original library's
    attention gradient for sampling without replacement).
    exploration / prior_weight: cold-start remedies (docs/estimator.md), constants or
    schedules of the training step (`pipeline.linear_decay`): in training, patches are
    drawn from `(1 - w)((1 - e) a + e u) + w p`, `u` uniform and `p` the content prior,
    here the low-resolution view's brightness (strokes and noise are bright, the
    background is black); the estimate stays unbiased.
    centred_head: a cold-start remedy that changes the network, not the estimator: the
    estimated features `[B, 32]` are standardised over the batch (a `BatchNorm1d`
    without affine parameters; running statistics at test time) before the linear
    head. At initialisation the L2-normalised max-pooled features of every patch point
    in nearly the same direction (each channel's maximum grows with the strokes'
    contrast alike), so the head sees almost the same input for every canvas and the
    loss sits at ln 10 for hundreds of steps; centring removes that common direction.
    early_patches / early_steps: draw `early_patches` patches per canvas instead of
    `n_patches` in the first `early_steps` training steps (0: never). More samples of
    the same proposal: the estimate stays unbiased, its variance falls, and the
    feature net sees more patches per step.
    regularizer: the entropy regularizer's strength (`pipeline.MultinomialEntropy`), a
    constant or a schedule of the training step (`entropy_ramp`); a negative strength
    sharpens the attention. It changes the training objective, not the estimator.
    """

    def __init__(
        self,
        patch_size: int = 50,
        n_patches: int = 10,
        regularizer: float | Callable[[int], float] = 1e-4,
        smooth: float = 1e-5,
        estimator: str = "unbiased",
        exploration: pipeline.proposals.Weight = 0.0,
        prior_weight: pipeline.proposals.Weight = 0.0,
        centred_head: bool = False,
        early_patches: int = 0,
        early_steps: int = 0,
    ) -> None:
        super().__init__()
        self.patch_size, self.n_patches = patch_size, n_patches
        self.early_patches, self.early_steps = early_patches, early_steps
        self.regularizer = regularizer
        self.ats = pipeline.attention_sampling(
            AttentionNet(smooth),
            FeatureNet(),
            patch_size=(patch_size, patch_size),
            n_patches=n_patches,
            replace=False,
            attention_regularizer=pipeline.MultinomialEntropy(
                regularizer(0) if callable(regularizer) else regularizer
            ),
            receptive_field=0,
            estimator=estimator,
            exploration=exploration,
            prior_weight=prior_weight,
        )
        linear = nn.Linear(FeatureNet.channels, N_CLASSES)
        self.centred_head = centred_head
        self.head = (
            nn.Sequential(nn.BatchNorm1d(FeatureNet.channels, affine=False), linear)
            if centred_head
            else linear
        )
        keras_init(self)

    def forward(self, x_low: torch.Tensor, x_high: torch.Tensor, step: int = 0) -> Output:
        prior = brightness_prior(x_low) if self.ats.prior_weight else None
        early = self.training and self.early_patches and step < self.early_steps
        self.ats.n_patches = self.early_patches if early else self.n_patches
        if self.training and callable(self.regularizer):
            self.ats.attention_regularizer.strength = self.regularizer(step)
        return self.classify(self.ats.draw(x_low, x_high, prior=prior, step=step))

    @torch.no_grad()
    def refresh_head_statistics(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Recompute the centred head's test-time mean and variance from `(x_low, x_high)`
        batches drawn as at test time, with the weights as they are now ("precise
        batch norm"). The running averages kept during training lag behind features
        that change fast early on: on `easy` after one epoch they gave 73 % test error
        where each test batch's own statistics gave 44 %.
        """
        norm = self.head[0]
        was_training = self.training
        self.eval()
        norm.train()
        norm.reset_running_stats()
        momentum, norm.momentum = norm.momentum, None  # None: a cumulative average
        for x_low, x_high in batches:
            self(x_low, x_high)
        norm.momentum = momentum
        self.train(was_training)

    def fit_attention_to_prior(self, views: Iterable[torch.Tensor], lr: float = 1e-2) -> int:
        """Train the attention net alone towards the brightness prior: one Adam step per
        low-resolution batch `[B, 1, h, w]` of `views`, minimising the cross-entropy
        `-sum_k p_k log a_k` (p the normalised prior). A cold-start remedy that changes
        the initial weights only, not the estimator; it uses no labels and reads no
        patches. Returns the number of steps taken.
        """
        attention_net = self.ats.attention
        optimizer = torch.optim.Adam(attention_net.parameters(), lr=lr)
        steps = 0
        for x_low in views:
            loss = pipeline.prior_cross_entropy(attention_net(x_low), brightness_prior(x_low))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
        return steps

    def classify(self, draw: pipeline.Draw) -> Output:
        """The output of one draw (``self.ats.draw``): figures show that draw's patches."""
        return Output(self.head(draw.features), draw.regularizer)


def brightness_prior(x_low: torch.Tensor) -> torch.Tensor:
    """The content prior of a low-resolution batch `[B, 1, h, w]`: its brightness `[B, h, w]`
    (strokes and noise are bright, the background black), with a small floor that keeps
    it positive on a black canvas (no all-zero item)."""
    return x_low[:, 0] + 1e-3


class LowResCNN(nn.Module):
    """Baseline: the feature network run on the whole low-resolution view, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = FeatureNet()
        self.head = nn.Linear(FeatureNet.channels, N_CLASSES)
        keras_init(self)

    def forward(self, x_low: torch.Tensor, x_high: torch.Tensor, step: int = 0) -> Output:
        return Output(self.head(self.features(x_low)), self.head.weight.new_zeros(()))


def grid_offsets(low_size: int, high_size: int, patch_size: int) -> torch.Tensor:
    """Top-left offsets (LongTensor[low_size]) in x_high, along one axis, of the patch of
    every attention cell, for an attention map as large as the low-resolution view
    (SamplePatches' mapping, `pipeline.patch_offsets`, receptive field 0).
    """
    cells = torch.arange(low_size)[:, None]  # [h', 1]: every cell of a 1-D map
    sizes = ((low_size,), (low_size,), (high_size,), (patch_size,))
    return pipeline.patch_offsets(cells, *sizes)[:, 0]


class FullModel(nn.Module):
    """Baseline: the exact expectation that attention sampling estimates.

    Features are computed for the patch of every attention cell (the same patches
    SamplePatches would extract) and averaged with the full attention map:
    `sum_k a_k f_k`. Because the feature trunk is convolutional, running it once over
    the zero-padded canvas and max-pooling each patch's window gives every patch's
    features at the cost of one pass over the canvas.
    """

    def __init__(self, patch_size: int = 50, regularizer: float = 1e-4, smooth: float = 1e-5):
        super().__init__()
        self.patch_size = patch_size
        self.attention = AttentionNet(smooth)
        self.features = FeatureNet()
        self.entropy = pipeline.MultinomialEntropy(regularizer)
        self.head = nn.Linear(FeatureNet.channels, N_CLASSES)
        keras_init(self)

    def patch_features(self, x_low: torch.Tensor, x_high: torch.Tensor) -> torch.Tensor:
        """Features of every attention cell's patch: [B, D, h', w'] for x_low's [h', w']."""
        (h, w), (H, W), p = x_low.shape[-2:], x_high.shape[-2:], self.patch_size
        oy = grid_offsets(h, H, p).to(x_high.device)
        ox = grid_offsets(w, W, p).to(x_high.device)
        pad = max(0, -int(oy[0]), -int(ox[0]), int(oy[-1]) + p - H, int(ox[-1]) + p - W)
        dense = self.features.trunk(nn.functional.pad(x_high, (pad,) * 4))  # [B, D, ., .]
        window = p - self.features.shrink
        # Separable max over each window (two 1-D passes instead of one window^2 pass).
        dense = nn.functional.max_pool2d(dense, (window, 1), stride=1)
        dense = nn.functional.max_pool2d(dense, (1, window), stride=1)
        picked = dense[:, :, oy + pad][:, :, :, ox + pad]  # [B, D, h', w']
        return _l2_normalize(picked)

    def forward(self, x_low: torch.Tensor, x_high: torch.Tensor, step: int = 0) -> Output:
        attention = self.attention(x_low)  # [B, h', w']
        features = self.patch_features(x_low, x_high)
        logits = self.head(torch.einsum("bhw,bdhw->bd", attention, features))
        return Output(logits, self.entropy(attention))


def exact_twin(model: ATSModel) -> FullModel:
    """A FullModel sharing `model`'s attention, feature and head modules: it computes the
    exact `sum_k a_k f_k` that `model` estimates from its sampled patches."""
    twin = FullModel(model.patch_size)
    twin.attention, twin.features, twin.head = model.ats.attention, model.ats.feature, model.head
    return twin


def entropy_ramp(
    start: float, end: float, begin_step: int, end_step: int
) -> Callable[[int], float]:
    """An entropy-regularizer strength: `start` until `begin_step`, then linear to `end`
    at `end_step` and `end` from there on (e.g. the paper's 1e-4 to a negative strength
    that sharpens the attention late in training)."""
    if not 0 <= begin_step < end_step:
        raise ValueError(f"need 0 <= begin_step < end_step, got {begin_step}, {end_step}")

    def strength(step: int) -> float:
        t = min(max((step - begin_step) / (end_step - begin_step), 0.0), 1.0)
        return start + t * (end - start)

    return strength


def _regularizer(cfg) -> float | Callable[[int], float]:
    """The preset's entropy strength: constant, or ramped to `regularizer_end` from the
    end of the remedies (`remedy_steps`) to the end of the budget."""
    if cfg.regularizer_end is None:
        return cfg.regularizer
    budget = cfg.epochs["ats-unbiased"] * -(-cfg.n_train // cfg.batch_size)
    return entropy_ramp(cfg.regularizer, cfg.regularizer_end, cfg.remedy_steps, budget)


def _schedule(start: float, steps: int) -> pipeline.proposals.Weight:
    """`start` decaying linearly to 0 over `steps` training steps (constant if steps=0)."""
    return pipeline.linear_decay(start, steps) if start and steps else start


MODELS = {
    "ats-unbiased": lambda cfg: ATSModel(
        cfg.patch_size,
        cfg.n_patches,
        _regularizer(cfg),
        estimator=cfg.estimator,
        exploration=_schedule(cfg.exploration, cfg.remedy_steps),
        prior_weight=_schedule(cfg.prior_weight, cfg.remedy_steps),
        centred_head=cfg.centred_head,
        early_patches=cfg.early_patches,
        early_steps=cfg.remedy_steps,
    ),
    "ats-reference": lambda cfg: ATSModel(
        cfg.patch_size, cfg.n_patches, cfg.regularizer, estimator="reference"
    ),
    "low-res-cnn": lambda cfg: LowResCNN(),
    "full": lambda cfg: FullModel(cfg.patch_size, cfg.regularizer),
}

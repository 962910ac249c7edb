"""Cold-start remedies of training: exploration schedules, more patches early, and
the attention fitted to a content prior before the first epoch.

Exploration draws patches from a proposal (the attention mixed with uniform or a
content prior) and weighs them so the estimate stays unbiased (docs/estimator.md,
sampling from a proposal); fitting the attention to a prior changes only the
initial weights. Prediction never explores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

import pipeline
from pipeline.app.config import TrainConfig
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.training.data import LabelledSlide
from pipeline.app.training.streaming import stack_priors, stack_views


def set_exploration(model: SlideClassifier, n_slides: int, config: TrainConfig) -> None:
    """Set the model's exploration weights from ``config``, as schedules over the slides
    trained on (``n_slides`` per epoch); training mode only: ``SlideClassifier`` in eval
    mode samples from the attention."""
    total = round(config.remedy_epochs * n_slides)

    def schedule(weight: float) -> pipeline.proposals.Weight:
        return pipeline.linear_decay(weight, total) if weight and total else weight

    model.sampler.exploration = schedule(config.exploration)
    model.sampler.prior_weight = schedule(config.prior_weight)


def early_patches(
    n_patches: int, n_slides: int, config: TrainConfig
) -> Callable[[int], int] | None:
    """Patches per slide as a function of the slides trained on before a batch
    (``n_slides`` per epoch): ``config.early_patches`` during the first
    ``remedy_epochs``, ``n_patches`` after; None without early patches."""
    if not config.early_patches:
        return None
    until = round(config.remedy_epochs * n_slides)
    return lambda trained: config.early_patches if trained < until else n_patches


def fit_attention_to_prior(
    model: SlideClassifier,
    slides: Sequence[LabelledSlide],
    config: TrainConfig,
    device: torch.device,
) -> float:
    """Fit the attention net alone to the content prior ``config.prior`` (see
    ``TrainConfig.prior_init_steps``): each step takes ``batch_size`` slides at random
    and minimises ``-sum_k p_k log a_k``, ``a`` the attention restricted to tissue and
    ``p`` the prior on its grid, normalised. Returns the last step's loss."""
    optimizer = torch.optim.Adam(model.attention_net.parameters(), lr=1e-2)
    rng = np.random.default_rng([config.seed, config.prior_init_steps])
    loss = torch.zeros(())
    for _ in range(config.prior_init_steps):
        chosen = rng.choice(len(slides), size=min(config.batch_size, len(slides)), replace=False)
        views = [slides[i].view for i in chosen]
        x_low, mask, shape = stack_views(views, device)
        prior = stack_priors(views, config.prior, shape, device)
        attention, _ = model.sampler.attend(x_low, mask)  # [B, h', w'], on tissue
        target = pipeline.prior_on_grid(prior, attention.shape[1:])
        loss = pipeline.prior_cross_entropy(attention, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())

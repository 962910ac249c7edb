"""The low-resolution-only baseline: the same feature CNN trained on thumbnails.

It answers "does the task need high resolution?": on the synthetic dataset it
should stay near chance while attention sampling does not.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.app.config import ModelConfig, TrainConfig
from pipeline.app.model.networks import LowResClassifier
from pipeline.app.slide.views import low_res_tensor
from pipeline.app.training.loop import LabelledSlide


def train_low_res(
    slides: list[LabelledSlide],
    config: ModelConfig,
    train_config: TrainConfig,
    device: torch.device | str = "cpu",
) -> LowResClassifier:
    """Fit a ``LowResClassifier`` on the slides' thumbnails with ``train``'s optimizer
    settings and epochs, one slide per forward, gradients accumulated over
    ``batch_size`` slides per step."""
    with torch.random.fork_rng(devices=[]):  # weights from the seed, caller's state kept
        torch.manual_seed(train_config.seed)
        model = LowResClassifier(config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    views = [low_res_tensor(s.thumbnail, device) for s in slides]
    for epoch in range(1, train_config.epochs + 1):
        order = np.random.default_rng([train_config.seed, epoch]).permutation(len(slides))
        for n, i in enumerate(order, start=1):
            target = torch.tensor([slides[i].label], device=device)
            loss = F.cross_entropy(model(views[i]), target) / train_config.batch_size
            loss.backward()
            if n % train_config.batch_size == 0 or n == len(order):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def low_res_accuracy(model: LowResClassifier, slides: list[LabelledSlide]) -> float:
    device = next(model.parameters()).device
    correct = [int(model(low_res_tensor(s.thumbnail, device)).argmax(1)) == s.label for s in slides]
    return sum(correct) / len(correct)

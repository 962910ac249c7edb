"""The low-resolution-only baseline: the same feature CNN trained on thumbnails.

It answers "does the task need high resolution?": on the synthetic dataset it
should stay near chance while attention sampling does not. Loss and metrics are the
model's task's, as for attention sampling.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.app.config import ModelConfig, TrainConfig
from pipeline.app.model.networks import LowResClassifier
from pipeline.app.slide.views import low_res_tensor
from pipeline.app.training.data import LabelledSlide


def train_low_res(
    slides: list[LabelledSlide],
    config: ModelConfig,
    train_config: TrainConfig,
    device: torch.device | str = "cpu",
) -> LowResClassifier:
    """Fit a ``LowResClassifier`` on the slides' thumbnails with ``train``'s optimizer
    settings and epochs, ``batch_size`` slides per step (one forward each, the task's
    loss over the batch)."""
    with torch.random.fork_rng(devices=[]):  # weights from the seed, caller's state kept
        torch.manual_seed(train_config.seed)
        model = LowResClassifier(config).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    views = [low_res_tensor(s.thumbnail, device) for s in slides]
    task, size = model.task, train_config.batch_size
    for epoch in range(1, train_config.epochs + 1):
        order = np.random.default_rng([train_config.seed, epoch]).permutation(len(slides))
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            # Thumbnails differ in shape: one forward each, one loss over the batch
            # (a survival loss compares the batch's slides).
            outputs = torch.cat([model(views[i]) for i in batch])  # [B, n_outputs]
            target = task.collate([slides[i].target for i in batch], device)
            (task.loss(outputs, target).sum() / size).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def low_res_metrics(model: LowResClassifier, slides: list[LabelledSlide]) -> dict:
    """The task's metrics (``Task.metrics``) of the baseline on ``slides``."""
    device = next(model.parameters()).device
    outputs = torch.cat([model(low_res_tensor(s.thumbnail, device)) for s in slides])
    scores = model.task.scores(outputs).cpu().numpy()
    return model.task.metrics([s.target for s in slides], scores)

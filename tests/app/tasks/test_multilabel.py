"""The multi-label task: missing values are masked out of the loss and the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from pipeline.app.config import ModelConfig
from pipeline.app.errors import ConfigError, UserError
from pipeline.app.tasks import Multilabel, task_of

TASK = Multilabel(("er", "pr", "her2"))


def test_missing_values_are_masked_out_of_the_loss():
    targets = [TASK.parse(("1", "", "0"), "r2"), TASK.parse(("", "", "1"), "r3")]
    y = TASK.collate(targets, torch.device("cpu"))
    outputs = torch.tensor([[2.0, -7.0, -1.0], [9.0, 9.0, 0.5]], requires_grad=True)
    loss = TASK.loss(outputs, y)
    first = F.binary_cross_entropy_with_logits(outputs[0, [0, 2]], torch.tensor([1.0, 0.0]))
    second = F.binary_cross_entropy_with_logits(outputs[1, 2], torch.tensor(1.0))
    torch.testing.assert_close(loss, torch.stack([first, second]))
    loss.sum().backward()
    assert outputs.grad[0, 1] == 0 and outputs.grad[1, 0] == 0 and outputs.grad[1, 1] == 0


def test_metrics_per_target_on_the_known_slides():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(12, 3)).astype(float)
    y[:, 1] = [0, 1] * 6
    y[[0, 5], 0] = math.nan
    y[:, 2] = 1.0  # one class only: undefined
    scores = rng.random((12, 3))
    m = TASK.metrics([tuple(r) for r in y], scores)
    known = ~np.isnan(y[:, 0])
    assert m["auc_er"] == pytest.approx(skm.roc_auc_score(y[known, 0], scores[known, 0]))
    assert m["auc_pr"] == pytest.approx(skm.roc_auc_score(y[:, 1], scores[:, 1]))
    assert m["auc_her2"] is None
    assert m["mean_auc"] == pytest.approx((m["auc_er"] + m["auc_pr"]) / 2)


def test_parse_labels_and_columns():
    assert TASK.parse(("yes", "0", ""), "r")[:2] == (1.0, 0.0)
    with pytest.raises(UserError, match="row 7: pr '2' is not 1, 0 or empty"):
        TASK.parse(("1", "2", "0"), "row 7")
    assert TASK.label(np.array([0.9, 0.2, 0.5])) == "er;her2"
    assert TASK.score_columns == ("prob_er", "prob_pr", "prob_her2")
    with pytest.raises(ConfigError, match="--targets"):
        task_of(ModelConfig(task="multilabel"))

"""The classification task: targets, loss, scores and metrics against direct
computations with torch and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from pipeline.app.config import ModelConfig
from pipeline.app.errors import ConfigError, UserError
from pipeline.app.tasks import Classification, TargetError, task_class, task_of
from pipeline.app.tasks.classification import point_metrics

TASK = Classification(("benign", "tumour", "normal"))


def test_task_of_a_config_and_its_errors():
    task = task_of(ModelConfig(class_names=("a", "b")))
    assert isinstance(task, Classification) and task.n_outputs == 2
    assert task.target_columns == ("label",)
    assert task_of(ModelConfig(class_names=("a", "b"), targets=("subtype",))).target_columns == (
        "subtype",
    )
    with pytest.raises(ConfigError, match="at least 2 classes"):
        task_of(ModelConfig(class_names=("a",)))
    with pytest.raises(ConfigError, match="duplicates"):
        task_of(ModelConfig(class_names=("a", "a")))
    with pytest.raises(ConfigError, match="task: expected one of"):
        task_of(ModelConfig(class_names=("a", "b"), task="ranking"))


def test_classes_are_completed_from_the_labels_without_touching_the_config():
    config = ModelConfig()
    done = task_class(config).complete(config, [("b",), ("a",), ("b",)])
    assert done.class_names == ("a", "b") and config.class_names == ()
    given = ModelConfig(class_names=("x", "y"))
    assert task_class(given).complete(given, [("a",)]) is given


def test_parse_and_check():
    assert TASK.parse(("tumour",), "row 2") == 1
    with pytest.raises(TargetError, match="'other' not in classes"):
        TASK.parse(("other",), "row 3")
    notes = TASK.check([0, 1, 1], "labels.csv")
    assert notes == ["labels.csv: class 'normal' has no readable slide to train on"]
    with pytest.raises(UserError, match="fewer than two classes"):
        TASK.check([2, 2], "labels.csv")


def test_loss_and_scores_are_cross_entropy_and_softmax():
    outputs = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    targets = TASK.collate([0, 2], torch.device("cpu"))
    torch.testing.assert_close(
        TASK.loss(outputs, targets), F.cross_entropy(outputs, targets, reduction="none")
    )
    scores = TASK.scores(outputs)
    torch.testing.assert_close(scores.sum(1), torch.ones(2))
    assert TASK.label(scores[1].numpy()) == "normal"
    assert TASK.score_columns == ("prob_benign", "prob_tumour", "prob_normal")


def test_balance_weights_equalise_the_classes():
    targets = [0, 0, 0, 1]
    weights = TASK.balance_weights(targets)
    np.testing.assert_allclose(weights, [4 / 6, 4 / 6, 4 / 6, 4 / 2])
    # every present class carries the same total weight
    assert weights[:3].sum() == pytest.approx(weights[3:].sum())
    np.testing.assert_array_equal(TASK.strata(targets), targets)


def test_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    probs = rng.dirichlet(np.ones(3), size=len(y))
    m = TASK.metrics(y.tolist(), probs)
    assert m["accuracy"] == skm.accuracy_score(y, probs.argmax(1))
    assert m["balanced_accuracy"] == skm.balanced_accuracy_score(y, probs.argmax(1))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert TASK.train_metrics(y.tolist(), probs) == {"accuracy": m["accuracy"]}


def test_point_metrics_auc_undefined_with_one_class():
    probs = np.array([[0.8, 0.2], [0.3, 0.7]])
    m = point_metrics(np.array([0, 0]), probs)
    assert m["roc_auc"] is None and m["accuracy"] == 0.5


def test_selection_metric_defaults_and_refuses_unknown_names():
    assert TASK.check_select(None) == "roc_auc"
    assert TASK.check_select("balanced_accuracy") == "balanced_accuracy"
    with pytest.raises(UserError, match="selects by one of"):
        TASK.check_select("r2")

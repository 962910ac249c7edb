"""The regression task: standardised targets, losses and metrics against scikit-learn
and SciPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn import metrics as skm

from pipeline.app import files
from pipeline.app.config import ModelConfig
from pipeline.app.errors import ConfigError, UserError
from pipeline.app.slide.labels import read_labels
from pipeline.app.tasks import Regression, task_class, task_of


def test_stats_come_from_the_labels_and_standardise_the_loss():
    config = ModelConfig(task="regression")
    done = task_class(config).complete(config, [("1",), ("3",), ("5",)])
    mean, sd = done.target_stats
    assert mean == 3.0 and sd == pytest.approx(np.std([1, 3, 5]))
    task = task_of(done)
    outputs = torch.tensor([[0.0], [1.0]])
    targets = task.collate([3.0, 5.0], torch.device("cpu"))
    standard = (targets - mean) / sd
    torch.testing.assert_close(task.loss(outputs, targets), (outputs[:, 0] - standard) ** 2)
    torch.testing.assert_close(task.scores(outputs)[:, 0], torch.tensor([3.0, 3.0 + sd]))
    huber = task_of(ModelConfig(task="regression", loss="huber", target_stats=(mean, sd)))
    expected = F.huber_loss(outputs[:, 0], standard, reduction="none")
    torch.testing.assert_close(huber.loss(outputs, targets), expected)


def test_metrics_equal_scikit_learn_and_scipy():
    rng = np.random.default_rng(0)
    y = rng.normal(size=20)
    pred = y + rng.normal(scale=0.5, size=20)
    m = Regression().metrics(y.tolist(), pred[:, None])
    assert m["r2"] == pytest.approx(skm.r2_score(y, pred))
    assert m["mae"] == pytest.approx(skm.mean_absolute_error(y, pred))
    assert m["pearson_r"] == pytest.approx(stats.pearsonr(y, pred).statistic)
    constant = Regression().metrics([1.0, 1.0], np.array([[0.5], [0.7]]))
    assert constant["r2"] is None and constant["pearson_r"] is None


def test_a_missing_or_non_numeric_target_is_an_error_naming_the_row(tmp_path):
    with pytest.raises(UserError, match=r"labels.csv line 3: value 'high' is not a finite"):
        Regression().parse(("high",), "labels.csv line 3")
    rows = [{"slide": "a.tiff", "value": "1.5"}, {"slide": "b.tiff", "value": ""}]
    files.write_csv(tmp_path / "labels.csv", ["slide", "value"], rows)
    with pytest.raises(UserError, match=r"labels.csv line 3: b.tiff: no value given"):
        read_labels(tmp_path / "labels.csv", targets=("value",), empty_is_error=True)


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError, match="loss"):
        task_of(ModelConfig(task="regression", loss="l1"))
    with pytest.raises(ConfigError, match="no classes"):
        task_of(ModelConfig(task="regression", class_names=("a", "b")))
    with pytest.raises(UserError, match="no classes to balance"):
        Regression().balance_weights([1.0, 2.0])


def test_strata_are_quartiles():
    strata = Regression().strata(list(range(8)))
    np.testing.assert_array_equal(strata, [0, 0, 1, 1, 2, 2, 3, 3])


def test_a_bad_target_stops_training_before_any_slide_is_read(tmp_path, monkeypatch, capsys):
    from pipeline.app.cli import main
    from pipeline.app.training import streaming
    from tests.app.commands import train_argv

    reads = []
    monkeypatch.setattr(streaming.ViewCache, "load", lambda self, path: reads.append(path))
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,value\na.tiff,0.3\nb.tiff,high\n")
    argv = train_argv(tmp_path, labels, tmp_path / "run", "--task", "regression")
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "labels.csv line 3: value 'high' is not a finite" in err
    assert reads == []  # a spy: no slide view was read

"""Each task end to end through the command line on its synthetic dataset: synth ->
train -> predict -> evaluate, on tiny slides (classification: tests/app/test_cli.py)."""

from __future__ import annotations

import json

import pytest

from pipeline.app import files
from pipeline.app.cli import main
from pipeline.app.config import RunConfig
from pipeline.app.synth import TASK_COLUMNS

MODEL = ["--n-patches", "4", "--patch-size", "32", "--low-res-max-side", "96", "--device", "cpu"]
CASES = {
    "regression": ([], ("pred_value",), ("r2", "mae", "pearson_r")),
    "survival": ([], ("risk",), ("c_index", "c_index_uno", "td_auc")),
    "multilabel": (
        ["--targets", "atypical,striped"],
        ("prob_atypical", "prob_striped"),
        ("mean_auc", "auc_atypical", "auc_striped"),
    ),
}


@pytest.mark.parametrize("task", sorted(CASES))
def test_synth_train_predict_evaluate(task, tmp_path, capsys):
    extra, scores, metrics = CASES[task]
    data, run, pred, ev = (tmp_path / d for d in ("data", "run", "pred", "eval"))
    assert main(["-q", "synth", str(data), "--n", "8", "--size", "512", "--task", task]) == 0
    labels = data / "labels.csv"
    assert list(files.read_csv(labels)[0]) == ["slide", *TASK_COLUMNS[task]]
    train = ["train", "--slides", str(data), "--labels", str(labels), "--out", str(run)]
    train += ["--task", task, *extra, "--epochs", "1", "--batch-size", "4", "--no-view-cache"]
    assert main(["-q", *train, *MODEL]) == 0
    config = RunConfig.from_json((run / "config.json").read_text())
    assert config.model.task == task
    header = list(files.read_csv(run / "metrics.csv")[0])
    assert header[:2] == ["epoch", "train_loss"] and f"val_{metrics[0]}" in header
    predict = ["predict", "--model", str(run), "--slides", str(data), "--out", str(pred)]
    assert main(["-q", *predict, "--draws", "2", "--no-report"]) == 0
    rows = files.read_csv(pred / "predictions.csv")
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    for column in scores:
        assert all(float(r[column]) == float(r[column]) for r in rows)  # numbers, not NaN
        assert f"{column}_sd" in rows[0]
    evaluate = ["evaluate", "--predictions", str(pred), "--labels", str(labels)]
    assert main([*evaluate, "--out", str(ev), "--bootstrap", "20"]) == 0
    result = json.loads((ev / "metrics.json").read_text())
    assert result["task"] == task and result["summary"] == list(metrics)
    assert result["counts"]["evaluated"] + len(result["not_evaluated"]) == 8
    for name in metrics:
        value = result[name]["value"]
        assert value is None or isinstance(value, float)
    out = capsys.readouterr().out
    assert metrics[0].replace("_", " ") in out

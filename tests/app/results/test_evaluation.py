"""``evaluate`` / ``ats-wsi evaluate``: metrics of a hand-made predictions.csv against
a labels CSV equal scikit-learn's on the same arrays; excluded slides are counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from pipeline.app import files
from pipeline.app.cli import main
from pipeline.app.errors import UserError
from pipeline.app.results.evaluation import evaluate, prediction_classes

CLASSES = ["benign", "tumour"]
# (slide, true label, predicted label, P(tumour)): scored rows, in file order.
SCORED = [
    ("s01", "benign", "benign", 0.10),
    ("s02", "benign", "benign", 0.35),
    ("s03", "benign", "tumour", 0.62),
    ("s04", "benign", "benign", 0.20),
    ("s05", "benign", "benign", 0.45),
    ("s06", "tumour", "tumour", 0.91),
    ("s07", "tumour", "benign", 0.40),
    ("s08", "tumour", "tumour", 0.77),
    ("s09", "tumour", "tumour", 0.55),
    ("s10", "tumour", "tumour", 0.88),
    ("s11", "tumour", "benign", 0.48),
    ("s12", "benign", "benign", 0.05),
]


def write_case(tmp_path):
    """predictions.csv as predict writes it, plus columns another version may add
    (spread, QC), a failed slide, a no_tissue slide and an unlabelled one; and a
    labels CSV with one slide that has no prediction row."""
    columns = [
        "slide",
        "path",
        "status",
        "label",
        "prob_benign",
        "prob_tumour",
        "prob_benign_sd",
        "prob_tumour_sd",
        "tissue_fraction",
        "error",
    ]
    rows = [
        {
            "slide": s,
            "path": f"/data/{s}.svs",
            "status": "ok",
            "label": pred,
            "prob_benign": f"{1 - p:.6f}",
            "prob_tumour": f"{p:.6f}",
            "prob_benign_sd": "0.01",
            "prob_tumour_sd": "0.01",
            "tissue_fraction": "0.4",
        }
        for s, _, pred, p in SCORED
    ]
    rows += [
        {"slide": "s13", "path": "/data/s13.svs", "status": "error", "error": "SlideError: bad"},
        {"slide": "s14", "path": "/data/s14.svs", "status": "no_tissue", "tissue_fraction": "0"},
        {
            "slide": "x99",
            "path": "/data/x99.svs",
            "status": "ok",
            "label": "benign",
            "prob_benign": "0.9",
            "prob_tumour": "0.1",
        },
    ]
    files.write_csv(tmp_path / "predictions.csv", columns, rows)
    labels = [{"slide": f"{s}.svs", "label": t} for s, t, _, _ in SCORED]
    labels += [
        {"slide": "s13.svs", "label": "tumour"},
        {"slide": "s14", "label": "benign"},
        {"slide": "s15.svs", "label": "tumour"},
    ]
    files.write_csv(tmp_path / "labels.csv", ["slide", "label"], labels)
    return tmp_path / "predictions.csv", tmp_path / "labels.csv"


def test_metrics_equal_scikit_learn(tmp_path):
    predictions, labels = write_case(tmp_path)
    result = evaluate(predictions, labels, tmp_path / "out", n_bootstrap=200, seed=1)
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m == json.loads(json.dumps(result.metrics))
    y = np.array([CLASSES.index(t) for _, t, _, _ in SCORED])
    pred = np.array([CLASSES.index(p) for _, _, p, _ in SCORED])
    score = np.array([p for *_, p in SCORED])
    assert m["classes"] == CLASSES
    assert m["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"]["value"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, score))
    precision, recall, f1, support = skm.precision_recall_fscore_support(y, pred)
    for c, name in enumerate(CLASSES):
        entry = m["per_class"][name]
        assert entry["precision"]["value"] == pytest.approx(precision[c])
        assert entry["recall"]["value"] == pytest.approx(recall[c])
        assert entry["f1"]["value"] == pytest.approx(f1[c])
        assert entry["support"] == support[c]
    assert m["confusion_matrix"]["matrix"] == skm.confusion_matrix(y, pred).tolist()
    for name in ("accuracy", "balanced_accuracy", "roc_auc"):
        lo, hi = m[name]["ci95"]
        assert 0 <= lo < hi <= 1 and lo <= m[name]["value"] <= hi
    # Same seed, same intervals; another seed, other intervals.
    again = evaluate(predictions, labels, tmp_path / "again", n_bootstrap=200, seed=1).metrics
    other = evaluate(predictions, labels, tmp_path / "other", n_bootstrap=200, seed=2).metrics
    assert again["roc_auc"]["ci95"] == m["roc_auc"]["ci95"] != other["roc_auc"]["ci95"]


def test_slides_not_evaluated_are_counted_and_listed(tmp_path):
    predictions, labels = write_case(tmp_path)
    m = evaluate(predictions, labels, tmp_path / "out", n_bootstrap=10).metrics
    counts = m["counts"]
    assert counts["labelled_slides"] == 15 and counts["evaluated"] == 12
    assert counts["not_evaluated"] == {
        "no prediction row": 1,
        "not classified (status no_tissue)": 1,
        "prediction failed": 1,
    }
    assert counts["predictions_without_label"] == 1
    reasons = {e["slide"]: e["reason"] for e in m["not_evaluated"]}
    assert reasons == {
        "s13": "prediction failed",
        "s14": "not classified (status no_tissue)",
        "s15": "no prediction row",
    }
    page = (tmp_path / "out" / "metrics.md").read_text()
    assert "12 of 15 labelled slides evaluated" in page
    for slide in ("s13", "s14", "s15", "x99"):
        assert slide in page


def test_roc_png(tmp_path):
    predictions, labels = write_case(tmp_path)
    result = evaluate(predictions, labels, tmp_path / "out", n_bootstrap=10)
    assert [p.name for p in result.files] == ["metrics.json", "metrics.md", "roc.png"]
    with Image.open(tmp_path / "out" / "roc.png") as img:
        assert img.format == "PNG" and min(img.size) >= 300


def test_three_classes_one_vs_rest_macro_auc(tmp_path):
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    y = np.tile([0, 1, 2], 10)
    probs = rng.dirichlet(np.ones(3), size=len(y))
    probs[np.arange(len(y)), y] += 0.5
    probs = np.round(probs / probs.sum(1, keepdims=True), 6)
    rows = [
        {
            "slide": f"s{i}",
            "path": "",
            "status": "ok",
            "label": names[p.argmax()],
            **{f"prob_{n}": f"{v:.6f}" for n, v in zip(names, p, strict=True)},
        }
        for i, p in enumerate(probs)
    ]
    files.write_csv(
        tmp_path / "p.csv",
        ["slide", "path", "status", "label", "prob_a", "prob_b", "prob_c", "error"],
        rows,
    )
    files.write_csv(
        tmp_path / "l.csv",
        ["slide", "label"],
        [{"slide": f"s{i}", "label": names[c]} for i, c in enumerate(y)],
    )
    m = evaluate(tmp_path / "p.csv", tmp_path / "l.csv", tmp_path / "out", n_bootstrap=20).metrics
    expected = skm.roc_auc_score(y, probs / probs.sum(1, keepdims=True), multi_class="ovr")
    assert m["roc_auc"]["value"] == pytest.approx(expected)
    assert m["roc_auc"]["average"] == "one-vs-rest macro"
    assert m["balanced_accuracy"]["value"] == pytest.approx(
        skm.balanced_accuracy_score(y, probs.argmax(1))
    )


def test_prediction_classes_leave_out_spread_columns():
    columns = ["slide", "prob_a", "prob_b_sd", "prob_b", "prob_a_sd", "prob_x_sd", "prob_x_sd_sd"]
    assert prediction_classes(columns) == ["a", "b", "x_sd"]
    assert prediction_classes(["slide", "prob_a", "prob_b"]) == ["a", "b"]  # no spreads


def test_bad_inputs_name_the_file(tmp_path):
    predictions, labels = write_case(tmp_path)
    files.write_csv(tmp_path / "other.csv", ["slide", "label"], [{"slide": "zz", "label": "a"}])
    with pytest.raises(UserError, match="no slide has both an 'ok' prediction and a label"):
        evaluate(predictions, tmp_path / "other.csv", tmp_path / "o")
    files.write_csv(tmp_path / "bad.csv", ["slide", "score"], [{"slide": "a", "score": "1"}])
    with pytest.raises(UserError, match="bad.csv: expected columns slide, status, label"):
        evaluate(tmp_path / "bad.csv", labels, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        evaluate(tmp_path / "nope.csv", labels, tmp_path / "o")


def test_cli_evaluate(tmp_path, capsys):
    predictions, labels = write_case(tmp_path)
    argv = [
        "evaluate",
        "--predictions",
        str(tmp_path),
        "--labels",
        str(labels),
        "--out",
        str(tmp_path / "out"),
        "--bootstrap",
        "50",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "12 of 15 labelled slides evaluated" in out and "roc auc" in out
    assert (tmp_path / "out" / "metrics.md").is_file()
    assert main([*argv[:-2], "--bootstrap", "50", "--labels", str(tmp_path / "none.csv")]) == 2
    assert "none.csv" in capsys.readouterr().err

"""Classification metrics of predictions against true labels, with confidence intervals.

Every metric is scikit-learn's (``sklearn.metrics``); nothing is re-implemented here.
Two uses:

- ``point_metrics``: accuracy, balanced accuracy and ROC AUC of one set of
  probabilities, which the training loop computes on its validation slides every epoch.
- ``evaluate`` (``ats-wsi evaluate``): a ``predictions.csv`` against a labels CSV, into
  an output directory::

      OUT_DIR/metrics.json   every number below, machine-readable
      OUT_DIR/metrics.md     the same as a readable page
      OUT_DIR/roc.png        ROC curve (one-vs-rest per class for more than two)

Metrics: accuracy, balanced accuracy (mean recall over classes), ROC AUC (binary: of
the second class's probability; more classes: one-vs-rest, macro average), per-class
precision / recall / F1 (0 when a class is never predicted), the confusion matrix
(rows true, columns predicted). 95 % intervals are percentile intervals over
stratified bootstrap resamples of the slides (each class resampled within itself, so
every resample has the same class counts and the AUC stays defined, as pROC does).

Slides that are not evaluated are counted and listed with the reason, never dropped
silently: a failed prediction (status ``error``), a slide not classified (any other
status than ``ok``, e.g. ``no_tissue``), a labelled slide without a prediction row, a
label that is not one of the model's classes, and predictions without a label.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from pipeline.app.errors import UserError
from pipeline.app.files import atomic_target, atomic_write_bytes, read_csv
from pipeline.app.slide.labels import read_labels

PREDICTIONS_FILE = "predictions.csv"
METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
ROC_PNG = "roc.png"
SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "roc_auc")
CLASS_METRICS = ("precision", "recall", "f1")


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC of ``probs`` (float [n, C], rows sum to 1) for ``y_true`` (int [n] in
    ``0..C-1``): binary for C = 2, one-vs-rest macro average otherwise; ``None`` when
    undefined (a class absent from ``y_true``)."""
    n_classes = probs.shape[1]
    if len(np.unique(y_true)) < (2 if n_classes == 2 else n_classes):
        return None
    if n_classes == 2:
        return float(skm.roc_auc_score(y_true, probs[:, 1]))
    probs = probs / probs.sum(axis=1, keepdims=True)  # CSV rounding: sklearn wants sums of 1
    return float(
        skm.roc_auc_score(
            y_true, probs, multi_class="ovr", average="macro", labels=np.arange(n_classes)
        )
    )


def point_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float | None]:
    """``accuracy``, ``balanced_accuracy`` and ``roc_auc`` (``None`` when undefined) of
    the predictions ``probs.argmax(1)``; shapes as in ``roc_auc``."""
    y_pred = probs.argmax(axis=1)
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "roc_auc": roc_auc(y_true, probs),
    }


def _balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    with warnings.catch_warnings():  # a predicted class absent from y_true: defined, warns
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.balanced_accuracy_score(y_true, y_pred))


def _all_metrics(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray) -> dict:
    """Summary and per-class metrics of one (re)sample: ``{name: float | None}`` and
    ``{"precision": float [C], "recall": ..., "f1": ..., "support": int [C]}``."""
    labels = np.arange(probs.shape[1])
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "balanced_accuracy": _balanced_accuracy(y_true, y_pred),
        "roc_auc": roc_auc(y_true, probs),
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
    }


def classification_report(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Every metric with its bootstrap 95 % interval, as ``metrics.json`` holds them.

    Args:
        y_true / y_pred: int [n], class indices (true / predicted).
        probs: float [n, C], class probabilities (columns in ``class_names`` order).
        n_bootstrap: stratified resamples for the intervals (0: no intervals).
        seed: of the resampling.

    Returns:
        ``{"accuracy": {"value", "ci95"}, "balanced_accuracy": ..., "roc_auc": ...,
        "per_class": {name: {"precision": {"value", "ci95"}, ..., "support"}},
        "confusion_matrix": {"classes", "rows", "columns", "matrix"}, "bootstrap": ...}``;
        a value or interval that is undefined is ``None``.
    """
    y_true, y_pred, probs = np.asarray(y_true), np.asarray(y_pred), np.asarray(probs, float)
    point = _all_metrics(y_true, y_pred, probs)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y_true == c) for c in np.unique(y_true)]
    draws = []
    for _ in range(n_bootstrap):
        idx = np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members])
        draws.append(_all_metrics(y_true[idx], y_pred[idx], probs[idx]))

    def interval(values: list) -> list[float] | None:
        values = [v for v in values if v is not None]
        if not values:
            return None
        return [float(v) for v in np.percentile(values, [2.5, 97.5])]

    report: dict = {
        name: {"value": point[name], "ci95": interval([d[name] for d in draws])}
        for name in SUMMARY_METRICS
    }
    report["roc_auc"]["average"] = "binary" if probs.shape[1] == 2 else "one-vs-rest macro"
    report["per_class"] = {
        name: {
            **{
                m: {"value": float(point[m][c]), "ci95": interval([d[m][c] for d in draws])}
                for m in CLASS_METRICS
            },
            "support": int(point["support"][c]),
        }
        for c, name in enumerate(class_names)
    }
    matrix = skm.confusion_matrix(y_true, y_pred, labels=np.arange(len(class_names)))
    report["confusion_matrix"] = {
        "classes": list(class_names),
        "rows": "true",
        "columns": "predicted",
        "matrix": matrix.tolist(),
    }
    report["bootstrap"] = {
        "resamples": n_bootstrap,
        "seed": seed,
        "method": "stratified by true class, percentile interval",
    }
    return report


@dataclass
class Evaluation:
    """What ``evaluate`` wrote: ``metrics`` is the content of ``metrics.json``."""

    out_dir: Path
    metrics: dict

    @property
    def files(self) -> list[Path]:
        names = [METRICS_JSON, METRICS_MD] + ([ROC_PNG] if self.metrics["roc_curve"] else [])
        return [self.out_dir / n for n in names]


def prediction_classes(columns: Sequence[str]) -> list[str]:
    """Class names of a ``predictions.csv`` header: its ``prob_<class>`` columns, in
    order, without the spread columns ``prob_<class>_sd`` of another class."""
    named = [c[len("prob_") :] for c in columns if c.startswith("prob_")]
    return [c for c in named if not (c.endswith("_sd") and c[: -len("_sd")] in named)]


def evaluate(
    predictions: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> Evaluation:
    """Compare ``predict``'s output with true labels; write metrics.json, metrics.md
    and roc.png into ``out``.

    Args:
        predictions: a ``predictions.csv`` (columns ``slide, status, label,
            prob_<class>...``; other columns are ignored), or the directory holding it.
        labels: labels CSV (``labels.read_labels``); slides are matched by name.
        n_bootstrap / seed: of the 95 % intervals (``classification_report``).

    Raises:
        FileNotFoundError / UserError: a missing file, missing columns, a malformed
            probability, or no slide with both an ``ok`` prediction and a label.
    """
    path = Path(predictions)
    if path.is_dir():
        path = path / PREDICTIONS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions CSV not found")
    rows = read_csv(path)
    classes = prediction_classes(list(rows[0]) if rows else [])
    missing = {"slide", "status", "label"} - set(rows[0] if rows else ())
    if missing or len(classes) < 2:
        raise UserError(
            f"{path}: expected columns slide, status, label and prob_<class> for two or more "
            f"classes (as ats-wsi predict writes), found {sorted(rows[0]) if rows else 'no rows'}"
        )
    table = read_labels(labels)
    truth = {r.name: r.label for r in table.rows}
    y_true, y_pred, probs, excluded, unlabelled = [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        name, status = row["slide"], row["status"]
        if name not in truth:
            unlabelled.append({"slide": name, "status": status})
            continue
        reason = _not_evaluated(row, truth[name], classes)
        if reason:
            excluded.append({"slide": name, "reason": reason, "status": status})
            continue
        try:
            probs.append([float(row[f"prob_{c}"]) for c in classes])
        except ValueError:
            raise UserError(f"{path} line {line}: {name}: 'ok' without probabilities") from None
        y_true.append(classes.index(truth[name]))
        y_pred.append(classes.index(row["label"]))
    predicted = {r["slide"] for r in rows}
    excluded += [
        {"slide": r.name, "reason": "no prediction row", "status": ""}
        for r in table.rows
        if r.name not in predicted
    ]
    if not y_true:
        raise UserError(
            f"{path}: no slide has both an 'ok' prediction and a label in {table.source} "
            f"({len(excluded)} labelled slides not evaluated, {len(unlabelled)} predictions "
            "without a label); are the slide names the same?"
        )
    y_true, y_pred, probs = np.array(y_true), np.array(y_pred), np.array(probs)
    report = classification_report(y_true, y_pred, probs, classes, n_bootstrap, seed)
    statuses = Counter(e["reason"] for e in excluded)
    metrics = {
        "predictions": str(path),
        "labels": str(table.source),
        "classes": classes,
        "counts": {
            "labelled_slides": len(table.rows),
            "evaluated": len(y_true),
            "not_evaluated": dict(sorted(statuses.items())),
            "predictions_without_label": len(unlabelled),
            "label_rows_left_out": len(table.left_out),
        },
        **report,
        "not_evaluated": excluded,
        "predictions_without_label": unlabelled,
        "label_problems": table.left_out + table.notes,
    }
    out = Path(out)
    metrics["roc_curve"] = ROC_PNG if write_roc_png(out / ROC_PNG, y_true, probs, classes) else None
    atomic_write_bytes(out / METRICS_JSON, (json.dumps(metrics, indent=1) + "\n").encode())
    atomic_write_bytes(out / METRICS_MD, metrics_markdown(metrics).encode())
    return Evaluation(out, metrics)


def _not_evaluated(row: dict[str, str], label: str, classes: list[str]) -> str | None:
    """Why a labelled prediction row cannot be scored, or ``None`` when it can."""
    if row["status"] == "error":
        return "prediction failed"
    if row["status"] != "ok":
        return f"not classified (status {row['status']})"
    if label not in classes:
        return f"label {label!r} is not one of the model's classes {classes}"
    if row["label"] not in classes:
        return f"predicted label {row['label']!r} is not one of the prob_ columns"
    return None


def write_roc_png(
    path: Path, y_true: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> bool:
    """ROC curve(s) as a PNG: the second class's for two classes, one-vs-rest per
    class otherwise. ``False`` (nothing written) when the AUC is undefined."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    auc = roc_auc(y_true, probs)
    if auc is None:
        return False
    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    ax = fig.subplots()
    shown = [1] if len(class_names) == 2 else range(len(class_names))
    for c in shown:
        fpr, tpr, _ = skm.roc_curve(y_true == c, probs[:, c])
        one = skm.auc(fpr, tpr)
        ax.plot(fpr, tpr, label=f"{class_names[c]} (AUC {one:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    kind = "" if len(class_names) == 2 else "one-vs-rest, macro "
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=f"ROC, {len(y_true)} slides ({kind}AUC {auc:.3f})",
    )
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png")
    return True


def _value(entry: dict) -> str:
    value, ci = entry["value"], entry["ci95"]
    if value is None:
        return "undefined | "
    return f"{value:.3f} | " + ("" if ci is None else f"{ci[0]:.3f} – {ci[1]:.3f}")


def metrics_markdown(metrics: dict) -> str:
    """The readable page of ``metrics.json``'s content."""
    counts, classes = metrics["counts"], metrics["classes"]
    missed = ", ".join(f"{n} {why}" for why, n in counts["not_evaluated"].items()) or "none"
    lines = [
        "# Evaluation",
        "",
        f"Predictions `{metrics['predictions']}` against labels `{metrics['labels']}`.",
        "",
        f"**{counts['evaluated']} of {counts['labelled_slides']} labelled slides evaluated**; "
        f"not evaluated: {missed}. {counts['predictions_without_label']} predictions have no "
        f"label; {counts['label_rows_left_out']} label rows were left out"
        + (" (listed below)." if metrics["label_problems"] else "."),
        "",
        "| metric | value | 95 % CI |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {name.replace('_', ' ')} | {_value(metrics[name])} |" for name in SUMMARY_METRICS]
    lines += [
        "",
        f"ROC AUC: {metrics['roc_auc']['average']}"
        + ("" if metrics["roc_curve"] else " (undefined: a class has no evaluated slide)")
        + f". Intervals: {metrics['bootstrap']['resamples']} bootstrap resamples, "
        f"{metrics['bootstrap']['method']} (seed {metrics['bootstrap']['seed']}).",
        "",
        "## Per class",
        "",
        "| class | support | precision | 95 % CI | recall | 95 % CI | F1 | 95 % CI |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in metrics["per_class"].items():
        cells = " | ".join(_value(entry[m]) for m in CLASS_METRICS)
        lines.append(f"| {name} | {entry['support']} | {cells} |")
    matrix = metrics["confusion_matrix"]["matrix"]
    lines += [
        "",
        "## Confusion matrix (rows: true class, columns: predicted class)",
        "",
        "| true \\ predicted | " + " | ".join(classes) + " |",
        "| --- |" + " --- |" * len(classes),
    ]
    lines += [
        f"| {c} | " + " | ".join(str(v) for v in row) + " |"
        for c, row in zip(classes, matrix, strict=True)
    ]
    if metrics["roc_curve"]:
        lines += ["", f"![ROC curve]({metrics['roc_curve']})"]
    if metrics["not_evaluated"]:
        lines += ["", "## Labelled slides not evaluated", "", "| slide | reason |", "| --- | --- |"]
        lines += [f"| {e['slide']} | {e['reason']} |" for e in metrics["not_evaluated"]]
    if metrics["predictions_without_label"]:
        lines += ["", "## Predictions without a label", ""]
        lines += [", ".join(e["slide"] for e in metrics["predictions_without_label"])]
    if metrics["label_problems"]:
        lines += ["", "## Labels CSV", ""] + [f"- {p}" for p in metrics["label_problems"]]
    return "\n".join(lines) + "\n"

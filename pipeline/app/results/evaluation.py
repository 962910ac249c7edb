"""Metrics of predictions against true targets, with confidence intervals.

``evaluate`` (``ats-wsi evaluate``) scores a ``predictions.csv`` against a labels CSV,
into an output directory::

    OUT_DIR/metrics.json   every number below, machine-readable
    OUT_DIR/metrics.md     the same as a readable page
    OUT_DIR/roc.png        ROC curves, for the tasks that have them

The metrics are the model's task's (``Task.evaluate``; every metric is scikit-learn's
or scikit-survival's, nothing is re-implemented): for classification accuracy,
balanced accuracy, ROC AUC (binary: of the second class's probability; more classes:
one-vs-rest, macro average), per-class precision / recall / F1 and the confusion
matrix; for the other tasks see their modules. 95 % intervals are percentile
intervals over bootstrap resamples of the slides stratified by the task's strata (for
classification each class resampled within itself, so every resample has the same
class counts and the AUC stays defined, as pROC does).

The task comes from the caller (``ats-wsi evaluate`` reads it from the output
directory's manifest, which names the model); without one, a ``predictions.csv``
with ``prob_<class>`` columns is scored as classification.

Slides that are not evaluated are counted and listed with the reason, never dropped
silently: a failed prediction (status ``error``), a slide not predicted (any other
status than ``ok``, e.g. ``no_tissue``), a labelled slide without a prediction row, a
target the model cannot have predicted (a label that is not one of its classes), and
predictions without a label.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from pipeline.app.errors import UserError
from pipeline.app.files import atomic_target, atomic_write_bytes, read_csv
from pipeline.app.results import outputs
from pipeline.app.slide.labels import read_labels
from pipeline.app.tasks import Classification, TargetError, Task
from pipeline.app.tasks.classification import markdown_value

METRICS_JSON = "metrics.json"
METRICS_MD = "metrics.md"
ROC_PNG = "roc.png"


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
    """Class names of a classifier's ``predictions.csv`` header: its ``prob_<class>``
    score columns, in order (``outputs.score_columns_of``)."""
    scores = outputs.score_columns_of(columns)
    return [c[len("prob_") :] for c in scores if c.startswith("prob_")]


def evaluate(
    predictions: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    n_bootstrap: int = 1000,
    seed: int = 0,
    task: Task | None = None,
) -> Evaluation:
    """Compare ``predict``'s output with true targets; write metrics.json, metrics.md
    and (for tasks with ROC curves) roc.png into ``out``.

    Args:
        predictions: a ``predictions.csv`` (columns ``slide, status, label`` and the
            task's scores, e.g. ``prob_<class>...``; other columns are ignored), or the
            directory holding it.
        labels: labels CSV (``labels.read_labels``, the task's target columns);
            slides are matched by name.
        n_bootstrap / seed: of the 95 % intervals.
        task: the model's task; ``None``: classification over the ``prob_<class>``
            columns.

    Raises:
        FileNotFoundError / UserError: a missing file, missing columns, a malformed
            score, or no slide with both an ``ok`` prediction and a label.
    """
    path = Path(predictions)
    if path.is_dir():
        path = path / outputs.PREDICTIONS
    if not path.is_file():
        raise FileNotFoundError(f"{path}: predictions CSV not found")
    rows = read_csv(path)
    header = list(rows[0]) if rows else []
    if task is None:
        classes = prediction_classes(header)
        if len(classes) < 2:
            raise UserError(
                f"{path}: expected columns slide, status, label and prob_<class> for two or "
                f"more classes (as ats-wsi predict writes), found {sorted(header) or 'no rows'}"
            )
        task = Classification(classes)
    missing = {"slide", "status", "label", *task.score_columns} - set(header)
    if missing:
        raise UserError(
            f"{path}: expected columns slide, status, label and {', '.join(task.score_columns)} "
            f"(as ats-wsi predict writes for a {task.name} model), "
            f"found {sorted(header) or 'no rows'}"
        )
    table = read_labels(labels, targets=task.target_columns)
    truth = {r.name: r for r in table.rows}
    targets, scores, predicted, excluded, unlabelled = [], [], [], [], []
    for line, row in enumerate(rows, start=2):
        name, status = row["slide"], row["status"]
        if name not in truth:
            unlabelled.append({"slide": name, "status": status})
            continue
        target, reason = _target(task, row, truth[name], table.source)
        if reason:
            excluded.append({"slide": name, "reason": reason, "status": status})
            continue
        try:
            scores.append([float(row[c]) for c in task.score_columns])
        except ValueError:
            raise UserError(f"{path} line {line}: {name}: 'ok' without scores") from None
        targets.append(target)
        predicted.append(row["label"])
    names = {r["slide"] for r in rows}
    excluded += [
        {"slide": r.name, "reason": "no prediction row", "status": ""}
        for r in table.rows
        if r.name not in names
    ]
    if not targets:
        raise UserError(
            f"{path}: no slide has both an 'ok' prediction and a label in {table.source} "
            f"({len(excluded)} labelled slides not evaluated, {len(unlabelled)} predictions "
            "without a label); are the slide names the same?"
        )
    scores = np.array(scores)
    report = task.evaluate(targets, scores, predicted, n_bootstrap, seed)
    statuses = Counter(e["reason"] for e in excluded)
    metrics = {
        "predictions": str(path),
        "labels": str(table.source),
        "task": task.name,
        "scores": list(task.score_columns),
        "counts": {
            "labelled_slides": len(table.rows),
            "evaluated": len(targets),
            "not_evaluated": dict(sorted(statuses.items())),
            "predictions_without_label": len(unlabelled),
            "label_rows_left_out": len(table.left_out),
        },
        **report,
        "not_evaluated": excluded,
        "predictions_without_label": unlabelled,
        "label_problems": table.left_out + table.notes,
        "summary": list(task.metric_names),
    }
    out = Path(out)
    curves = task.roc_curves(targets, scores)
    metrics["roc_curve"] = ROC_PNG if curves else None
    if curves:
        write_roc_png(out / ROC_PNG, curves, report)
    atomic_write_bytes(out / METRICS_JSON, (json.dumps(metrics, indent=1) + "\n").encode())
    atomic_write_bytes(out / METRICS_MD, metrics_markdown(metrics, task).encode())
    return Evaluation(out, metrics)


def _target(task: Task, row: dict[str, str], truth, source: Path):
    """The true target of a labelled prediction row and ``None``, or ``None`` and why
    the row cannot be scored."""
    if row["status"] == "error":
        return None, "prediction failed"
    if row["status"] != "ok":
        return None, f"not classified (status {row['status']})"
    try:
        target = task.parse(truth.values, f"{source} line {truth.line}")
    except (TargetError, UserError) as e:
        return None, str(e)
    problem = task.prediction_problem(row["label"])
    return (None, problem) if problem else (target, None)


def write_roc_png(
    path: Path, curves: Sequence[tuple[str, np.ndarray, np.ndarray]], report: dict
) -> None:
    """The ROC curves ``(name, y bool [n], score float [n])`` as a PNG, titled with the
    summary AUC of ``report`` (``roc_auc`` or ``mean_auc``)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    fig = Figure(figsize=(4.5, 4.5), dpi=120)
    ax = fig.subplots()
    for name, y, score in curves:
        fpr, tpr, _ = skm.roc_curve(y, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {skm.auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    summary = report.get("roc_auc") or report.get("mean_auc")
    average = summary.get("average", "mean") if summary else ""
    kind = "" if average == "binary" else f"{average}, "
    auc = "undefined" if not summary or summary["value"] is None else f"{summary['value']:.3f}"
    n = len(curves[0][1])
    ax.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        xlim=(0, 1),
        ylim=(0, 1.01),
        title=f"ROC, {n} slides ({kind}AUC {auc})",
    )
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png")


def metrics_markdown(metrics: dict, task: Task) -> str:
    """The readable page of ``metrics.json``'s content."""
    counts = metrics["counts"]
    missed = ", ".join(f"{n} {why}" for why, n in counts["not_evaluated"].items()) or "none"
    lines = [
        "# Evaluation",
        "",
        f"Predictions `{metrics['predictions']}` against labels `{metrics['labels']}` "
        f"({metrics['task']}).",
        "",
        f"**{counts['evaluated']} of {counts['labelled_slides']} labelled slides evaluated**; "
        f"not evaluated: {missed}. {counts['predictions_without_label']} predictions have no "
        f"label; {counts['label_rows_left_out']} label rows were left out"
        + (" (listed below)." if metrics["label_problems"] else "."),
        "",
        "| metric | value | 95 % CI |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {name.replace('_', ' ')} | {markdown_value(metrics[name])} |"
        for name in metrics["summary"]
    ]
    lines += [
        "",
        f"Intervals: {metrics['bootstrap']['resamples']} bootstrap resamples, "
        f"{metrics['bootstrap']['method']} (seed {metrics['bootstrap']['seed']}).",
    ]
    lines += task.markdown(metrics)
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

"""Single-label classification: one class per slide out of two or more.

Labels CSV: a ``label`` column holding the class name. Head: one logit per class;
loss: cross-entropy; scores: the softmax probabilities, ``prob_<class>`` in
``predictions.csv``; label: the most probable class. Metrics (scikit-learn's):
accuracy, balanced accuracy and ROC AUC (binary: of the second class's probability;
more classes: one-vs-rest, macro average). Folds are stratified by class; balancing
weighs each class by ``n / (n_classes_present * n_class)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from pipeline.app.config import ModelConfig
from pipeline.app.errors import ConfigError, UserError
from pipeline.app.tasks.base import TargetError, Task, bootstrap, bootstrap_note, interval

CLASS_METRICS = ("precision", "recall", "f1")


class Classification(Task):
    """Classes ``class_names`` (in output order), read from the labels CSV's column
    ``column``."""

    name = "classification"
    metric_names = ("accuracy", "balanced_accuracy", "roc_auc")
    train_metric_names = ("accuracy",)
    select_metrics = ("roc_auc", "balanced_accuracy")

    def __init__(self, class_names: Sequence[str], column: str = "label") -> None:
        class_names = tuple(class_names)
        if len(class_names) < 2:
            raise ConfigError(f"class_names: need at least 2 classes, got {list(class_names)}")
        if len(set(class_names)) != len(class_names):
            raise ConfigError(f"class_names: duplicates in {list(class_names)}")
        self.class_names = class_names
        self.target_columns = (column,)

    @classmethod
    def columns(cls, config: ModelConfig) -> tuple[str, ...]:
        return config.targets or ("label",)

    @classmethod
    def complete(cls, config: ModelConfig, values: Sequence[tuple[str, ...]]) -> ModelConfig:
        """Without ``class_names``, the sorted distinct labels are the classes."""
        if config.class_names:
            return config
        return dataclasses.replace(config, class_names=tuple(sorted({v[0] for v in values})))

    @classmethod
    def from_config(cls, config: ModelConfig) -> Classification:
        if len(config.targets) > 1:
            raise ConfigError(f"targets: classification reads one column, got {config.targets}")
        return cls(config.class_names, *config.targets)

    def parse(self, values: Sequence[str], where: str) -> int:
        (label,) = values
        if label not in self.class_names:
            raise TargetError(f"label {label!r} not in classes {list(self.class_names)}")
        return self.class_names.index(label)

    def check(self, targets: Sequence[int], source: str) -> list[str]:
        present = set(targets)
        notes = [
            f"{source}: class {name!r} has no readable slide to train on"
            for i, name in enumerate(self.class_names)
            if i not in present
        ]
        if len(present) < 2:
            found = [self.class_names[i] for i in sorted(present)]
            raise UserError(
                f"{source}: the readable training slides cover fewer than two classes "
                f"({found} of {list(self.class_names)}; {len(targets)} readable slides); "
                "nothing to train"
            )
        return notes

    def strata(self, targets: Sequence[int]) -> np.ndarray:
        return np.asarray(targets, dtype=np.int64)

    def balance_weights(self, targets: Sequence[int]) -> np.ndarray:
        return class_weights(targets, len(self.class_names))[np.asarray(targets, dtype=np.int64)]

    @property
    def n_outputs(self) -> int:
        return len(self.class_names)

    def collate(self, targets: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(list(targets), device=device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    @property
    def score_columns(self) -> tuple[str, ...]:
        return tuple(f"prob_{c}" for c in self.class_names)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(outputs, dim=1)

    def label(self, scores: np.ndarray) -> str:
        return self.class_names[int(np.argmax(scores))]

    def metrics(self, targets: Sequence[int], scores: np.ndarray) -> dict[str, float | None]:
        return point_metrics(np.asarray(targets), np.asarray(scores))

    def train_metrics(self, targets: Sequence[int], scores: np.ndarray) -> dict[str, float | None]:
        y_pred = np.asarray(scores).argmax(axis=1)
        return {"accuracy": float(skm.accuracy_score(np.asarray(targets), y_pred))}

    def prediction_problem(self, label: str) -> str | None:
        if label not in self.class_names:
            return f"predicted label {label!r} is not one of the prob_ columns"
        return None

    def evaluate(
        self,
        targets: Sequence[int],
        scores: np.ndarray,
        labels: Sequence[str],
        n_bootstrap: int,
        seed: int,
    ) -> dict:
        """``classification_report`` of the predicted ``labels`` (as ``predict`` wrote
        them)."""
        y_pred = np.array([self.class_names.index(label) for label in labels])
        return classification_report(
            np.asarray(targets), y_pred, scores, self.class_names, n_bootstrap, seed
        )

    def roc_curves(
        self, targets: Sequence[int], scores: np.ndarray
    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """The second class's curve for two classes, one-vs-rest per class otherwise;
        none when the AUC is undefined."""
        y = np.asarray(targets)
        if roc_auc(y, scores) is None:
            return []
        shown = [1] if len(self.class_names) == 2 else range(len(self.class_names))
        return [(self.class_names[c], y == c, scores[:, c]) for c in shown]

    def markdown(self, report: dict) -> list[str]:
        lines = [
            "",
            f"ROC AUC: {report['roc_auc']['average']}.",
            "",
            "## Per class",
            "",
            "| class | support | precision | 95 % CI | recall | 95 % CI | F1 | 95 % CI |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for name, entry in report["per_class"].items():
            cells = " | ".join(markdown_value(entry[m]) for m in CLASS_METRICS)
            lines.append(f"| {name} | {entry['support']} | {cells} |")
        classes, matrix = (
            report["confusion_matrix"]["classes"],
            report["confusion_matrix"]["matrix"],
        )
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
        return lines


def class_weights(labels: Sequence[int], n_classes: int) -> np.ndarray:
    """float [n_classes]: ``n / (n_classes_present * n_c)`` (1 for a balanced set; 0
    for a class without slides)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(float)
    weights = np.zeros(n_classes)
    weights[counts > 0] = len(labels) / ((counts > 0).sum() * counts[counts > 0])
    return weights


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
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
        "roc_auc": roc_auc(y_true, probs),
    }


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true``."""
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
        "balanced_accuracy": balanced_accuracy(y_true, y_pred),
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
    draws = bootstrap(
        lambda idx: _all_metrics(y_true[idx], y_pred[idx], probs[idx]), y_true, n_bootstrap, seed
    )
    report: dict = {"classes": list(class_names)}
    report.update(
        {
            name: {"value": point[name], "ci95": interval([d[name] for d in draws])}
            for name in Classification.metric_names
        }
    )
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
    report["bootstrap"] = bootstrap_note(n_bootstrap, seed, "true class")
    return report


def markdown_value(entry: dict) -> str:
    """``value | interval`` cells of a metric entry in ``metrics.md``."""
    value, ci = entry["value"], entry["ci95"]
    if value is None:
        return "undefined | "
    return f"{value:.3f} | " + ("" if ci is None else f"{ci[0]:.3f} – {ci[1]:.3f}")

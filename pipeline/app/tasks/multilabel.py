"""Multi-label: several binary targets per slide (biomarkers, findings), each may be
missing.

Labels CSV: one column per target (``targets``, required: ``--targets a,b,c``), cells
``1``/``0`` (also ``true``/``false``, ``yes``/``no``); an empty cell is a missing
value, masked out of the loss and the metrics (a row with every cell empty is left
out). Head: one logit per target; loss: binary cross-entropy averaged over a slide's
known targets. Scores: the sigmoid probabilities, ``prob_<target>``; label: the
targets predicted present (probability >= 0.5), joined by ``;``. Metrics: ROC AUC per
target (``auc_<target>``, scikit-learn's, on the slides where it is known) and their
mean (``mean_auc``, over the targets where defined), which selects the best epoch.
Folds are stratified by the first target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from pipeline.app.config import ModelConfig
from pipeline.app.errors import ConfigError, UserError
from pipeline.app.tasks.base import Task

BINARY_VALUES = {"1": 1.0, "0": 0.0, "true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0, "": math.nan}


class Multilabel(Task):
    """Binary targets read from ``columns``, one output each."""

    name = "multilabel"
    train_metric_names = ("mean_auc",)
    select_metrics = ("mean_auc",)

    def __init__(self, columns: Sequence[str]) -> None:
        columns = tuple(columns)
        if not columns:
            raise ConfigError("targets: the multilabel task needs its target columns (--targets)")
        if len(set(columns)) != len(columns):
            raise ConfigError(f"targets: duplicates in {list(columns)}")
        self.target_columns = columns
        self.metric_names = ("mean_auc", *(f"auc_{c}" for c in columns))

    @classmethod
    def from_config(cls, config: ModelConfig) -> Multilabel:
        if config.class_names:
            raise ConfigError("class_names: the multilabel task names its targets in targets")
        return cls(config.targets)

    def parse(self, values: Sequence[str], where: str) -> tuple[float, ...]:
        parsed = []
        for column, cell in zip(self.target_columns, values, strict=True):
            value = BINARY_VALUES.get(cell.lower())
            if value is None:
                raise UserError(f"{where}: {column} {cell!r} is not 1, 0 or empty (missing)")
            parsed.append(value)
        return tuple(parsed)

    def strata(self, targets: Sequence[tuple[float, ...]]) -> np.ndarray:
        first = np.array([t[0] for t in targets], dtype=np.float64)
        return np.where(np.isnan(first), 2, first).astype(np.int64)

    @property
    def n_outputs(self) -> int:
        return len(self.target_columns)

    def collate(self, targets: Sequence[tuple[float, ...]], device: torch.device) -> torch.Tensor:
        return torch.tensor([list(t) for t in targets], dtype=torch.float32, device=device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        bce = F.binary_cross_entropy_with_logits(outputs, targets.nan_to_num(0.0), reduction="none")
        return (bce * known).sum(1) / known.sum(1).clamp(min=1)

    @property
    def score_columns(self) -> tuple[str, ...]:
        return tuple(f"prob_{c}" for c in self.target_columns)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(outputs)

    def label(self, scores: np.ndarray) -> str:
        return ";".join(c for c, p in zip(self.target_columns, scores, strict=True) if p >= 0.5)

    def roc_curves(
        self, targets: Sequence[tuple[float, ...]], scores: np.ndarray
    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """One curve per target whose AUC is defined, on the slides where it is known."""
        y = _matrix(targets)
        curves = []
        for k, column in enumerate(self.target_columns):
            known = ~np.isnan(y[:, k])
            if len(np.unique(y[known, k])) == 2:
                curves.append((column, y[known, k] == 1, scores[known, k]))
        return curves

    def metrics(
        self, targets: Sequence[tuple[float, ...]], scores: np.ndarray
    ) -> dict[str, float | None]:
        y = _matrix(targets)
        per_target = {}
        for k, column in enumerate(self.target_columns):
            known = ~np.isnan(y[:, k])
            values = y[known, k]
            defined = len(np.unique(values)) == 2
            per_target[f"auc_{column}"] = (
                float(skm.roc_auc_score(values, scores[known, k])) if defined else None
            )
        defined = [v for v in per_target.values() if v is not None]
        return {"mean_auc": float(np.mean(defined)) if defined else None, **per_target}


def _matrix(targets: Sequence[tuple[float, ...]]) -> np.ndarray:
    """float [n, T] of the targets, NaN where missing."""
    return np.array([list(t) for t in targets], dtype=np.float64).reshape(len(targets), -1)

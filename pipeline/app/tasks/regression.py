"""Regression: one continuous target per slide (a score, a percentage, a count).

Labels CSV: one numeric column (``targets``, default ``value``); an empty or
non-numeric cell is an error naming the row. The head predicts the target
standardised by the training labels' mean and standard deviation (stored in the
model config as ``target_stats``), so the loss has the same scale whatever the
target's units. Loss: squared error (``mse``, default) or Huber (``huber``, delta 1
in standard deviations). Score: the prediction in the target's units, column
``pred_<target>``. Metrics: R², mean absolute error and Pearson's r (scikit-learn
and SciPy); R² selects the best epoch. Folds are stratified by quartile of the target.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

from pipeline.app.config import ModelConfig
from pipeline.app.errors import ConfigError, UserError
from pipeline.app.tasks.base import Task

LOSSES = ("mse", "huber")


class Regression(Task):
    """A continuous target read from ``column``, standardised by ``stats``
    ``(mean, sd)`` for the head."""

    name = "regression"
    metric_names = ("r2", "mae", "pearson_r")
    train_metric_names = ("r2",)
    select_metrics = ("r2", "pearson_r")
    empty_is_error = True

    def __init__(
        self, column: str = "value", stats: Sequence[float] = (0.0, 1.0), loss: str = "mse"
    ) -> None:
        if loss not in LOSSES:
            raise ConfigError(f"loss: the regression task offers {list(LOSSES)}, got {loss!r}")
        mean, sd = (float(s) for s in stats)
        if not (math.isfinite(mean) and math.isfinite(sd) and sd > 0):
            raise ConfigError(f"target_stats: expected (mean, sd > 0), got {list(stats)}")
        self.target_columns = (column,)
        self.mean, self.sd, self.loss_name = mean, sd, loss

    @classmethod
    def columns(cls, config: ModelConfig) -> tuple[str, ...]:
        return config.targets or ("value",)

    @classmethod
    def complete(cls, config: ModelConfig, values: Sequence[tuple[str, ...]]) -> ModelConfig:
        """The labels' mean and standard deviation become ``target_stats`` (sd 1 when
        every value is the same)."""
        if config.target_stats:
            return config
        numbers = np.array([_number(v[0]) for v in values], dtype=np.float64)
        numbers = numbers[np.isfinite(numbers)]
        if len(numbers) == 0:
            return config
        sd = float(numbers.std()) if len(numbers) > 1 and numbers.std() > 0 else 1.0
        return dataclasses.replace(config, target_stats=(float(numbers.mean()), sd))

    @classmethod
    def from_config(cls, config: ModelConfig) -> Regression:
        if len(config.targets) > 1:
            raise ConfigError(f"targets: regression reads one column, got {list(config.targets)}")
        if config.class_names:
            raise ConfigError("class_names: the regression task has no classes")
        return cls(*cls.columns(config), config.target_stats or (0.0, 1.0), config.loss or "mse")

    def parse(self, values: Sequence[str], where: str) -> float:
        (cell,) = values
        number = _number(cell)
        if not math.isfinite(number):
            raise UserError(f"{where}: {self.target_columns[0]} {cell!r} is not a finite number")
        return number

    def strata(self, targets: Sequence[float]) -> np.ndarray:
        """Quartiles of the target (fewer bins for few slides)."""
        values = np.asarray(targets, dtype=np.float64)
        n_bins = max(1, min(4, len(values) // 2))
        edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
        return np.searchsorted(edges, values, side="right").astype(np.int64)

    @property
    def n_outputs(self) -> int:
        return 1

    def collate(self, targets: Sequence[float], device: torch.device) -> torch.Tensor:
        return torch.tensor(list(targets), dtype=torch.float32, device=device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        standard = (targets - self.mean) / self.sd
        if self.loss_name == "huber":
            return F.huber_loss(outputs[:, 0], standard, reduction="none", delta=1.0)
        return (outputs[:, 0] - standard) ** 2

    @property
    def score_columns(self) -> tuple[str, ...]:
        return (f"pred_{self.target_columns[0]}",)

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs[:, :1] * self.sd + self.mean

    def label(self, scores: np.ndarray) -> str:
        return f"{float(scores[0]):.6g}"

    def metrics(self, targets: Sequence[float], scores: np.ndarray) -> dict[str, float | None]:
        return regression_metrics(np.asarray(targets, dtype=np.float64), scores[:, 0])


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float | None]:
    """``r2``, ``mae`` and ``pearson_r`` of ``y_pred`` (float [n]); R² and r are
    ``None`` when undefined (fewer than two slides, or a constant target or
    prediction)."""
    from scipy import stats

    defined = len(y_true) > 1 and np.ptp(y_true) > 0
    r = None
    if defined and np.ptp(y_pred) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = float(stats.pearsonr(y_true, y_pred).statistic)
    return {
        "r2": float(skm.r2_score(y_true, y_pred)) if defined else None,
        "mae": float(skm.mean_absolute_error(y_true, y_pred)) if len(y_true) else None,
        "pearson_r": r,
    }


def _number(cell: str) -> float:
    try:
        return float(cell)
    except ValueError:
        return math.nan

"""The ``Task`` interface: everything that depends on the kind of target.

A task owns, for one kind of target (a class, several binary targets, a number, a
time to event): which columns of the labels CSV hold it and how they parse, the size
of the model's head, the training loss, how the head's outputs become the scores
written to ``predictions.csv`` (their column names too), the predicted label, the
metrics and which of them selects the best epoch, the strata of cross-validation
folds and the weights that balance a skewed training set. The training loop, the
streaming step, inference, the output files, evaluation and the baseline ask the
task; none of them names a loss or a metric.

Shapes: ``outputs`` are the head's float ``[B, n_outputs]``; ``scores`` are float
``[B, n_scores]`` with ``n_scores == len(score_columns)``; a target is whatever
``parse`` returns for one slide, and ``collate`` stacks a batch of them into the
tensor ``loss`` takes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from pipeline.app.config import ModelConfig
from pipeline.app.errors import UserError


class TargetError(ValueError):
    """A labels-CSV row whose target cannot be used; the message names the reason."""


class Task(ABC):
    """One kind of target. Subclasses are registered by ``name`` in ``tasks.TASKS``.

    Class attributes:
        name: the task's name in ``config.json`` and on the command line.
        metric_names: the point metrics ``metrics`` returns, in order (validation
            columns of ``metrics.csv`` are ``val_<name>``).
        train_metric_names: the subset computed on the training slides each epoch.
        select_metrics: metrics that may pick the best epoch (larger is better); the
            first is the default.
        empty_is_error: a labels row with an empty target cell is an error naming the
            row (numeric targets) rather than left out with a message.
    """

    name: ClassVar[str]
    metric_names: tuple[str, ...]
    train_metric_names: ClassVar[tuple[str, ...]]
    select_metrics: ClassVar[tuple[str, ...]]
    empty_is_error: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def from_config(cls, config: ModelConfig) -> Task:
        """The task of a model config (its ``class_names``, ``targets``, ``loss``);
        ``ConfigError`` for fields the task cannot use."""

    @classmethod
    def columns(cls, config: ModelConfig) -> tuple[str, ...]:
        """The labels-CSV columns a model config reads its targets from (before the
        task can be built: classification's classes come from those columns)."""
        return config.targets

    @classmethod
    def complete(cls, config: ModelConfig, values: Sequence[tuple[str, ...]]) -> ModelConfig:
        """A new run's config completed from the target cells of its labels' rows
        (default: as given)."""
        return config

    # --- the labels CSV ---

    target_columns: tuple[str, ...]
    """Columns of the labels CSV that hold the target, besides ``slide`` and ``case``."""

    @abstractmethod
    def parse(self, values: Sequence[str], where: str) -> Any:
        """The target of one row from its ``target_columns`` cells (stripped strings,
        in column order). Raises ``TargetError`` for a row to leave out with a
        warning, ``UserError`` (naming ``where``, the row) for a malformed table."""

    def check(self, targets: Sequence[Any], source: str) -> list[str]:
        """Notes about the training targets as a whole (e.g. a class without a slide);
        ``UserError`` when there is nothing to learn. Default: at least one slide."""
        if not targets:
            raise UserError(f"{source}: no readable slide with a target; nothing to train")
        return []

    def strata(self, targets: Sequence[Any]) -> np.ndarray:
        """int [n]: the groups folds are stratified by (default: one group)."""
        return np.zeros(len(targets), dtype=np.int64)

    def balance_weights(self, targets: Sequence[Any]) -> np.ndarray:
        """float [n]: per-slide weights that balance a skewed training set (they
        weigh the loss with ``balance="weights"`` and the draws with ``"sampling"``).
        Raises ``UserError`` for a task that has nothing to balance."""
        raise UserError(f"balance: the {self.name} task has no classes to balance")

    # --- the model ---

    @property
    @abstractmethod
    def n_outputs(self) -> int:
        """Size of the model's head."""

    @abstractmethod
    def collate(self, targets: Sequence[Any], device: torch.device) -> torch.Tensor:
        """A batch of targets as the tensor ``loss`` takes, on ``device``."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """float [B]: each slide's term of the loss (the objective is their mean,
        weighted when balancing); ``outputs`` float [B, n_outputs]."""

    # --- predictions ---

    @property
    @abstractmethod
    def score_columns(self) -> tuple[str, ...]:
        """Names of the scores in ``predictions.csv`` (their spread over draws is
        ``<name>_sd``) and in the GeoJSON measurements."""

    @abstractmethod
    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        """float [B, n_scores]: what is reported for each slide (probabilities, a
        value, a risk), from the head's outputs; averaged over draws."""

    @abstractmethod
    def label(self, scores: np.ndarray) -> str:
        """The ``label`` column of one slide from its mean scores (float [n_scores])."""

    # --- metrics ---

    @abstractmethod
    def metrics(self, targets: Sequence[Any], scores: np.ndarray) -> dict[str, float | None]:
        """The point metrics ``metric_names`` of ``scores`` (float [n, n_scores])
        against ``targets``; ``None`` where a metric is undefined."""

    def train_metrics(self, targets: Sequence[Any], scores: np.ndarray) -> dict[str, float | None]:
        """The ``train_metric_names`` of an epoch's training slides."""
        metrics = self.metrics(targets, scores)
        return {name: metrics[name] for name in self.train_metric_names}

    # --- evaluation (``ats-wsi evaluate``) ---

    def prediction_problem(self, label: str) -> str | None:
        """Why a ``predictions.csv`` row's ``label`` cannot be scored (``None``: it can)."""
        return None

    def evaluate(
        self,
        targets: Sequence[Any],
        scores: np.ndarray,
        labels: Sequence[str],
        n_bootstrap: int,
        seed: int,
    ) -> dict:
        """``metrics.json``'s metrics of ``scores`` (float [n, n_scores]; ``labels``,
        the predicted labels, serve tasks that score them): ``{name: {"value",
        "ci95"}}`` for each of
        ``metric_names`` (95 % percentile intervals over ``n_bootstrap`` resamples
        stratified by ``strata``, ``None`` where undefined) and ``"bootstrap"``."""
        draws = bootstrap(
            lambda idx: self.metrics([targets[i] for i in idx], scores[idx]),
            self.strata(targets),
            n_bootstrap,
            seed,
        )
        point = self.metrics(targets, scores)
        report: dict = {
            name: {"value": point[name], "ci95": interval([d[name] for d in draws])}
            for name in self.metric_names
        }
        report["bootstrap"] = bootstrap_note(n_bootstrap, seed)
        return report

    def roc_curves(
        self, targets: Sequence[Any], scores: np.ndarray
    ) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """``(name, y bool [n], score float [n])`` of each ROC curve worth drawing
        (none by default)."""
        return []

    def markdown(self, report: dict) -> list[str]:
        """Task-specific sections of ``metrics.md`` (lines), after the summary table."""
        return []

    def check_select(self, metric: str | None) -> str:
        """The metric that selects the best epoch: ``metric``, or the task's default
        when ``None``. Raises ``UserError`` for one the task does not compute."""
        if metric is None:
            return self.select_metrics[0]
        if metric not in self.select_metrics:
            raise UserError(
                f"select_metric: the {self.name} task selects by one of "
                f"{list(self.select_metrics)}, got {metric!r}"
            )
        return metric


def bootstrap(
    metrics_of: Callable[[np.ndarray], dict], strata: np.ndarray, n_bootstrap: int, seed: int
) -> list[dict]:
    """``metrics_of(idx)`` over ``n_bootstrap`` resamples ``idx`` (int [n]) drawn with
    replacement within each stratum, so every resample keeps the strata's counts."""
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(strata == c) for c in np.unique(strata)]
    return [
        metrics_of(np.concatenate([rng.choice(m, size=len(m), replace=True) for m in members]))
        for _ in range(n_bootstrap)
    ]


def interval(values: Sequence[float | None]) -> list[float] | None:
    """The 95 % percentile interval of the defined ``values`` (``None``: none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def bootstrap_note(n_bootstrap: int, seed: int, by: str = "the task's strata") -> dict:
    return {
        "resamples": n_bootstrap,
        "seed": seed,
        "method": f"stratified by {by}, percentile interval",
    }

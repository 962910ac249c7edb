"""Survival: time to an event with censoring (overall or progression-free survival).

Labels CSV: a time column and an event column (``targets``, default ``time,event``;
event 1 = observed, 0 = censored); an empty or malformed cell is an error naming the
row. The head predicts one log-risk per slide (higher: earlier event). Loss: the
negative Cox partial log-likelihood with Breslow's handling of ties, over each
mini-batch (a slide's risk set is the batch's slides still at risk at its time, so a
batch needs several slides), divided by the batch's number of events; a batch with
no event adds zero, never NaN. Score: the log-risk, column ``risk``. Metrics
(scikit-survival's): Harrell's C-index (``c_index``, selects the best epoch), Uno's
IPCW C-index (``c_index_uno``) and the time-dependent cumulative/dynamic AUC averaged
over the quartiles of the event times (``td_auc``), each ``None`` where undefined.
Folds are stratified by event.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.app.config import ModelConfig
from pipeline.app.errors import ConfigError, UserError
from pipeline.app.tasks.base import Task

EVENT_VALUES = {"1": 1.0, "0": 0.0, "true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}


class Survival(Task):
    """Time and event read from ``columns`` (time first)."""

    name = "survival"
    metric_names = ("c_index", "c_index_uno", "td_auc")
    train_metric_names = ("c_index",)
    select_metrics = ("c_index", "c_index_uno", "td_auc")
    empty_is_error = True
    score_columns = ("risk",)

    def __init__(self, columns: Sequence[str] = ("time", "event")) -> None:
        if len(columns) != 2:
            raise ConfigError(f"targets: survival reads a time and an event column, got {columns}")
        self.target_columns = tuple(columns)

    @classmethod
    def columns(cls, config: ModelConfig) -> tuple[str, ...]:
        return config.targets or ("time", "event")

    @classmethod
    def from_config(cls, config: ModelConfig) -> Survival:
        if config.class_names:
            raise ConfigError("class_names: the survival task has no classes")
        return cls(cls.columns(config))

    def parse(self, values: Sequence[str], where: str) -> tuple[float, float]:
        time_cell, event_cell = values
        try:
            time = float(time_cell)
        except ValueError:
            time = math.nan
        if not (math.isfinite(time) and time >= 0):
            raise UserError(f"{where}: {self.target_columns[0]} {time_cell!r} is not a time >= 0")
        event = EVENT_VALUES.get(event_cell.lower())
        if event is None:
            raise UserError(
                f"{where}: {self.target_columns[1]} {event_cell!r} is not an event indicator "
                "(1 = event, 0 = censored)"
            )
        return time, event

    def check(self, targets: Sequence[tuple[float, float]], source: str) -> list[str]:
        super().check(targets, source)
        if not any(event for _, event in targets):
            raise UserError(
                f"{source}: no readable slide has an event (all censored); nothing to learn"
            )
        return []

    def strata(self, targets: Sequence[tuple[float, float]]) -> np.ndarray:
        return np.array([int(event) for _, event in targets], dtype=np.int64)

    @property
    def n_outputs(self) -> int:
        return 1

    def collate(self, targets: Sequence[tuple[float, float]], device: torch.device) -> torch.Tensor:
        return torch.tensor([list(t) for t in targets], dtype=torch.float32, device=device)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cox_terms(outputs[:, 0], targets[:, 0], targets[:, 1])

    def scores(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs[:, :1]

    def label(self, scores: np.ndarray) -> str:
        return ""

    def metrics(
        self, targets: Sequence[tuple[float, float]], scores: np.ndarray
    ) -> dict[str, float | None]:
        times = np.array([t for t, _ in targets], dtype=np.float64)
        events = np.array([e for _, e in targets], dtype=bool)
        return survival_metrics(times, events, scores[:, 0])


def cox_terms(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """float [B]: per-slide terms whose mean is the negative Cox partial log-likelihood
    (Breslow ties) of ``risk`` (float [B], log-risk) divided by the number of events:
    ``-(1/E) sum_{i: event} (r_i - log sum_{j: t_j >= t_i} exp r_j)``. Zero when no
    slide has an event."""
    at_risk = time[None, :] >= time[:, None]  # [i, j]: slide j still at risk at t_i
    log_risk_set = torch.logsumexp(risk[None, :].masked_fill(~at_risk, -math.inf), dim=1)
    n_events = event.sum().clamp(min=1.0)
    return -event * (risk - log_risk_set) * (len(risk) / n_events)


def survival_metrics(
    times: np.ndarray, events: np.ndarray, risk: np.ndarray
) -> dict[str, float | None]:
    """Harrell's and Uno's C-index and the mean time-dependent AUC (scikit-survival) of
    ``risk`` (float [n]) for ``times`` / ``events`` (float [n] / bool [n]); ``None``
    where undefined (no comparable pair, no event, too few slides)."""
    from sksurv.metrics import (
        concordance_index_censored,
        concordance_index_ipcw,
        cumulative_dynamic_auc,
    )
    from sksurv.util import Surv

    result: dict[str, float | None] = dict.fromkeys(Survival.metric_names)
    if len(times) < 2 or not events.any():
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            result["c_index"] = float(concordance_index_censored(events, times, risk)[0])
        except (ValueError, ZeroDivisionError):  # no comparable pair
            pass
        survival = Surv.from_arrays(events, times)
        try:
            result["c_index_uno"] = float(concordance_index_ipcw(survival, survival, risk)[0])
        except (ValueError, ZeroDivisionError):
            pass
        event_times = times[events]
        horizon = times.max()
        quartiles = np.unique(np.quantile(event_times, [0.25, 0.5, 0.75]))
        quartiles = quartiles[(quartiles >= times.min()) & (quartiles < horizon)]
        if len(quartiles):
            try:
                _, mean_auc = cumulative_dynamic_auc(survival, survival, risk, quartiles)
                result["td_auc"] = float(mean_auc) if np.isfinite(mean_auc) else None
            except (ValueError, ZeroDivisionError):
                pass
    return result

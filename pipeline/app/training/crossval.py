"""K-fold cross-validation: one run directory per fold, and their summary.

Folds are stratified by the task's strata and grouped by case (``splits``); the
slides are read once for all folds. ``out/fold_<k>`` is a run directory as ``train``
writes it (resumable the same way); ``out/cv_summary.csv`` holds each fold's
validation metrics at its best epoch, then their mean and standard deviation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.app.config import ModelConfig, TrainConfig
from pipeline.app.errors import UserError
from pipeline.app.files import write_csv
from pipeline.app.tasks import Task, task_of
from pipeline.app.training import data, splits
from pipeline.app.training.loop import (
    STATE_FILE,
    TrainResult,
    fit,
    read_run_labels,
    resolve_run,
    val_metric_columns,
)

CV_SUMMARY_FILE = "cv_summary.csv"


def cv_columns(task: Task) -> tuple[str, ...]:
    """The columns of ``cv_summary.csv``."""
    return ("fold", "best_epoch", "epochs_run", "n_train", "n_val", *val_metric_columns(task))


@dataclass
class CrossValidation:
    """``folds``: the ``TrainResult`` of each fold (``run_dir/fold_<k>``);
    ``summary``: the rows of ``cv_summary.csv``."""

    run_dir: Path
    folds: list[TrainResult]
    summary: list[dict]


def cross_validate(
    slides: str | os.PathLike,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    folds: int,
    model_config: ModelConfig | None = None,
    train_config: TrainConfig | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    resplit: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> CrossValidation:
    """Stratified, case-grouped K-fold cross-validation: fold k trains on the other
    folds and validates on fold k, in ``out/fold_<k>``; ``out/cv_summary.csv`` gets
    each fold's validation metrics at its best epoch, then their mean and standard
    deviation. Arguments as ``loop.train``; ``folds`` >= 2."""
    from tqdm import tqdm

    if folds < 2:
        raise UserError(f"folds: expected >= 2, got {folds}")
    log = log or tqdm.write
    out = Path(out)
    run_config, resuming = resolve_run(out / "fold_1", model_config, train_config, resplit)
    run_config, pool, _ = read_run_labels(run_config, resuming, labels, slides)
    if resuming:  # refuse changed labels before reading slides
        splits.saved_split(out / "fold_1", pool, None)
    task = task_of(run_config.model)
    labelled = data.load(pool, None, run_config.model, task, log, progress, cache_dir)
    cfg = run_config.train
    assigned = splits.slide_folds(labelled.slides, task, folds, cfg.seed)
    results = []
    for k in range(folds):
        fold_dir = out / f"fold_{k + 1}"
        log(f"fold {k + 1}/{folds}")
        fold_config, resuming = resolve_run(fold_dir, run_config.model, cfg, resplit)
        if resuming:
            sets = splits.saved_split(fold_dir, pool, None)
            train_set, val_set = splits.apply_split(sets, labelled)
        else:
            train_set = [s for s, f in zip(labelled.slides, assigned, strict=True) if f != k]
            val_set = [s for s, f in zip(labelled.slides, assigned, strict=True) if f == k]
        results.append(
            fit(
                fold_dir, fold_config, resuming, train_set, val_set, labelled, device, progress, log
            )
        )
    summary = cv_summary(results, task)
    write_csv(out / CV_SUMMARY_FILE, cv_columns(task), summary)
    mean, sd = summary[-2], summary[-1]
    log(
        f"cross-validation over {folds} folds: "
        + ", ".join(f"{m} {mean[m]} ± {sd[m]}" for m in val_metric_columns(task) if mean[m] != "")
        + f"; {out / CV_SUMMARY_FILE}"
    )
    return CrossValidation(out, results, summary)


def cv_summary(results: Sequence[TrainResult], task: Task) -> list[dict]:
    """One row per fold (validation metrics at its best epoch), then ``mean`` and
    ``sd`` (sample standard deviation over the folds where a metric is defined)."""
    metrics = val_metric_columns(task)
    rows = []
    for k, result in enumerate(results, start=1):
        state = json.loads((result.run_dir / STATE_FILE).read_text())
        best = result.history[result.best_epoch - 1]
        rows.append(
            {
                "fold": k,
                "best_epoch": result.best_epoch,
                "epochs_run": len(result.history),
                "n_train": len(state["train_slides"]),
                "n_val": len(state["val_slides"]),
                **{m: best[m] for m in metrics},
            }
        )
    mean, sd = {"fold": "mean"}, {"fold": "sd"}
    for m in metrics:
        values = [r[m] for r in rows if r[m] is not None]
        mean[m] = round(float(np.mean(values)), 6) if values else ""
        sd[m] = round(float(np.std(values, ddof=1)), 6) if len(values) > 1 else ""
    return [*rows, mean, sd]

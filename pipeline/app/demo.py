"""``ats-wsi demo``: synthetic data, training, prediction and a baseline, in minutes.

The demo writes a training and a test set of synthetic slides (``demo_dataset``), trains
the attention-sampling classifier, predicts the test slides into the standard
outputs, and trains the same feature CNN on thumbnails only. On this dataset the
label is invisible at low resolution, so the baseline stays near chance.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.app import synth
from pipeline.app.config import DemoConfig, ModelConfig, PredictConfig, TrainConfig
from pipeline.app.files import read_csv
from pipeline.app.prediction.batch import predict
from pipeline.app.results import outputs
from pipeline.app.runtime import default_device
from pipeline.app.slide.labels import read_labels
from pipeline.app.tasks import task_of
from pipeline.app.training.baseline import low_res_metrics, train_low_res
from pipeline.app.training.data import load_slides
from pipeline.app.training.loop import train


@dataclass
class DemoResult:
    out_dir: Path
    run_dir: Path
    predictions_dir: Path
    ats_accuracy: float
    baseline_accuracy: float
    seconds: float


def run_demo(
    out_dir: str | os.PathLike = DemoConfig.out_dir,
    n_train: int = DemoConfig.n_train,
    n_test: int = DemoConfig.n_test,
    size: int = DemoConfig.size,
    epochs: int = DemoConfig.epochs,
    seed: int = DemoConfig.seed,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run the whole demo into ``out_dir`` and return the accuracies on the test set.

    Layout: ``train_slides/``, ``test_slides/`` (each with ``labels.csv``), ``run/``
    (the trained model), ``predictions/`` (``predict``'s outputs).
    """
    began = time.perf_counter()
    out = Path(out_dir)
    # The networks are small: one intra-op thread is faster than two fighting
    # over the cores with the tile decoders.
    torch.set_num_threads(1)
    train_dir, test_dir = out / "train_slides", out / "test_slides"
    log(f"writing {n_train} + {n_test} synthetic {size}x{size} slides to {out}")
    train_labels = synth.write_dataset(
        train_dir, n=n_train, size=size, seed=seed, progress=progress, workers=2
    )
    test_labels = synth.write_dataset(
        test_dir, n=n_test, size=size, seed=seed + 1, progress=progress, workers=2
    )

    device = default_device()
    model_config = ModelConfig(class_names=synth.CLASS_NAMES)
    train_config = TrainConfig(epochs=epochs, seed=seed)
    log("training the attention-sampling model")
    trained = train(
        train_dir,
        train_labels,
        out / "run",
        model_config,
        train_config,
        device=device,
        progress=progress,
        log=log,
    )
    log("predicting the test slides")
    summary = predict(
        trained.model, [test_dir], out / "predictions", PredictConfig(seed=seed), progress=progress
    )
    truth = {r.name: r.label for r in read_labels(test_labels, test_dir).rows}
    rows = read_csv(summary.out_dir / outputs.PREDICTIONS)
    ats_accuracy = sum(r["label"] == truth[r["slide"]] for r in rows) / len(truth)

    log("training the low-resolution-only baseline (same feature CNN on thumbnails)")
    task = task_of(model_config)
    train_slides, _ = load_slides(
        read_labels(train_labels, train_dir).rows, model_config, task, log, progress=False
    )
    test_slides, _ = load_slides(
        read_labels(test_labels, test_dir).rows, model_config, task, log, progress=False
    )
    baseline = train_low_res(train_slides, model_config, train_config, device)
    baseline_accuracy = low_res_metrics(baseline, test_slides)["accuracy"]

    result = DemoResult(
        out,
        trained.run_dir,
        summary.out_dir,
        ats_accuracy,
        baseline_accuracy,
        time.perf_counter() - began,
    )
    log(
        f"\ntest accuracy on {len(truth)} slides: attention sampling {ats_accuracy:.1%}, "
        f"low-resolution baseline {baseline_accuracy:.1%} (chance 50%)\n"
        f"model:       {result.run_dir}\n"
        f"predictions: {summary.out_dir / outputs.PREDICTIONS}\n"
        f"heatmaps:    {summary.out_dir / 'heatmaps'}\n"
        f"patches:     {summary.out_dir / 'patches'} (GeoJSON, level-0 pixels, for QuPath)\n"
        f"done in {result.seconds:.0f} s"
    )
    return result

"""Every task on its synthetic dataset: attention sampling against the thumbnail baseline.

For each task (``ats-wsi synth --task``: the target is set by cells whose pattern is
visible only at level 0) and seed, writes a training and a test set, trains the
attention-sampling model and the thumbnail-only baseline (the same feature CNN on the
attention view) with the same options, and scores both on the test slides with the
task's own selection metric (classification ROC AUC, multi-label mean AUC,
regression R², survival Harrell's C-index). Prints one row per task and seed, then
the mean and standard deviation per task, and writes them as CSV.

    python scripts/bench_tasks.py --out runs/bench_tasks

The seed changes the datasets, the split, the initial weights and the sampling.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.app.config import ModelConfig, PredictConfig, TrainConfig
from pipeline.app.files import read_csv
from pipeline.app.prediction.batch import predict
from pipeline.app.slide.labels import read_labels
from pipeline.app.synth import TASK_COLUMNS, write_dataset
from pipeline.app.tasks import task_of
from pipeline.app.training.baseline import low_res_metrics, train_low_res
from pipeline.app.training.data import load_slides
from pipeline.app.training.loop import train

TASKS = ("classification", "multilabel", "regression", "survival")


def run_one(task: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and score both models on one task and seed; the row of the table."""
    out = Path(args.out) / task / f"seed_{seed}"
    train_dir, test_dir = out / "train", out / "test"
    options = {"size": args.size, "task": task, "workers": args.workers}
    train_labels = write_dataset(train_dir, n=args.n_train, seed=100 * seed + 1, **options)
    test_labels = write_dataset(test_dir, n=args.n_test, seed=100 * seed + 2, **options)
    targets = TASK_COLUMNS[task] if task == "multilabel" else ()
    model_config = ModelConfig(
        task=task, targets=targets, n_patches=args.n_patches, low_res_max_side=args.low_res
    )
    train_config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=seed)
    began = time.perf_counter()
    trained = train(
        train_dir,
        train_labels,
        out / "run",
        model_config,
        train_config,
        device="cpu",
        progress=False,
        log=lambda _: None,
        cache_dir=out / "views",
    )
    ats_seconds = time.perf_counter() - began
    task_obj = trained.model.task
    metric = task_obj.select_metrics[0]
    summary = predict(
        trained.model, [test_dir], out / "pred", PredictConfig(seed=seed), progress=False
    )
    rows = {r["slide"]: r for r in read_csv(summary.out_dir / "predictions.csv")}
    test_rows = read_labels(test_labels, test_dir, task_obj.target_columns).rows
    truth = [task_obj.parse(r.values, str(r.line)) for r in test_rows]
    scores = np.array([[float(rows[r.name][c]) for c in task_obj.score_columns] for r in test_rows])
    ats = task_obj.metrics(truth, scores)[metric]

    config = trained.config.model  # completed from the labels (classes, target stats)
    began = time.perf_counter()
    train_rows = read_labels(train_labels, train_dir, task_obj.target_columns).rows
    slides, _ = load_slides(train_rows, config, task_of(config), print, False, out / "views")
    tests, _ = load_slides(test_rows, config, task_of(config), print, False, out / "views")
    baseline = train_low_res(slides, config, train_config, "cpu")
    thumbnail = low_res_metrics(baseline, tests)[metric]
    base_seconds = time.perf_counter() - began
    return {
        "task": task,
        "seed": seed,
        "metric": metric,
        "ats": _round(ats),
        "thumbnail": _round(thumbnail),
        "ats_seconds": round(ats_seconds, 1),
        "thumbnail_seconds": round(base_seconds, 1),
    }


def _round(value: float | None) -> float | str:
    return "" if value is None else round(float(value), 4)


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds, per task and model."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        row = {"task": task, "seed": "mean ± sd", "metric": mine[0]["metric"]}
        for model in ("ats", "thumbnail"):
            values = [r[model] for r in mine if r[model] != ""]
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            row[model] = f"{np.mean(values):.3f} ± {sd:.3f}" if values else "undefined"
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench_tasks")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-train", type=int, default=40)
    p.add_argument("--n-test", type=int, default=20)
    p.add_argument("--size", type=int, default=1536)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-patches", type=int, default=12)
    p.add_argument("--low-res", type=int, default=256, help="longer side of the attention view")
    p.add_argument("--workers", type=int, default=2, help="processes writing slides")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # small networks: one intra-op thread beside the decoders
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    rows = []
    for task in args.tasks.split(","):
        for seed in range(args.seeds):
            rows.append(run_one(task, seed, args))
            print(", ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    table = summarise(rows)
    for row in table:
        print(f"{row['task']}: {row['metric']} ATS {row['ats']}, thumbnail {row['thumbnail']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"load average {os.getloadavg()[0]:.2f}; rows in {out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

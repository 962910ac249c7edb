"""Cold start on the synthetic slide task: plain attention sampling versus the remedies.

Writes one synthetic dataset (``ats-wsi synth``'s, the demo's slide size), then trains
the default classifier once per arm and seed and reports the epoch at which the
validation accuracy first reaches 95 % (mean and spread over seeds), the validation
accuracy at the end, and the training seconds per epoch. The remedies are those of
docs/estimator.md, exploration and priors (``TrainConfig.exploration``, ``prior``,
``prior_weight``), decaying to 0 over ``--remedy-epochs``, more patches per slide over
those epochs (``early_patches``) and the attention net fitted to the prior before
training (``prior_init_steps``); the estimator stays unbiased.

    python scripts/cold_start_slides.py --out runs/cold_start_slides

Seeds change the split, the initial weights and the sampling; the dataset is the same.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.app.config import ESTIMATORS, ModelConfig, TrainConfig
from pipeline.app.synth import CLASS_NAMES, write_dataset
from pipeline.app.training.loop import train

ARMS = {
    "plain": {},
    "explore": {"exploration": 0.5},
    "explore+hematoxylin": {"exploration": 0.3, "prior": "hematoxylin", "prior_weight": 0.5},
    "hematoxylin": {"prior": "hematoxylin", "prior_weight": 0.8},
    # 4x the model's 12 patches per slide while the remedies last.
    "early-patches": {"early_patches": 48},
    "early-patches+explore+hematoxylin": {
        "early_patches": 48,
        "exploration": 0.3,
        "prior": "hematoxylin",
        "prior_weight": 0.5,
    },
    # The attention net first fitted to the hematoxylin prior (100 steps, no patches).
    "init-hematoxylin": {"prior": "hematoxylin", "prior_init_steps": 100},
    "init-hematoxylin-300": {"prior": "hematoxylin", "prior_init_steps": 300},
    # ... and the prior kept in the proposal while the remedies last.
    "init+hematoxylin": {"prior": "hematoxylin", "prior_init_steps": 100, "prior_weight": 0.5},
    # The same with the tissue prior (uniform on tissue): a control.
    "init-tissue": {"prior": "tissue", "prior_init_steps": 100},
}
TARGET = 0.95


def first_epoch_at(history: list[dict], target: float) -> int | None:
    """The first epoch whose validation accuracy is at least ``target``."""
    return next((r["epoch"] for r in history if r["val_accuracy"] >= target), None)


def _typed(row: dict) -> dict:
    """A row read back from cold_start_slides.csv, with its numbers as numbers."""
    reached = row["epoch_to_95pct"]
    return {
        **row,
        "seed": int(row["seed"]),
        "epoch_to_95pct": int(reached) if reached else "",
        "final_val_accuracy": float(row["final_val_accuracy"]),
        "seconds_per_epoch": float(row["seconds_per_epoch"]),
    }


def main(argv: list[str] | None = None) -> int:
    """Train the arms and seeds of ``argv`` and print the table (Markdown); the exit
    status. Rows of arms and seeds already in ``--out`` and not rerun are kept."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/cold_start_slides"))
    parser.add_argument("--n", type=int, default=64, help="slides (a quarter for validation)")
    parser.add_argument("--size", type=int, default=1536, help="slide side in pixels")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--remedy-epochs", type=float, default=4.0)
    parser.add_argument(
        "--n-patches",
        type=int,
        default=ModelConfig.n_patches,
        help="the model's patches per slide (training and validation)",
    )
    parser.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default="unbiased",
        help="the model's estimator (ModelConfig.estimator)",
    )
    parser.add_argument(
        "--synth-workers", type=int, default=2, help="processes writing the dataset"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = args.out / "slides"
    labels = data / "labels.csv"
    if not labels.is_file():
        write_dataset(data, n=args.n, size=args.size, seed=0, workers=args.synth_workers)
    rows = []
    for arm in args.arms:
        for seed in args.seeds:
            config = TrainConfig(
                epochs=args.epochs, seed=seed, remedy_epochs=args.remedy_epochs, **ARMS[arm]
            )
            began = time.perf_counter()
            result = train(
                data,
                labels,
                args.out / arm / f"seed_{seed}",
                ModelConfig(
                    class_names=CLASS_NAMES, n_patches=args.n_patches, estimator=args.estimator
                ),
                config,
                device="cpu",
                progress=False,
                log=lambda _: None,
            )
            seconds = time.perf_counter() - began
            reached = first_epoch_at(result.history, TARGET)
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "epoch_to_95pct": reached or "",
                    "final_val_accuracy": result.history[-1]["val_accuracy"],
                    "seconds_per_epoch": round(seconds / args.epochs, 2),
                    "val_accuracy_by_epoch": " ".join(
                        f"{r['val_accuracy']:.2f}" for r in result.history
                    ),
                }
            )
            print(rows[-1], flush=True)
    table = args.out / "cold_start_slides.csv"
    if table.is_file():  # keep the rows of the arms and seeds not rerun
        done = {(r["arm"], r["seed"]) for r in rows}
        with table.open(newline="") as f:
            kept = [_typed(r) for r in csv.DictReader(f)]
        rows = [r for r in kept if (r["arm"], r["seed"]) not in done] + rows
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[-1]))
        writer.writeheader()
        writer.writerows(rows)
    print(
        f"\n| arm | seeds reaching {TARGET:.0%} | epochs to {TARGET:.0%} (mean ± sd) "
        "| final val accuracy | s/epoch |\n|---|---|---|---|---|"
    )
    for arm in args.arms:
        mine = [r for r in rows if r["arm"] == arm]
        epochs = [r["epoch_to_95pct"] for r in mine if r["epoch_to_95pct"] != ""]
        spread = f"{np.mean(epochs):.2f} ± {np.std(epochs):.2f}" if epochs else "-"
        final = np.mean([r["final_val_accuracy"] for r in mine])
        speed = np.mean([r["seconds_per_epoch"] for r in mine])
        print(f"| {arm} | {len(epochs)}/{len(mine)} | {spread} | {final:.3f} | {speed:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

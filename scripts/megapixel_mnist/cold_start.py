"""Cold start of attention sampling: plain ATS versus ATS with the cold-start remedies.

The remedies (exploration, priors) are described in docs/estimator.md.

Trains `ats-unbiased` on a preset for several seeds, once per arm, and reports the
steps and training seconds until the test error first falls below 50 % and 10 %, and
the test error at the end of the budget (mean and spread over seeds), with curves of
test error against steps. Run from the repository root, e.g.:

    python -m scripts.megapixel_mnist.cold_start --preset quick --seeds 0 1 2 \\
        --out runs/cold_start_quick
    python -m scripts.megapixel_mnist.cold_start --summarise runs/cold_start_quick

Runs of different arms or seeds can go to separate processes (`--arms`, `--seeds`)
writing into the same --out; `--summarise` reads whatever is there.

Writes `<out>/<arm>/seed_<k>/` (the usual metrics.csv, results), and with --summarise
`cold_start.csv`, `cold_start.md` and `cold_start.png` in <out>.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import numpy as np
import torch

from .train import PRESETS, run

ARMS = {
    "plain": {},
    # Uniform exploration, decaying to 0 over the first epochs' steps.
    "explore": {"exploration": 0.5},
    # Exploration plus the brightness prior of the low-resolution view.
    "explore+prior": {"exploration": 0.3, "prior_weight": 0.5},
    # The estimated features standardised over the batch before the head (a change of
    # the network, not of the estimator; see ATSModel).
    "centred": {"centred_head": True},
    "centred+explore+prior": {"centred_head": True, "exploration": 0.3, "prior_weight": 0.5},
    # The attention net first fitted to the brightness prior (100 batches of views only;
    # a change of the initial weights, not of the estimator).
    "init": {"prior_init_steps": 100},
    "centred+init": {"centred_head": True, "prior_init_steps": 100},
    # ... and 3x the patches per canvas while the remedies last.
    "centred+init+patches": {"centred_head": True, "prior_init_steps": 100, "early_patches": 30},
    # ... and the entropy regularizer ramped from the paper's 1e-4 to a negative strength
    # (sharper attention) between the end of the remedies and the end of the budget.
    "centred+init+sharpen": {
        "centred_head": True,
        "prior_init_steps": 100,
        "regularizer_end": -0.01,
    },
    # ... and the draws' estimates weighted in proportion to their order (pipeline
    # estimator "linear": unbiased, less variance for a peaked attention).
    "centred+init+linear": {"centred_head": True, "prior_init_steps": 100, "estimator": "linear"},
}
THRESHOLDS = (0.5, 0.1)


def first_below(rows: list[dict], threshold: float) -> dict | None:
    """The first metrics row (in step order) whose test error is below `threshold`."""
    return next((r for r in rows if r["test_error"] < threshold), None)


def read_runs(out: Path) -> dict[str, list[list[dict]]]:
    """`{arm: [rows of one seed, ...]}` from `<out>/<arm>/seed_*/metrics.csv`."""
    runs: dict[str, list[list[dict]]] = {}
    for metrics in sorted(out.glob("*/seed_*/metrics.csv")):
        with metrics.open() as f:
            rows = [
                {
                    **r,
                    "steps": int(r["steps"]),
                    "test_error": float(r["test_error"]),
                    "train_seconds": float(r["train_seconds"]),
                }
                for r in csv.DictReader(f)
                if r["model"] == "ats-unbiased"
            ]
        runs.setdefault(metrics.parent.parent.name, []).append(rows)
    return runs


def summarise(out: Path) -> list[dict]:
    """Write the cold-start table and curves for the runs in `out`; return the table."""
    table = []
    for arm, seeds in read_runs(out).items():
        row = {"arm": arm, "seeds": len(seeds)}
        for threshold in THRESHOLDS:
            hits = [first_below(rows, threshold) for rows in seeds]
            tag = f"{round(100 * threshold)}pct"
            row[f"reached_{tag}"] = sum(h is not None for h in hits)
            row[f"steps_to_{tag}"] = _mean_sd([h["steps"] for h in hits if h])
            row[f"seconds_to_{tag}"] = _mean_sd([h["train_seconds"] for h in hits if h])
        row["final_test_error"] = _mean_sd([100 * rows[-1]["test_error"] for rows in seeds])
        row["final_steps"] = seeds[0][-1]["steps"]
        table.append(row)
    with (out / "cold_start.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    lines = [
        "| arm | seeds | steps to < 50 % | s to < 50 % | steps to < 10 % | s to < 10 % "
        "| test error at the end (%) | budget (steps) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        n = r["seeds"]
        lines.append(
            f"| {r['arm']} | {n} | {r['steps_to_50pct']} ({r['reached_50pct']}/{n}) | "
            f"{r['seconds_to_50pct']} | {r['steps_to_10pct']} ({r['reached_10pct']}/{n}) | "
            f"{r['seconds_to_10pct']} | {r['final_test_error']} | {r['final_steps']} |"
        )
    (out / "cold_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(read_runs(out), out / "cold_start.png")
    return table


def _mean_sd(values: list[float]) -> str:
    """'mean ± sd' (sd over seeds; '-' when no seed got there)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.0f}"
    return f"{np.mean(values):.0f} ± {np.std(values):.0f}"


def _plot(runs: dict[str, list[list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=100)
    for colour, (arm, seeds) in zip(plt.cm.tab10.colors, runs.items(), strict=False):
        for k, rows in enumerate(seeds):
            ax.plot(
                [r["steps"] for r in rows],
                [100 * r["test_error"] for r in rows],
                color=colour,
                alpha=0.8,
                label=arm if k == 0 else None,
            )
    for threshold in THRESHOLDS:
        ax.axhline(100 * threshold, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("training steps")
    ax.set_ylabel("test error (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default runs/cold_start_<preset>)"
    )
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    parser.add_argument(
        "--remedy-epochs",
        type=float,
        default=4,
        help="epochs over which the remedies' weights decay to 0",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--summarise", type=Path, metavar="OUT", help="only summarise the runs already in OUT"
    )
    args = parser.parse_args(argv)
    if args.summarise:
        summarise(args.summarise)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    out = args.out or Path("runs") / f"cold_start_{preset.name}"
    steps_per_epoch = -(-preset.n_train // preset.batch_size)
    remedy_steps = round(args.remedy_epochs * steps_per_epoch)
    for arm in args.arms:
        for seed in args.seeds:
            arm_preset = dataclasses.replace(
                preset,
                seed=seed,
                remedy_steps=remedy_steps,
                **ARMS[arm],
                epochs={"ats-unbiased": args.epochs or preset.epochs["ats-unbiased"]},
            )
            run(arm_preset, out / arm / f"seed_{seed}", ["ats-unbiased"], torch.device("cpu"))
    summarise(out)


if __name__ == "__main__":
    main()

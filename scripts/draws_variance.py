"""How much K draws per slide steady a prediction: the spread across seeds of the
class probability for K = 1, 2, 4, 8, 16, and the time per slide.

    python scripts/draws_variance.py --model ats-demo/run --slides ats-demo/test_slides

For every slide and K, ``predict_slide`` runs with ``--seeds`` different run seeds;
the table gives the standard deviation across seeds of the last class's probability
(mean over slides), the share of slides whose label changes with the seed, the
distinct positions the feature network computed per slide (mean; at most K x N), and
the seconds per slide (this process, one thread).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.app.model.checkpoint import load_model
from pipeline.app.prediction.inference import predict_slide
from pipeline.app.slide.inputs import list_inputs


def main(argv: list[str] | None = None) -> int:
    """Run the measurement of ``argv`` and print its table (Markdown); the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--slides", type=Path, required=True)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--draws", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds: at least 2 (a spread across seeds)")
    torch.set_num_threads(1)
    model, _ = load_model(args.model)
    paths = [i.path for i in list_inputs([args.slides]) if not i.error]
    print(f"{len(paths)} slides, {args.seeds} seeds per K\n")
    print(
        "| draws K | sd of p across seeds (mean over slides) | slides whose label flips "
        "| distinct patches / slide (of K x N) | s / slide |\n|---|---|---|---|---|"
    )
    for draws in args.draws:
        began = time.perf_counter()
        # A tiny display thumbnail: only the probabilities are looked at here.
        results = [
            [
                predict_slide(model, p, seed, draws=draws, display_side=32)
                for seed in range(args.seeds)
            ]
            for p in paths
        ]
        seconds = (time.perf_counter() - began) / (len(paths) * args.seeds)
        probs = np.array([[r.probs[-1] for r in row] for row in results])
        distinct = np.mean([r.distinct_patches for row in results for r in row])
        flips = np.mean([len({bool(v > 0.5) for v in row}) > 1 for row in probs])
        print(
            f"| {draws} | {probs.std(axis=1, ddof=1).mean():.4f} | {flips:.0%} | "
            f"{distinct:.1f} (of {draws * model.config.n_patches}) | {seconds:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

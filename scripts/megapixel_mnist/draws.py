"""Test error of trained ATS models over many draws: how much of it is the sampling.

    python -m scripts.megapixel_mnist.draws RUN_DIR [RUN_DIR ...] [--repeats 10]

A RUN_DIR is a training run's output (`python -m scripts.megapixel_mnist` or a
`cold_start` `<arm>/seed_<k>` directory) holding `preset.json` and `model.safetensors`.
One evaluation of the test set with one draw of patches per canvas has two sources of
noise, the test set and the draw; this prints, per run, the single-draw test error
over `--repeats` evaluation seeds (mean and sd), with the estimator the model was
trained with and with the other one (`pipeline.expectation`'s "unbiased" and
"linear"), and the error of the class probabilities averaged over 8 draws.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .data import CanvasConfig
from .models import ATSModel
from .train import (
    Preset,
    build_model,
    evaluate,
    make_datasets,
    refresh_statistics,
    statistics_loader,
)

OTHER = {"unbiased": "linear", "linear": "unbiased"}


def load_run(run_dir: Path) -> tuple[Preset, ATSModel]:
    """The preset and the trained `ats-unbiased` model of a run directory."""
    fields = json.loads((run_dir / "preset.json").read_text())
    canvas = fields.pop("canvas")
    canvas["size"] = tuple(canvas["size"])
    preset = Preset(canvas=CanvasConfig(**canvas), **fields)
    model = build_model("ats-unbiased", preset)
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    return preset, model


def errors_over_draws(model: ATSModel, loader, repeats: int) -> list[float]:
    """The single-draw test error of `repeats` evaluations, seeded 0..repeats-1."""
    errors = []
    for seed in range(repeats):
        torch.manual_seed(seed)
        errors.append(evaluate(model, loader)[1])
    return errors


def use_estimator(model: ATSModel, estimator: str, statistics) -> None:
    """Switch the sampler's estimator; a centred head's test-time statistics are
    recomputed for it from the `statistics` batches."""
    model.ats.estimator = estimator
    refresh_statistics(model, statistics)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    parser.add_argument("--repeats", type=int, default=10, help="evaluation seeds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        "| run | trained with | one draw, same estimator (%) | one draw, other estimator (%) "
        "| mean of 8 draws (%) |\n|---|---|---|---|---|"
    )
    for run_dir in args.runs:
        preset, model = load_run(run_dir)
        train_set, test_set = make_datasets(preset)
        loader = torch.utils.data.DataLoader(test_set, preset.batch_size)
        statistics = statistics_loader(train_set, preset.batch_size)
        trained = preset.estimator
        cells = []
        for estimator in (trained, OTHER[trained]):
            use_estimator(model, estimator, statistics)
            errors = 100 * np.array(errors_over_draws(model, loader, args.repeats))
            cells.append(f"{errors.mean():.1f} ± {errors.std():.1f}")
        use_estimator(model, trained, statistics)
        torch.manual_seed(0)
        mean_of_8 = 100 * evaluate(model, loader, draws=8)[1]
        print(f"| {run_dir} | {trained} | {cells[0]} | {cells[1]} | {mean_of_8:.1f} |", flush=True)


if __name__ == "__main__":
    main()

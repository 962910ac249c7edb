"""Smoke test of scripts/draws_variance.py: an untrained saved model on three tiny
synthetic slides, two seeds, K = 1 and 2."""

from __future__ import annotations

import pytest
import torch

from pipeline.app.config import ModelConfig, RunConfig
from pipeline.app.model.checkpoint import save_model
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.synth import CLASS_NAMES, write_dataset
from scripts import draws_variance
from tests.scripts.helpers import markdown_tables, number


@pytest.fixture(scope="module")
def run_and_slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("draws")
    write_dataset(root / "slides", n=3, size=256, seed=0)
    torch.manual_seed(0)
    model = SlideClassifier(ModelConfig(class_names=CLASS_NAMES, n_patches=4))
    save_model(root / "run", model, RunConfig(model=model.config))
    return root / "run", root / "slides"


def test_draws_variance_prints_one_row_per_k(run_and_slides, capsys):
    run, slides = run_and_slides
    argv = ["--model", str(run), "--slides", str(slides), "--seeds", "2", "--draws", "1", "2"]
    assert draws_variance.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 slides, 2 seeds per K")
    (table,) = markdown_tables(out)
    assert [r["draws K"] for r in table] == ["1", "2"]
    for row in table:
        # Different seeds draw different patches: the probability moves with the seed.
        assert 0 < number(row["sd of p across seeds (mean over slides)"]) < 0.5
        assert 0 <= number(row["slides whose label flips"]) <= 100
        assert number(row["s / slide"]) > 0
        distinct = row["distinct patches / slide (of K x N)"]
        k = int(row["draws K"])
        assert distinct.endswith(f"(of {k * 4})") and 0 < number(distinct) <= k * 4


def test_draws_variance_needs_two_seeds_for_a_spread(run_and_slides):
    run, slides = run_and_slides
    with pytest.raises(SystemExit):
        draws_variance.main(["--model", str(run), "--slides", str(slides), "--seeds", "1"])

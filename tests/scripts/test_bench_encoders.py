"""Smoke test of scripts/bench_encoders.py: timm's ResNet-18 (random weights, nothing
downloaded) on small patches of a tiny generated slide."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("timm")

from scripts import bench_encoders  # noqa: E402
from tests.scripts.helpers import finite, markdown_tables, number  # noqa: E402

ENCODER = "timm:resnet18"


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("encoders") / "mosaic-2048.tiff"
    bench_encoders.make_slide(path, 2048)
    return path


def test_bench_encoders_prints_one_row_per_encoder(slide, capsys):
    argv = ["--cache", str(slide.parent), "--side", "2048", "--tiles", "3", "--repeats", "1"]
    assert (
        bench_encoders.main([*argv, "--encoders", ENCODER, "--patch", "64", "--patches", "4"]) == 0
    )
    out = capsys.readouterr().out
    (table,) = markdown_tables(out)
    (row,) = table
    assert row["encoder"] == f"`{ENCODER}`"
    tuned, frozen = row["ATS train step, fine-tuned / frozen"].split("/")
    assert all(finite(cell) for cell in (row["ATS predict / slide"], tuned, frozen))
    assert "3 timed" in row["full tiling / slide"] and number(row["tissue tiles"]) > 3
    assert finite(row["ratio (tiling / ATS predict)"])
    distinct = row["distinct patches (of K x N)"]
    assert distinct.endswith("(of 32)") and 0 < number(distinct) <= 32
    assert "N = 4 patches of 64²" in out and "load average (1 min):" in out


@pytest.mark.parametrize("freeze", [False, True])
def test_train_step_trains_the_head_and_the_encoder_unless_frozen(slide, freeze):
    model = bench_encoders.build(ENCODER, freeze, patch=32, n_patches=2)
    head = model.head.weight.detach().clone()
    encoder = [p.detach().clone() for p in model.feature_net.parameters()]
    seconds = bench_encoders.train_step_seconds(model, slide, repeats=1)
    assert seconds > 0
    assert not torch.equal(model.head.weight, head)
    unchanged = [
        torch.equal(p, q) for p, q in zip(model.feature_net.parameters(), encoder, strict=True)
    ]
    assert all(unchanged) if freeze else not all(unchanged)

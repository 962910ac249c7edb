"""Smoke test of scripts/bench_report.py: a real ``predict`` output of two tiny slides
replicated to five, the report built, and opened in headless Chromium when it is here."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.app import files
from pipeline.app.config import ModelConfig
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.prediction.batch import predict
from pipeline.app.results import outputs
from pipeline.app.synth import CLASS_NAMES, write_dataset
from scripts import bench_report


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_dataset(root / "slides", n=2, size=256, seed=0)
    torch.manual_seed(0)
    model = SlideClassifier(ModelConfig(class_names=CLASS_NAMES, n_patches=3)).eval()
    predict(model, [root / "slides"], root / "predicted", progress=False)
    return root / "predicted"


def test_bench_report_replicates_builds_and_measures_the_page(source, tmp_path, capsys):
    out = tmp_path / "big"
    assert (
        bench_report.main(["--source", str(source), "--n", "5", "--out", str(out), "--wait", "0.2"])
        == 0
    )
    printed = capsys.readouterr().out
    rows = files.read_csv(out / outputs.PREDICTIONS)
    assert len(rows) == 5 and len({r["slide"] for r in rows}) == 5
    # Files are hard links to the source's, not copies.
    heatmap = outputs.heatmap_path(out, rows[0]["slide"])
    assert heatmap.stat().st_nlink >= 2
    html = (out / "report.html").read_text()
    assert all(r["slide"] in html for r in rows)
    assert re.search(r"^5 slides: report built in [\d.]+ s, [\d.]+ MB HTML$", printed, re.M)
    if bench_report.browser_missing() is None:
        images = int(re.search(r"^img_elements: (\d+)$", printed, re.M).group(1))
        loaded = int(re.search(r"^images_loaded: (\d+)$", printed, re.M).group(1))
        assert 0 < loaded <= images
        share = re.search(
            r"^loaded at the top of the page / files beside it: (\S+)%$", printed, re.M
        )
        assert 0 < float(share.group(1)) <= 100
    else:
        assert "browser: skipped (" in printed
    assert "load average (1 min):" in printed


def test_bench_report_without_browser_says_so(source, tmp_path, capsys):
    out = tmp_path / "small"
    assert (
        bench_report.main(["--source", str(source), "--n", "2", "--out", str(out), "--no-browser"])
        == 0
    )
    assert "\nbrowser: skipped (--no-browser)\n" in capsys.readouterr().out

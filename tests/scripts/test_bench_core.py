"""Smoke test of scripts/bench_core.py: both tables at a tiny image size."""

from __future__ import annotations

from scripts import bench_core
from tests.scripts.helpers import finite, markdown_tables


def test_bench_core_prints_both_tables_with_finite_ratios(capsys):
    assert bench_core.main(["--size", "256", "--attention", "16", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    extract, estimate = markdown_tables(out)
    assert [(r["N"], r["p"]) for r in extract] == [
        ("10", "64"),
        ("10", "256"),
        ("100", "64"),
        ("100", "256"),
    ]
    ratios = ("loop / extract_patches", "extract_patches / copy")
    for row in extract:
        assert all(finite(row[c]) for c in ("extract_patches", "slice loop", *ratios))
    assert [r["N"] for r in estimate] == ["10", "100"]
    for row in estimate:
        assert all(finite(cell) for cell in row.values())
        # The dense one-hot gather saves an [N, h*w] matrix; the core saves far less.
        n = int(row["N"])
        assert int(row["largest saved dense"].replace(",", "")) == n * 16 * 16
        assert int(row["largest saved core"].replace(",", "")) < n * 16 * 16
    assert "load average (1 min):" in out


def test_bench_core_busy_runs_beside_a_cpu_bound_process_and_stops_it(capsys):
    import psutil

    before = {p.pid for p in psutil.Process().children()}
    assert bench_core.main(["--size", "256", "--attention", "16", "--rounds", "1", "--busy"]) == 0
    assert "one other CPU-bound process running" in capsys.readouterr().out
    assert {p.pid for p in psutil.Process().children()} <= before  # the spinner is gone

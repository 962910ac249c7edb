"""Smoke test of scripts/cold_start_slides.py: four tiny synthetic slides, one epoch,
the plain arm and a remedy arm, then one more seed added to the same table."""

from __future__ import annotations

import csv

from scripts import cold_start_slides
from tests.scripts.helpers import markdown_tables, number


def _rows(out):
    with (out / "cold_start_slides.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_cold_start_slides_trains_each_arm_and_keeps_earlier_rows(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--n", "4", "--size", "128", "--epochs", "1"]
    argv += ["--n-patches", "2", "--synth-workers", "1"]
    assert cold_start_slides.main([*argv, "--seeds", "0", "--arms", "plain", "init-tissue"]) == 0
    (table,) = markdown_tables(capsys.readouterr().out)
    assert [r["arm"] for r in table] == ["plain", "init-tissue"]
    for row in table:
        assert row["seeds reaching 95%"] in ("0/1", "1/1")
        assert 0 <= number(row["final val accuracy"]) <= 1 and number(row["s/epoch"]) > 0
    assert (tmp_path / "plain" / "seed_0" / "metrics.csv").is_file()
    # A second run adds a seed: the rows of the arms and seeds not rerun are kept.
    assert cold_start_slides.main([*argv, "--seeds", "1", "--arms", "plain"]) == 0
    (table,) = markdown_tables(capsys.readouterr().out)
    assert [(r["arm"], r["seeds reaching 95%"][-1]) for r in table] == [("plain", "2")]
    rows = _rows(tmp_path)
    assert sorted((r["arm"], r["seed"]) for r in rows) == [
        ("init-tissue", "0"),
        ("plain", "0"),
        ("plain", "1"),
    ]
    assert all(len(r["val_accuracy_by_epoch"].split()) == 1 for r in rows)

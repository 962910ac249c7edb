"""Smoke test of scripts/soak_predict.py: six tiny slides through ``predict`` in one
process and on a real one-worker ``LocalCluster`` on 127.0.0.1 (in the script's own
process: it measures RSS and starts Dask)."""

from __future__ import annotations

import pytest

from scripts import soak_predict
from tests.scripts.helpers import finite, markdown_tables, number, run_script


def test_soak_predict_writes_every_row_once_and_reports_rss_and_times(tmp_path):
    out = run_script(
        "scripts/soak_predict.py",
        *("--slides", "6", "--size", "128", "--checkpoints", "2", "4"),
        *("--window", "2", "--warm-up", "1", "--workers", "1", "--cache", str(tmp_path)),
        timeout=180,
    )
    table = markdown_tables(out)[-1]  # each row is printed as it comes, then the table
    assert [r["run"] for r in table] == ["one process", "--workers 1"]
    for row in table:
        assert row["rows"] == "6 exactly once: ok"
        for column in ("RSS @2", "RSS @4", "RSS @N", "growth 2->N", "change"):
            assert finite(row[column]), (column, row)
        assert number(row["s/slide, 2-3"]) > 0 and number(row["s/slide, last 2"]) > 0
    assert "(worker " in table[1]["RSS @N"] and "(worker " not in table[0]["RSS @N"]
    assert len(list(tmp_path.glob("out-*/predictions.csv"))) == 2
    assert "load average (1 min):" in out


def test_soak_predict_refuses_too_few_slides_for_its_windows():
    with pytest.raises(SystemExit) as raised:
        soak_predict.main(["--slides", "5", "--window", "2", "--warm-up", "1"])
    assert raised.value.code == 2

"""Smoke test of scripts/bench_train.py: four hard-linked tiny slides, a small CNN and the
simulated accelerator, the serial and the streaming loop."""

from __future__ import annotations

import ast

from scripts import bench_train
from tests.scripts.helpers import finite, markdown_tables


def test_bench_train_compares_serial_streaming_and_bound(tmp_path, capsys):
    argv = ["--cache", str(tmp_path), "--slides", "4", "--distinct", "1", "--side", "1024"]
    argv += ["--patches", "2", "--patch", "32", "--batch", "2", "--depth", "2", "--latency", "1"]
    assert bench_train.main([*argv, "--busy"]) == 0
    out = capsys.readouterr().out
    assert "one other CPU-bound process running" in out
    links = sorted((tmp_path / "slides_1024").iterdir())
    assert len(links) == 4 and len({p.stat().st_ino for p in links}) == 1  # one file on disk
    (table,) = markdown_tables(out)
    assert [r["network"] for r in table] == ["simulated accelerator", "CPU (small CNN)"]
    numeric = ("serial slides/s", "streaming slides/s", "speed-up", "bound slides/s")
    numeric += ("streaming / bound", "read s/slide", "compute s/slide")
    for row in table:
        assert all(finite(row[column]) for column in numeric), row
        # Peak RSS after 50 % and 100 % of the slides of the streaming epoch.
        rss = ast.literal_eval(row["peak RSS MB at slides"])
        assert sorted(rss) == [2, 4] and all(v > 0 for v in rss.values())
    accelerator, cpu = table
    assert finite(accelerator["busy streaming"]) and cpu["busy streaming"] == "-"
    assert "load average (1 min):" in out

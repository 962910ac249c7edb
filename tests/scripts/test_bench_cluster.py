"""Smoke test of scripts/bench_cluster.py: two tiny slides, locally and on a real
one-worker ``LocalCluster`` on 127.0.0.1 (started and closed by the script, in its own
process)."""

from __future__ import annotations

import re

from tests.scripts.helpers import finite, markdown_tables, number, run_script


def test_bench_cluster_times_local_and_cluster_runs(tmp_path):
    out = run_script(
        "scripts/bench_cluster.py",
        *("--cache", str(tmp_path), "--slides", "2", "--size", "256", "--patches", "2"),
        *("--repeats", "1", "--workers", "1"),
        timeout=180,
    )
    (table,) = markdown_tables(out)
    names = [r["run"] for r in table]
    assert names[0] == "local, 1 thread (predict_slide loop)"
    assert re.fullmatch(r"local, \d+ threads \(predict\(\)\)", names[1])
    assert names[2:] == ["cluster, 1 worker(s)"]
    for row in table:
        assert finite(row["slides/s"]) and number(row["slides/s"]) > 0
        assert finite(row["CPU ms/slide"])
    # The cluster's slide tasks computed for part of the wall time (one worker: <= 1).
    assert 0 < number(table[2]["workers busy"]) <= 1.0
    assert finite(re.search(r"1 worker\(s\) / local on 1 thread: (\S+)x", out).group(1))
    assert re.search(r"Dask overhead per slide, 1 worker vs local on 1 thread: [-+]\d+ ms", out)
    assert "load average (1 min):" in out
    # The slides were generated once into the cache; outputs went to temporary directories.
    assert len(list((tmp_path / "slides-2x256").glob("*.tiff"))) == 2

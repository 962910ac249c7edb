"""Smoke test of scripts/bench_readers.py: a tiny pyramid, one repeat, and the write check."""

from __future__ import annotations

import importlib.util

from scripts import bench_readers
from tests.scripts.helpers import finite, markdown_tables, number

PEERS = [m for m in ("fastslide", "tiffslide") if importlib.util.find_spec(m) is not None]
METHODS = 6 + len(PEERS)  # the peers join when installed


def test_bench_readers_times_every_method_for_every_n(tmp_path, capsys):
    slide = tmp_path / "bench.tif"
    argv = ["--slide", str(slide), "--size", "768", "--n", "2", "5", "--repeats", "1"]
    assert bench_readers.main(argv) == 0
    out = capsys.readouterr().out
    assert slide.is_file()  # generated on first use, kept for the next run
    tables = markdown_tables(out)
    assert len(tables) == 2  # one per N
    for table in tables:
        assert len(table) == METHODS
        assert table[0]["method"] == "read_patches, tifffile backend"
        assert number(table[0]["ratio to read_patches (tifffile)"]) == 1.0
        assert all(finite(r["median ms"]) and number(r["median ms"]) > 0 for r in table)
    assert out.count("(target <= 1.1)") == 2 and out.count("(target >= 2)") == 2
    for peer in PEERS:
        assert f"{peer} read_region loop: pixels differ from libjpeg's" in out
    assert "load average (1 min):" in out


def test_bench_readers_write_check_reports_and_removes_its_pyramid(tmp_path, capsys):
    argv = ["--slide", str(tmp_path / "unused.tif"), "--write-check", "600"]
    assert bench_readers.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote 600 x 600 (") and "peak RSS" in out
    assert list(tmp_path.iterdir()) == []

"""Smoke test of scripts/bench_e2e.py: two tiny generated pyramids, one repeat, each
measurement in its own child process as in a full run."""

from __future__ import annotations

import math
import re

from scripts import bench_e2e


def test_bench_e2e_compares_ats_with_full_tiling(tmp_path, capsys):
    argv = ["--cache", str(tmp_path), "--big", "2048", "--small", "1024", "--tiles", "3"]
    assert bench_e2e.main([*argv, "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} == {"mosaic-1024.tiff", "mosaic-2048.tiff"}
    tissue = int(re.search(r"(\d+) tissue tiles of 256\^2", out).group(1))
    assert 0 < tissue < (2048 // 256) ** 2  # the mosaic is part tissue, part glass
    assert "extrapolated from 3 random tissue tiles" in out
    values = {
        name: float(re.search(pattern, out).group(1))
        for name, pattern in {
            "ats": r"ATS per slide:\s+([\d.]+) s",
            "speed-up": r"speed-up:\s+([\d.]+)x",
            "read": r"bytes read by ATS:\s+([\d.]+) MB",
            "rss ratio": r"ratio ([\d.]+) \(target <= 1.3\)",
        }.items()
    }
    assert all(math.isfinite(v) for v in values.values()), values
    # Printed as a whole number: a tiny slide's full tiling may round to 0x.
    assert values["ats"] > 0 and values["read"] > 0 and values["speed-up"] >= 0
    assert "load average (1 min):" in out


def test_bench_e2e_make_only_writes_the_slides_once(tmp_path, capsys):
    argv = ["--cache", str(tmp_path), "--big", "512", "--small", "256", "--make-only"]
    assert bench_e2e.main(argv) == 0
    assert capsys.readouterr().out.count("wrote") == 2
    assert bench_e2e.main(argv) == 0  # cached: nothing written again
    assert capsys.readouterr().out == ""

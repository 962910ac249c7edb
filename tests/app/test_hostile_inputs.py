"""Hostile inputs that must neither hang nor mislead: FIFOs and directories named like
slides, file names that a spreadsheet reads as formulas or that carry terminal escape
sequences, and SIGTERM in the middle of a batch (real processes, real files)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pipeline.app import files
from pipeline.app.cli import main
from pipeline.app.files import neutralise, printable, restore
from pipeline.app.slide.inputs import list_inputs
from tests.app.commands import predict_argv, train_argv

CLI = [sys.executable, "-c", "import sys; from pipeline.app.cli import main; sys.exit(main())"]


def predict_args(model, slides, out) -> list[str]:
    """``-q predict`` of ``slides`` (one path) into ``out``."""
    return ["-q", *predict_argv(model, slides, out)]


def test_a_fifo_named_like_a_slide_is_an_error_row_without_blocking(run_dir, dataset, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(dataset / "slide_001.tiff", slides / "real.tiff")
    os.mkfifo(slides / "slide.tif")  # opening it for reading would block forever
    out = tmp_path / "out"
    done = subprocess.run(
        [*CLI, *predict_args(run_dir, slides, out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    rows = {r["slide"]: r for r in files.read_csv(out / "predictions.csv")}
    assert rows["real"]["status"] == "ok"
    assert (
        rows["slide"]["status"] == "error"
        and "not a regular file (a FIFO)" in rows["slide"]["error"]
    )
    info = subprocess.run(
        [*CLI, "info", str(slides / "slide.tif")], capture_output=True, text=True, timeout=120
    )
    assert "not a regular file (a FIFO)" in info.stdout + info.stderr


def test_a_directory_with_a_slide_suffix_gets_a_row(tmp_path):
    (tmp_path / "x.svs").mkdir()
    (inp,) = list_inputs([tmp_path])
    assert inp.name == "x" and inp.error.startswith("IsADirectoryError")


def test_formula_cells_are_neutralised_and_read_back(tmp_path):
    for cell in ("=1+1", "@SUM(A1)", "+cmd", "-x", "\tx"):
        assert neutralise(cell) == "'" + cell and restore(neutralise(cell)) == cell
    for cell in ("-0.25", "+3", "1e-5", "slide_001", ""):
        assert neutralise(cell) == cell
    files.write_csv(tmp_path / "t.csv", ["slide", "value"], [{"slide": "=1+1", "value": -0.5}])
    assert (tmp_path / "t.csv").read_text().splitlines()[1] == "'=1+1,-0.5"
    assert files.read_csv(tmp_path / "t.csv") == [{"slide": "=1+1", "value": "-0.5"}]


def test_a_slide_named_like_a_formula_is_text_in_predictions_and_evaluates(
    run_dir, dataset, tmp_path
):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(dataset / "slide_001.tiff", slides / "=1+1.tiff")
    (tmp_path / "labels.csv").write_text("slide,label\n=1+1.tiff,positive\n")
    out = tmp_path / "out"
    assert main(predict_args(run_dir, slides, out)) == 0
    line = (out / "predictions.csv").read_text().splitlines()[1]
    assert line.startswith("'=1+1,")
    ev = ["evaluate", "--predictions", str(out), "--labels", str(tmp_path / "labels.csv")]
    assert main([*ev, "--out", str(tmp_path / "metrics"), "--bootstrap", "5"]) == 0


def test_terminal_output_escapes_control_characters(tmp_path, capsys):
    assert printable("a\x1b[2Jb\nc") == "a\\x1b[2Jb\\nc"
    missing = tmp_path / "evil\x1b[2J\nname.csv"
    ev = ["evaluate", "--predictions", str(missing), "--labels", str(missing)]
    assert main([*ev, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\\x1b[2J\\n" in err and err.count("\n") == 1


def test_sigterm_leaves_predictions_up_to_date_and_exits_143(run_dir, dataset, tmp_path):
    out = tmp_path / "out"
    slides = [str(dataset / f"slide_{i:03d}.tiff") for i in range(8)] * 1
    process = subprocess.Popen(
        [*CLI, "-q", "predict", "--model", str(run_dir), "--slides", *slides, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    journal = out / "journal.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if journal.is_file() and journal.read_bytes().count(b"\n") >= 1:
            break
        time.sleep(0.05)
    if process.poll() is not None:
        pytest.skip("the batch finished before SIGTERM could be sent")  # a very fast machine
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143 and "terminated" in err
    done = journal.read_bytes().count(b"\n")
    rows = files.read_csv(out / "predictions.csv")
    assert len(rows) == done >= 1 and all(r["status"] == "ok" for r in rows)


def test_a_model_directory_naming_code_is_refused_without_importing_it(run_dir, tmp_path):
    hostile = tmp_path / "model"
    shutil.copytree(run_dir, hostile)
    config = (hostile / "config.json").read_text()
    (hostile / "config.json").write_text(
        config.replace('"feature_net": "small"', '"feature_net": "evil_factory:make"')
    )
    marker = tmp_path / "imported"
    (hostile / "evil_factory.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    slide = tmp_path / "none.tiff"
    done = subprocess.run(  # run from the model directory: it is first on sys.path
        [*CLI, "predict", "--model", ".", "--slides", str(slide), "--out", str(tmp_path / "o")],
        cwd=hostile,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and not marker.exists()
    assert "would import and call code" in done.stderr and "--trust-feature-net" in done.stderr
    assert done.stderr.count("\n") == 1


def test_a_field_over_the_csv_limit_is_one_line_naming_the_file(tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\na.tiff," + "x" * 50_000_000 + "\n")
    assert main(["-q", *train_argv(tmp_path, labels, tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "labels.csv near line 2: malformed CSV" in err


def test_absurd_sizes_in_a_model_directory_are_refused(run_dir, tmp_path, capsys):
    hostile = tmp_path / "model"
    shutil.copytree(run_dir, hostile)
    config = (hostile / "config.json").read_text()
    (hostile / "config.json").write_text(config.replace('"width": 8', '"width": 1000000'))
    assert main(predict_argv(hostile, tmp_path, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert "config.json: width: expected at most 1024, got 1000000" in err


def test_a_full_disk_is_one_line_and_the_journal_stays_whole(run_dir, dataset, tmp_path):
    out = tmp_path / "out"
    limit = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))\n"
        "from pipeline.app.cli import main\n"
        "sys.exit(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", limit, *predict_args(run_dir, dataset, out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "File too large writing" in done.stderr
    journal = out / "journal.jsonl"
    lines = journal.read_text().splitlines() if journal.is_file() else []
    assert all(line.endswith("}") for line in lines)  # whole lines only
    assert not list(out.rglob(".*.tmp"))  # no temporary file left behind


BOUNDED = (
    "import resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))\n"
    "resource.setrlimit(resource.RLIMIT_CPU, (300, 300))\n"
    "from pipeline.app.cli import main\n"
    "code = main()\n"
    "print('peak RSS KiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(code)\n"
)
"""A CLI process that the kernel stops past 8 GiB of address space (a 12 GB allocation
ends it, not the machine) or 300 s of CPU, and prints its peak RSS last."""
PEAK_RSS_BOUND = 2 << 30
"""What such a batch may take: ~1.0 GB for a real slide alone, ~1.3 GB with the
hostile slides (torch, the model and Dask included; docs/security.md)."""


def test_hostile_slides_are_error_rows_in_bounded_memory_and_time(run_dir, dataset, tmp_path):
    """Decoder bombs (12 GB declared), a 480 KB TIFF declaring 10^6 x 10^6 pixels
    without a pyramid, one declaring 150,000^2 (under the streaming bound: stopped by
    the time limit) and a FIFO, next to a real slide: each bad one is its error row
    naming the limit, the real one is predicted, the process stays within its resource
    limits and its peak RSS within ``PEAK_RSS_BOUND``."""
    from readers.testing import write_decoder_bomb, write_sparse_tiff

    slides = tmp_path / "slides"
    slides.mkdir()
    write_decoder_bomb(slides / "bomb_jpeg.tiff", "jpeg")
    write_decoder_bomb(slides / "bomb_j2k.tiff", "jpeg2000")
    write_sparse_tiff(slides / "huge.tiff")
    write_sparse_tiff(slides / "slow.tiff", 150_000)
    os.mkfifo(slides / "fifo.tif")
    shutil.copy(dataset / "slide_001.tiff", slides / "real.tiff")
    out = tmp_path / "out"
    argv = [*predict_args(run_dir, slides, out), "--no-report", "--slide-time-limit", "2"]
    done = subprocess.run(
        [sys.executable, "-c", BOUNDED, *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 1, done.stderr
    assert int(done.stderr.split()[-1]) * 1024 < PEAK_RSS_BOUND
    rows = {r["slide"]: r for r in files.read_csv(out / "predictions.csv")}
    real = rows.pop("real")
    assert real["status"] == "ok", real
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(
        ["bomb_jpeg", "bomb_j2k", "huge", "slow", "fifo"], "error"
    )
    assert "JPEG image of 65500x65500 pixels in a 256x256 tile" in rows["bomb_jpeg"]["error"]
    assert "JPEG2000 image of 65500x65500" in rows["bomb_j2k"]["error"]
    assert "more than the limit of 40000000000 pixels" in rows["huge"]["error"]
    assert "took more than the time limit of 2 s" in rows["slow"]["error"]
    assert "not a regular file (a FIFO)" in rows["fifo"]["error"]

"""The ``ats-wsi`` command: entry point, subcommands, exit codes, error messages."""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess

import pytest
from PIL import Image

from pipeline.app import files
from pipeline.app.cli import build_parser, main
from pipeline.app.results import outputs
from tests.app.commands import predict_argv, train_argv

SMALL = ["--n-patches", "4", "--patch-size", "32", "--low-res-max-side", "128"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Through the installed console script, as a user runs it."""
    exe = shutil.which("ats-wsi") or pytest.fail("ats-wsi is not installed (pip install -e .)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("info", "synth", "train", "predict", "demo"):
        assert command in out.stdout


# The shortest command line of each command that parses (parsed here, never run).
MINIMAL_ARGV = {
    "info": ["slide.svs"],
    "synth": ["data"],
    "train": ["--slides", "data", "--labels", "labels.csv", "--out", "run"],
    "evaluate": ["--predictions", "predictions.csv", "--labels", "labels.csv", "--out", "m"],
    "predict": ["--model", "run", "--slides", "data", "--out", "out"],
    "report": ["out"],
    "demo": [],
}


def test_minimal_argv_covers_every_command():
    parser = build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(MINIMAL_ARGV) == set(commands.choices)


@pytest.mark.parametrize("flag", ["--quiet", "-q"])
@pytest.mark.parametrize("command", sorted(MINIMAL_ARGV))
def test_quiet_before_or_after_the_command(command, flag):
    parse = build_parser().parse_args
    argv = [command, *MINIMAL_ARGV[command]]
    assert parse(argv).quiet is False
    assert parse([*argv, flag]).quiet is True
    assert parse([flag, *argv]).quiet is True  # not reset by the command's own default
    assert parse([flag, *argv, flag]).quiet is True


def test_quiet_silences_every_command(dataset, run_dir, tmp_path, capsys):
    """No bar, no epoch line, no summary: nothing on stdout or stderr."""
    labels = str(dataset / "labels.csv")
    runs = [
        ["synth", str(tmp_path / "d"), "--n", "2", "--size", "256"],
        [*train_argv(dataset, labels, tmp_path / "r", "--epochs", "1"), *SMALL],
        [*predict_argv(run_dir, dataset / "slide_000.tiff", tmp_path / "p")],
        ["evaluate", "--predictions", str(tmp_path / "p" / "predictions.csv")]
        + ["--labels", labels, "--out", str(tmp_path / "m"), "--bootstrap", "10"],
        ["report", str(tmp_path / "p")],
    ]
    for argv in runs:
        assert main([*argv, "-q"]) == 0, argv
        assert capsys.readouterr() == ("", ""), argv


@pytest.mark.parametrize(
    ("given", "expected"), [([], 900.0), (["5"], 5.0), (["none"], None), (["NONE"], None)]
)
def test_slide_time_limit_option(given, expected):
    argv = ["predict", *MINIMAL_ARGV["predict"]]
    argv += ["--slide-time-limit", *given] if given else []
    args = build_parser().parse_args(argv)
    from pipeline.app.config import InputConfig

    limit = vars(args).get("slide_time_limit", InputConfig.slide_time_limit)
    assert limit == expected


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "soon"])
def test_slide_time_limit_must_be_positive_seconds(bad, capsys):
    argv = ["predict", *MINIMAL_ARGV["predict"], "--slide-time-limit", bad]
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert "expected seconds > 0 or 'none'" in capsys.readouterr().err


def test_info_text_and_json(dataset):
    slide = str(dataset / "slide_000.tiff")
    out = run_cli("info", slide, "--json")
    assert out.returncode == 0, out.stderr
    (info,) = json.loads(out.stdout)
    assert info["shape"] == [1024, 1024, 3] and info["mpp"] == [0.5, 0.5]
    assert [lv["downsample"] for lv in info["levels"]] == [1.0, 2.0, 4.0]
    assert main(["info", slide]) == 0


def test_user_errors_exit_2_without_traceback(dataset, run_dir, tmp_path, capsys):
    (tmp_path / "fake.svs").write_text("hello\n")
    with socket.socket() as s:  # a loopback port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        unreachable = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    cases = [
        (["info", str(tmp_path / "missing.svs")], "missing.svs"),
        (["info", str(tmp_path / "fake.svs")], "fake.svs"),
        (
            train_argv(dataset, tmp_path / "nope.csv", tmp_path / "run"),
            "nope.csv",
        ),
        (
            predict_argv(tmp_path / "norun", dataset, tmp_path / "o"),
            "norun",
        ),
        (
            predict_argv(run_dir, dataset, tmp_path / "o", "--scheduler", unreachable),
            unreachable,
        ),
    ]
    for argv, name in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("ats-wsi: error: ") and name in err and "Traceback" not in err


def test_bad_option_values_are_usage_errors(dataset, tmp_path, capsys):
    argv = train_argv(dataset, dataset / "labels.csv", tmp_path / "run", "--n-patches", "0")
    assert main(argv) == 2
    assert "n_patches: expected > 0, got 0" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback(dataset, monkeypatch):
    # Injected fault: a ValueError from inside the library (not a UserError) is a bug,
    # so main() lets it through rather than printing it as a user's mistake.
    def broken(path):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr("pipeline.app.slide.metadata.slide_info", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["info", str(dataset / "slide_000.tiff")])


def test_help_states_the_config_defaults():
    from pipeline.app.config import ModelConfig, TrainConfig

    out = run_cli("train", "--help").stdout
    assert f"(default {TrainConfig().epochs})" in out
    assert f"(default {ModelConfig(class_names=('a', 'b')).n_patches})" in out


def test_synth_train_predict(tmp_path, capsys):
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "out"
    assert main(["synth", str(data), "--n", "4", "--size", "512", "--seed", "1"]) == 0
    assert len(files.read_csv(data / "labels.csv")) == 4
    argv = [
        "train",
        "--slides",
        str(data),
        "--labels",
        str(data / "labels.csv"),
        "--out",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--val-fraction",
        "0",
    ]
    # The model averages its draws with the "linear" estimator, kept through prediction.
    assert main([*argv, *SMALL, "--estimator", "linear"]) == 0
    assert (run / "model.safetensors").is_file()
    assert json.loads((run / "config.json").read_text())["model"]["estimator"] == "linear"
    (data / "broken.svs").write_text("not a slide\n")
    result = run_cli("predict", "--model", str(run), "--slides", str(data), "--out", str(out))
    assert result.returncode == 1  # one slide failed, after the others were done
    assert "broken.svs" in result.stderr and "Traceback" not in result.stderr
    rows = {r["slide"]: r["status"] for r in files.read_csv(out / outputs.PREDICTIONS)}
    assert rows == {"broken": "error", **{f"slide_{i:03d}": "ok" for i in range(4)}}
    page = (out / "report.html").read_text()  # written at the end of the run
    assert page.count('<section class="panel"') == 5 and "not a slide format" in page
    (out / "report.html").unlink()
    (data / "broken.svs").unlink()
    capsys.readouterr()
    assert main(["predict", "--model", str(run), "--slides", str(data), "--out", str(out)]) == 0
    assert "4 already done" in capsys.readouterr().out
    assert (out / "report.html").is_file()  # rebuilt on resume, though nothing was new

    # The same prediction on a local Dask cluster of two worker processes.
    on_cluster = tmp_path / "on_cluster"
    argv = ["predict", "--model", str(run), "--slides", str(data), "--out", str(on_cluster)]
    assert main([*argv, "--workers", "2", "--no-report", "--heatmap-size", "300"]) == 0
    assert not (on_cluster / "report.html").exists()
    assert Image.open(outputs.thumbnail_path(on_cluster, "slide_000")).size == (300, 300)
    local = [r for r in files.read_csv(out / outputs.PREDICTIONS) if r["status"] == "ok"]
    remote = files.read_csv(on_cluster / outputs.PREDICTIONS)
    assert [(r["slide"], r["label"]) for r in remote] == [(r["slide"], r["label"]) for r in local]
    for a, b in zip(local, remote, strict=True):
        probs = [k for k in a if k.startswith("prob_")]
        assert [float(a[k]) for k in probs] == pytest.approx([float(b[k]) for k in probs], abs=1e-5)

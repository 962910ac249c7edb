"""The batch product (issue 12): outputs bound to their model, one writer per output
directory, an append-only journal, inputs that never crash a batch, exit codes.

Each test of the issue's first list is named after its bullet. Processes are real
(``python -m pipeline.app.cli``); permission-denied cases run the command without the
capabilities that let root ignore file modes (``setpriv``), so they test the real OS.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.app import files
from pipeline.app.cli import main
from pipeline.app.config import InputConfig, ModelConfig, PredictConfig
from pipeline.app.errors import UserError
from pipeline.app.model.checkpoint import MODEL_FILE
from pipeline.app.model.networks import SlideClassifier
from pipeline.app.prediction.batch import predict
from pipeline.app.prediction.dirlock import LOCK_FILE, DirectoryLock
from pipeline.app.prediction.journal import JOURNAL_FILE, MANIFEST_FILE, Journal
from pipeline.app.progress import PlainProgress
from pipeline.app.results import outputs
from pipeline.app.slide.inputs import list_inputs
from tests.app.commands import predict_argv, train_argv

ROOT = Path(__file__).resolve().parents[2]

# Root ignores file modes through these two capabilities; without them it is refused
# like anyone else.
UNPRIVILEGED = (
    ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []
)


def cli(*args: str, unprivileged: bool = False, wait: bool = True):
    """``ats-wsi ARGS`` in a new process running this tree's code."""
    if unprivileged and UNPRIVILEGED and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes cannot be tested")
    argv = [*(UNPRIVILEGED if unprivileged else []), sys.executable, "-m", "pipeline.app.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if not wait:
        return subprocess.Popen(
            [*argv, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run([*argv, *args], env=env, capture_output=True, text=True, timeout=300)


def rows_of(out: Path) -> list[dict[str, str]]:
    return files.read_csv(out / outputs.PREDICTIONS)


@pytest.fixture(scope="module")
def many_slides(dataset, tmp_path_factory) -> Path:
    """24 slide files (copies of the 8 dataset slides under other names)."""
    out = tmp_path_factory.mktemp("many")
    for i in range(24):
        shutil.copy(dataset / f"slide_{i % 8:03d}.tiff", out / f"s{i:02d}.tiff")
    return out


def other_model(class_names=("a", "b", "c")) -> SlideClassifier:
    torch.manual_seed(1)
    config = ModelConfig(class_names=class_names, n_patches=4, low_res_max_side=128)
    return SlideClassifier(config).eval()


# -- Outputs bound to what made them ----------------------------------------------


def test_output_dir_of_another_model_is_refused_not_mixed(run_dir, dataset, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", "--model", str(run_dir), "--slides", str(dataset), "--out", str(out)]
    assert main(argv) == 0
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    weights = hashlib.sha256((run_dir / MODEL_FILE).read_bytes()).hexdigest()
    assert manifest["model"]["weights_sha256"] == weights
    assert manifest["predict"] == dataclasses.asdict(PredictConfig())  # every option binds
    first = (out / outputs.PREDICTIONS).read_text()

    with pytest.raises(UserError, match="weights_sha256.*--overwrite"):
        predict(other_model(), [dataset], out, progress=False)
    assert (out / outputs.PREDICTIONS).read_text() == first  # nothing touched
    capsys.readouterr()
    assert main([*argv, "--seed", "1"]) == 2  # another seed: another manifest
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "predict.seed: 0 -> 1" in err

    summary = predict(
        other_model(), [dataset / "slide_000.tiff"], out, overwrite=True, progress=False
    )
    assert not summary.failed
    rows = rows_of(out)
    assert [r["slide"] for r in rows] == ["slide_000"]  # the first model's rows are gone
    assert list(rows[0]) == outputs.prediction_columns(("prob_a", "prob_b", "prob_c"))
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["slide_000.png"]


def test_a_record_of_another_manifest_is_not_done(run_dir, dataset, tmp_path):
    out = tmp_path / "out"
    predict(run_dir, [dataset], out, progress=False)
    (out / MANIFEST_FILE).unlink()  # e.g. a directory written by an older ats-wsi
    with pytest.raises(UserError, match="without a manifest"):
        predict(run_dir, [dataset], out, progress=False)


# -- One writer per output directory ----------------------------------------------


def test_two_processes_into_one_out(run_dir, many_slides, tmp_path):
    out = tmp_path / "out"
    args = ["predict", "--model", str(run_dir), "--slides", str(many_slides), "--out", str(out)]
    first = cli(*args, wait=False)
    try:
        deadline = time.monotonic() + 120
        while (out / LOCK_FILE).is_file() is False or not (out / LOCK_FILE).read_text():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        # Frozen while it holds the lock, so that the second run surely meets it.
        os.kill(first.pid, signal.SIGSTOP)
        assert (out / LOCK_FILE).read_text().strip() == str(first.pid)
        second = cli(*args)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith("ats-wsi: error: ") and f"pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, stderr
    rows = rows_of(out)
    assert sorted(r["slide"] for r in rows) == [f"s{i:02d}" for i in range(24)]
    assert {r["status"] for r in rows} == {"ok"}


def test_stale_lock_of_a_dead_process_is_taken_over(run_dir, dataset, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_FILE).write_text(f"{dead.pid}\n")
    with DirectoryLock(tmp_path) as lock:
        assert lock.previous_pid == dead.pid
        assert (tmp_path / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError, match="already in use by this process"):
            DirectoryLock(tmp_path).acquire()
    summary = predict(run_dir, [dataset / "slide_000.tiff"], tmp_path, progress=False)
    assert not summary.failed


# -- Append-only journal, kill -9, umask ------------------------------------------


def test_kill_9_mid_run_then_rerun_gives_every_slide_once(run_dir, many_slides, tmp_path):
    out = tmp_path / "out"
    args = ["predict", "--model", str(run_dir), "--slides", str(many_slides), "--out", str(out)]
    victim = cli(*args, wait=False)
    deadline = time.monotonic() + 120
    journal = out / JOURNAL_FILE
    while not journal.is_file() or journal.read_bytes().count(b"\n") < 3:
        assert victim.poll() is None, victim.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.kill()  # SIGKILL: no cleanup at all
    victim.communicate()
    done_before = journal.read_bytes().count(b"\n")
    assert done_before < 24

    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert f"{done_before} already done" in again.stdout
    rows = rows_of(out)
    assert sorted(r["slide"] for r in rows) == [f"s{i:02d}" for i in range(24)]
    assert {r["status"] for r in rows} == {"ok"}


def test_torn_journal_line_is_cut_off(tmp_path):
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append({"slide": "a"})
    with open(path, "ab") as f:
        f.write(b'{"slide": "b", "ro')  # a kill in the middle of a write
    assert [r["slide"] for r in Journal(path).records()] == ["a"]
    with Journal(path) as journal:
        journal.append({"slide": "c"})
    assert [r["slide"] for r in Journal(path).records()] == ["a", "c"]
    assert path.read_bytes().count(b"\n") == 2


def test_csv_is_rebuilt_from_the_journal_not_per_slide(run_dir, dataset, tmp_path, monkeypatch):
    from pipeline.app.prediction import batch

    calls = []
    real = batch.write_csv

    def counting(*args, **kwargs):  # a spy: counts, then writes
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "write_csv", counting)
    start = time.monotonic()
    predict(run_dir, [dataset], tmp_path, progress=False)
    elapsed = time.monotonic() - start
    lines = (tmp_path / JOURNAL_FILE).read_bytes().count(b"\n")
    assert lines == 8 and len(rows_of(tmp_path)) == 8
    # once at the end, plus at most one per REBUILD_SECONDS of the run
    assert 1 <= len(calls) <= 1 + elapsed / batch.REBUILD_SECONDS


def test_files_follow_the_umask(dataset, tmp_path, small_model_config):
    from pipeline.app.training.loop import train

    old = os.umask(0o002)
    try:
        config = {"epochs": 1, "batch_size": 4, "val_fraction": 0.0}
        from pipeline.app.config import TrainConfig

        result = train(
            dataset,
            dataset / "labels.csv",
            tmp_path / "run",
            small_model_config,
            TrainConfig(**config),
            device="cpu",
            progress=False,
            log=lambda _: None,
        )
        predict(result.run_dir, [dataset / "slide_001.tiff"], tmp_path / "out", progress=False)
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {
        MODEL_FILE,
        "config.json",
        "optimizer.safetensors",
        JOURNAL_FILE,
        MANIFEST_FILE,
        LOCK_FILE,
        outputs.PREDICTIONS,
        "slide_001.png",
    }
    modes = {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {"0o664"}, modes


# -- Inputs -----------------------------------------------------------------------


def test_symlink_loops_and_missing_files_get_error_rows(run_dir, dataset, tmp_path):
    slides = tmp_path / "slides"
    (slides / "sub").mkdir(parents=True)
    shutil.copy(dataset / "slide_000.tiff", slides / "good.tiff")
    (slides / "loop.svs").symlink_to("loop.svs")
    (slides / "sub" / "up").symlink_to("..")  # a directory cycle, met with --recursive
    shutil.copy(dataset / "slide_001.tiff", slides / "sub" / "deep.tiff")
    missing = tmp_path / "gone.svs"
    summary = predict(
        run_dir,
        [slides, missing],
        tmp_path / "out",
        inputs=InputConfig(recursive=True),
        progress=False,
    )
    rows = {r["slide"]: r for r in rows_of(tmp_path / "out")}
    assert sorted(rows) == ["deep", "gone", "good", "loop", "up"]
    assert rows["good"]["status"] == rows["deep"]["status"] == "ok"
    assert "Too many levels of symbolic links" in rows["loop"]["error"]
    assert "symbolic link loop" in rows["up"]["error"]
    assert rows["gone"]["error"] == f"FileNotFoundError: {missing}: No such file or directory"
    assert len(summary.failed) == 3


def test_same_file_names_in_different_folders_get_distinct_names(run_dir, dataset, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(dataset / "slide_000.tiff", tmp_path / folder / "x.tiff")
    inputs = list_inputs([tmp_path / "a", tmp_path / "b"])
    names = [i.name for i in inputs]
    assert len(set(names)) == 2 and all(n.startswith("x-") for n in names)
    assert list_inputs([tmp_path / "b", tmp_path / "a"])[0].name == names[1]  # stable
    predict(run_dir, [tmp_path / "a", tmp_path / "b"], tmp_path / "out", progress=False)
    assert sorted(r["slide"] for r in rows_of(tmp_path / "out")) == sorted(names)


def test_slides_csv_ids_and_unsafe_ids(run_dir, dataset, tmp_path):
    out = tmp_path / "out"
    d = dataset
    lines = [
        "path;slide",
        f"{d / 'slide_000.tiff'};first",
        "slides/../x.tiff;../escape",
        f"{d / 'slide_001.tiff'};",
        f"{d / 'slide_002.tiff'};NUL",
        f"{d / 'slide_003.tiff'};a\tb",
        f"{d / 'slide_004.tiff'};sub/dir",
    ]
    (tmp_path / "slides.csv").write_text("\n".join(lines) + "\n")  # ';' as a spreadsheet saves
    before = set(tmp_path.parent.iterdir())
    summary = predict(
        run_dir, [], out, inputs=InputConfig(slides_csv=tmp_path / "slides.csv"), progress=False
    )
    rows = {r["slide"]: r for r in rows_of(out)}
    assert rows["first"]["status"] == rows["slide_001"]["status"] == "ok"
    for bad in ("../escape", "NUL", "a\tb", "sub/dir"):
        assert rows[bad]["status"] == "error" and "cannot name output files" in rows[bad]["error"]
    assert len(summary.failed) == 4
    assert set(tmp_path.parent.iterdir()) == before  # nothing landed outside
    assert {p.name for p in (out / "heatmaps").iterdir()} == {"first.png", "slide_001.png"}


def test_a_slides_csv_without_a_path_column_is_a_user_error(run_dir, tmp_path, capsys):
    (tmp_path / "slides.csv").write_text("file;slide\na.svs;a\n")
    out = tmp_path / "out"
    argv = [
        "predict",
        "--model",
        str(run_dir),
        "--slides-csv",
        str(tmp_path / "slides.csv"),
        "--out",
        str(out),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "expected columns ['path'], found ['file', 'slide']" in err and "';'" in err
    assert not out.exists()  # checked before anything was written


def test_unreadable_files_and_directories_give_the_os_reason(run_dir, dataset, tmp_path):
    base = tmp_path / "base"
    slides = base / "slides"
    (slides / "closed").mkdir(parents=True)
    shutil.copy(dataset / "slide_000.tiff", slides / "good.tiff")
    shutil.copy(dataset / "slide_001.tiff", slides / "secret.tiff")
    shutil.copy(dataset / "slide_002.tiff", slides / "closed" / "inside.tiff")
    (slides / "secret.tiff").chmod(0)
    (slides / "closed").chmod(0)
    try:
        result = cli(
            "predict",
            "--model",
            str(run_dir),
            "--slides",
            str(slides),
            "--recursive",
            "--out",
            str(base / "out"),
            unprivileged=True,
        )
    finally:
        (slides / "closed").chmod(0o755)
    assert result.returncode == 1, result.stderr
    rows = {r["slide"]: r for r in rows_of(base / "out")}
    assert rows["good"]["status"] == "ok"
    denied = "PermissionError: {}: Permission denied"
    assert rows["secret"]["error"] == denied.format(slides / "secret.tiff")
    assert rows["closed"]["error"] == denied.format(slides / "closed")


# -- Exit codes and messages ------------------------------------------------------


@pytest.mark.parametrize("case", ["read-only", "no-execute", "a-file", "device", "workers"])
def test_user_errors_are_one_line_exit_2_before_any_work(case, run_dir, dataset, tmp_path):
    out = tmp_path / "out"
    extra = []
    if case in ("read-only", "no-execute"):
        out.mkdir()
        out.chmod(0o555 if case == "read-only" else 0o666)
    elif case == "a-file":
        out.write_text("")
    elif case == "device":
        if torch.cuda.is_available():
            pytest.skip("this torch has CUDA")
        extra = ["--device", "cuda"]
    else:
        extra = ["--workers", "0"]
    result = cli(*predict_argv(run_dir, dataset, out, *extra), unprivileged=True)
    out.chmod(0o755) if out.is_dir() else None
    assert result.returncode == 2, result.stderr
    expected = {
        "read-only": "Permission denied",
        "no-execute": "Permission denied",
        "a-file": "is a file, not a directory",
        "device": "no usable CUDA",
        "workers": "argument --workers: expected an integer >= 1",
    }[case]
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr and expected in lines[-1]
    assert len(lines) == 1 or case == "workers"  # argparse shows the usage above its line
    assert not (out / outputs.PREDICTIONS).exists() if out.is_dir() else True


def test_train_out_naming_a_file_is_a_user_error(dataset, tmp_path, capsys):
    (tmp_path / "run").write_text("")
    assert main(train_argv(dataset, dataset / "labels.csv", tmp_path / "run")) == 2
    assert "run: is a file, not a directory" in capsys.readouterr().err


def test_a_missing_named_file_is_an_error_row_exit_1(run_dir, dataset, tmp_path):
    result = cli(
        "predict",
        "--model",
        str(run_dir),
        "--slides",
        str(dataset / "slide_000.tiff"),
        str(tmp_path / "nope.svs"),
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 1
    assert "nope.svs: No such file or directory" in result.stderr
    assert {r["slide"]: r["status"] for r in rows_of(tmp_path / "out")} == {
        "slide_000": "ok",
        "nope": "error",
    }
    # Not a terminal: plain progress lines, never a carriage return.
    assert "\r" not in result.stderr


def test_help_info_and_version_without_torch(dataset, tmp_path):
    (tmp_path / "broken.svs").write_text("not a slide")
    shutil.copy(dataset / "slide_000.tiff", tmp_path / "good.tiff")
    blocker = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from pipeline.app.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args):
        return subprocess.run(
            [sys.executable, "-c", blocker, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    helped = run("--help")
    assert helped.returncode == 0 and "predict" in helped.stdout, helped.stderr
    assert run("predict", "--help").returncode == 0
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("ats-wsi ")
    info = run("info", str(tmp_path), "--json")
    assert info.returncode == 2, info.stderr  # one file could not be read
    by_path = {Path(i["path"]).name: i for i in json.loads(info.stdout)}
    assert by_path["good.tiff"]["shape"] == [1024, 1024, 3]
    assert "broken.svs" in by_path["broken.svs"]["error"]
    assert "torch" not in info.stderr


def test_plain_progress_lines():
    import io

    stream = io.StringIO()
    with PlainProgress(3, "predict", "slide", stream, every=0.0) as bar:
        for _ in range(3):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("predict: 1/3 slides, ") and "left" in lines[0]
    assert lines[-1].startswith("predict: 3/3 slides, ") and "\r" not in stream.getvalue()


def test_quiet_prints_nothing_on_success(run_dir, dataset, tmp_path):
    result = cli(
        "--quiet",
        "predict",
        "--model",
        str(run_dir),
        "--slides",
        str(dataset / "slide_000.tiff"),
        "--out",
        str(tmp_path / "out"),
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""

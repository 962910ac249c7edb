"""The demo end to end at toy size (its accuracy claim is checked by running
``ats-wsi demo`` itself, see docs/usage.md; here: it runs and reports)."""

from pipeline.app import files
from pipeline.app.demo import run_demo
from pipeline.app.results import outputs


def test_demo_runs_and_reports(tmp_path):
    lines = []
    result = run_demo(
        tmp_path, n_train=6, n_test=2, size=512, epochs=1, progress=False, log=lines.append
    )
    assert 0 <= result.ats_accuracy <= 1 and 0 <= result.baseline_accuracy <= 1
    rows = files.read_csv(result.predictions_dir / outputs.PREDICTIONS)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert (result.run_dir / "model.safetensors").is_file()
    report = "\n".join(lines)
    assert "low-resolution baseline" in report and str(result.predictions_dir) in report

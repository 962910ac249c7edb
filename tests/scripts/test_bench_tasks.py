"""scripts/bench_tasks.py at tiny sizes: every task trains, predicts and is scored."""

from scripts import bench_tasks


def test_bench_tasks_tiny(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--seeds", "1", "--n-train", "8", "--n-test", "6"]
    argv += ["--size", "512", "--epochs", "1", "--n-patches", "4", "--low-res", "96"]
    assert bench_tasks.main(argv + ["--workers", "1"]) == 0
    out = capsys.readouterr().out
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert rows[0].startswith("task,seed,metric,ats,thumbnail")
    assert [r.split(",")[0] for r in rows[1:]] == list(bench_tasks.TASKS)
    for task, metric in zip(
        bench_tasks.TASKS, ("roc_auc", "mean_auc", "r2", "c_index"), strict=True
    ):
        assert f"{task}: {metric} ATS" in out
    assert "load average" in out

"""The task registry and the names the configuration and the command line offer."""

from pipeline.app.config import SELECT_METRICS, TASK_NAMES
from pipeline.app.tasks import TASKS


def test_the_command_line_offers_every_task_and_selection_metric():
    assert sorted(TASK_NAMES) == sorted(TASKS)
    offered = {m for task in TASKS.values() for m in task.select_metrics}
    assert offered == set(SELECT_METRICS)


def test_every_task_selects_by_metrics_it_computes():
    for task in TASKS.values():
        assert task.train_metric_names, task.name
        assert task.select_metrics, task.name

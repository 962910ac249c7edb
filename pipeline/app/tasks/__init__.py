"""Tasks: one object per kind of target, behind one interface (``base.Task``).

``task_of(config)`` builds the task a ``ModelConfig`` names; ``TASKS`` maps names
to task classes (add a task by adding a ``Task`` subclass and registering it here).
"""

from __future__ import annotations

from pipeline.app.config import ModelConfig
from pipeline.app.errors import ConfigError
from pipeline.app.tasks.base import TargetError, Task
from pipeline.app.tasks.classification import Classification
from pipeline.app.tasks.multilabel import Multilabel
from pipeline.app.tasks.regression import Regression
from pipeline.app.tasks.survival import Survival

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (Classification, Multilabel, Regression, Survival)
}

__all__ = [
    "TASKS",
    "Classification",
    "Multilabel",
    "Regression",
    "Survival",
    "TargetError",
    "Task",
    "task_class",
    "task_of",
]


def task_class(config: ModelConfig) -> type[Task]:
    """The class of ``config.task``; ``ConfigError`` for an unknown name."""
    if config.task not in TASKS:
        raise ConfigError(f"task: expected one of {sorted(TASKS)}, got {config.task!r}")
    return TASKS[config.task]


def task_of(config: ModelConfig) -> Task:
    """The task of ``config`` (``config.task``), built from its target fields.

    Raises:
        ConfigError: an unknown task, or targets the task cannot use.
    """
    return task_class(config).from_config(config)

"""The labelled slides of a run: label tables read and checked, targets parsed by the
model's task, each slide's attention view read once (through an on-disk cache when
given). Every problem is reported before training starts."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.app.config import ModelConfig
from pipeline.app.errors import UserError
from pipeline.app.slide.labels import LabelRow, LabelTable, read_labels
from pipeline.app.tasks import TargetError, Task
from pipeline.app.training.streaming import CachedView, ViewCache


@dataclass
class LabelledSlide:
    """A readable training slide with its attention view cached in memory.

    Attributes:
        path: the slide file; ``target``: as the task parses it (``Task.parse``;
            a class index for classification).
        thumbnail: uint8 [h, w, 3]; ``tissue``: bool [h, w].
        name / case: the slide's name and its case (``labels.LabelRow``).
    """

    path: Path
    target: Any
    thumbnail: np.ndarray
    tissue: np.ndarray
    name: str
    case: str

    @property
    def view(self) -> CachedView:
        return CachedView(self.thumbnail, self.tissue)


def load_slides(
    rows: Sequence[LabelRow],
    config: ModelConfig,
    task: Task,
    warn: Callable[[str], None],
    progress: bool,
    cache_dir: str | os.PathLike | None = None,
    source: str = "labels CSV",
) -> tuple[list[LabelledSlide], list[str]]:
    """Read every labelled slide's view (through the on-disk ``ViewCache`` in
    ``cache_dir`` when given, so the next run skips it). Every row's target is parsed
    first, so a malformed table (``UserError`` naming ``source`` and the line) stops
    before any slide is read. Unreadable or missing slides, and rows whose target the
    task refuses (``TargetError``, e.g. a label that is not one of the model's
    classes), are reported through ``warn``, in row order, and returned as messages,
    not raised."""
    from tqdm import tqdm

    targets: list = []
    for row in rows:
        try:
            targets.append(task.parse(row.values, f"{source} line {row.line}"))
        except TargetError as e:
            targets.append(e)
    views = ViewCache(cache_dir, config)
    slides, skipped = [], []
    for row, target in tqdm(
        list(zip(rows, targets, strict=True)),
        desc="reading slides",
        unit="slide",
        disable=not progress,
    ):
        if isinstance(target, TargetError):
            skipped.append(f"{row.path}: {target}")
            warn(f"skipping {skipped[-1]}")
            continue
        try:
            view = views.load(row.path)
            slides.append(
                LabelledSlide(row.path, target, view.thumbnail, view.tissue, row.name, row.case)
            )
        except Exception as e:  # every unreadable slide is reported and skipped
            skipped.append(f"{row.path}: {type(e).__name__}: {e}")
            warn(f"skipping {skipped[-1]}")
    return slides, skipped


@dataclass
class Labels:
    """The labels of a run: the training pool and the optional external validation
    table, read and checked, and the slides that could be read."""

    pool: LabelTable
    external: LabelTable | None
    slides: list[LabelledSlide]
    val_slides: list[LabelledSlide]
    skipped: list[str]
    notes: list[str]


def read_tables(
    labels: str | os.PathLike,
    slides: str | os.PathLike,
    val_labels: str | os.PathLike | None,
    val_slides: str | os.PathLike | None,
    targets: Sequence[str],
    empty_is_error: bool = False,
) -> tuple[LabelTable, LabelTable | None]:
    """The training pool and the external validation table (``None`` without
    ``val_labels``), their target cells in the columns ``targets``; ``UserError`` when
    a slide is in both (and for an empty cell with ``empty_is_error``)."""
    pool = read_labels(labels, slides, targets, empty_is_error)
    if val_labels is None:
        return pool, None
    val_dir = slides if val_slides is None else val_slides
    external = read_labels(val_labels, val_dir, targets, empty_is_error)
    both = sorted({r.name for r in pool.rows} & {r.name for r in external.rows})
    if both:
        raise UserError(
            f"{val_labels}: {len(both)} validation slides are also in {labels} (e.g. "
            f"{', '.join(both[:3])}): they would be trained on"
        )
    return pool, external


def load(
    pool: LabelTable,
    external: LabelTable | None,
    config: ModelConfig,
    task: Task,
    log: Callable[[str], None],
    progress: bool,
    cache_dir: str | os.PathLike | None = None,
) -> Labels:
    """Read the slides of both tables and report every label problem before training."""
    for message in pool.left_out + (external.left_out if external else []):
        log(f"skipping {message}")
    notes = pool.notes + (external.notes if external else [])
    for message in notes:
        log(message)
    skipped = pool.left_out + (external.left_out if external else [])
    loaded, unread = load_slides(
        pool.rows, config, task, log, progress, cache_dir, str(pool.source)
    )
    val_loaded, val_unread = [], []
    if external is not None:
        val_loaded, val_unread = load_slides(
            external.rows, config, task, log, progress, cache_dir, str(external.source)
        )
    target_notes = task.check([s.target for s in loaded], str(pool.source))
    for message in target_notes:
        log(message)
    return Labels(
        pool, external, loaded, val_loaded, skipped + unread + val_unread, notes + target_notes
    )

"""Train / validation splits and cross-validation folds, and the split file that
pins them to a run directory.

Folds are stratified by the task's strata (``Task.strata``: the class for
classification) and grouped by case, so every slide of a patient lands on the same
side. ``split.csv`` lists every labelled slide with its set; a resumed run reads it
back and refuses labels that changed since (they would leak validation slides into
training).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.app.errors import UserError
from pipeline.app.files import read_csv, write_csv
from pipeline.app.slide.labels import LabelTable
from pipeline.app.tasks import Task
from pipeline.app.training.data import LabelledSlide, Labels

SPLIT_FILE = "split.csv"
SPLIT_COLUMNS = ("slide", "label", "case", "set", "path")


def assign_folds(strata: Sequence, cases: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """Fold index (int [n], in ``0..n_folds-1``) of each slide: stratified by
    ``strata``, grouped by case (sklearn's ``StratifiedGroupKFold``, shuffled by
    ``seed``), so all slides of a case share a fold.

    Raises:
        UserError: fewer cases than folds, or every stratum smaller than that.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n_cases, largest = len(set(cases)), max(Counter(strata).values(), default=0)
    if n_folds > min(n_cases, largest):
        raise UserError(
            f"{n_folds} folds need at least {n_folds} cases and a class with {n_folds} slides; "
            f"found {n_cases} cases, at most {largest} slides per class"
        )
    folds = np.zeros(len(strata), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer members than folds"
        warnings.simplefilter("ignore", UserWarning)
        for k, (_, held_out) in enumerate(splitter.split(np.zeros(len(strata)), strata, cases)):
            folds[held_out] = k
    return folds


def slide_folds(slides: Sequence[LabelledSlide], task: Task, n_folds: int, seed: int) -> np.ndarray:
    """``assign_folds`` of labelled slides, stratified as ``task`` says."""
    strata = task.strata([s.target for s in slides])
    return assign_folds(strata.tolist(), [s.case for s in slides], n_folds, seed)


def split(
    slides: list[LabelledSlide], task: Task, fraction: float, seed: int
) -> tuple[list[LabelledSlide], list[LabelledSlide]]:
    """Train/validation split: one fold of ``round(1 / fraction)`` (``assign_folds``),
    so stratified and grouped by case; fewer folds (a larger share) when there are
    fewer cases, or slides per stratum, than that. No validation slides when
    ``fraction`` is 0 or there are fewer than two cases."""
    n_cases = len({s.case for s in slides})
    largest = max(Counter(task.strata([s.target for s in slides]).tolist()).values())
    if fraction == 0 or min(n_cases, largest) < 2:
        return list(slides), []
    n_folds = min(max(2, round(1 / fraction)), n_cases, largest)
    folds = slide_folds(slides, task, n_folds, seed)
    return (
        [s for s, k in zip(slides, folds, strict=True) if k != 0],
        [s for s, k in zip(slides, folds, strict=True) if k == 0],
    )


def write_split(out: Path, data: Labels, train_set, val_set) -> None:
    """``split.csv``: every usable label row with its set (``train``, ``val``, or
    ``unread`` for a slide that could not be read)."""
    sets = {s.name: "train" for s in train_set} | {s.name: "val" for s in val_set}
    rows = data.pool.rows + (data.external.rows if data.external else [])
    write_csv(
        out / SPLIT_FILE,
        SPLIT_COLUMNS,
        [
            {
                "slide": r.name,
                "label": r.label,
                "case": r.case,
                "set": sets.get(r.name, "unread"),
                "path": str(r.path),
            }
            for r in rows
        ],
    )


def saved_split(out: Path, pool: LabelTable, external: LabelTable | None) -> dict[str, str]:
    """The set (``train``, ``val`` or ``unread``) of each slide name in the split saved
    in ``out``; ``UserError`` when the labels differ from the ones it was made from
    (checked before any slide is read)."""
    saved = read_csv(out / SPLIT_FILE)
    if not saved:
        raise UserError(f"{out}: no {SPLIT_FILE} to resume from; train again with --resplit")
    before = {r["slide"]: (r["label"], r["case"]) for r in saved}
    keys = sorted(pool.key() + (external.key() if external else []))
    now = {name: (label, case) for name, label, case in keys}
    if before != now:
        raise UserError(
            f"{pool.source}: the labels changed since {out} was split "
            f"({_changes(before, now)}); resuming would train on validation slides. "
            "Use a new --out, or --resplit to split again and train from epoch 1"
        )
    return {r["slide"]: r["set"] for r in saved}


def apply_split(sets: dict[str, str], data: Labels) -> tuple[list, list]:
    """The training and validation slides of a saved split."""
    slides = data.slides + data.val_slides
    return (
        [s for s in slides if sets[s.name] == "train"],
        [s for s in slides if sets[s.name] == "val"],
    )


def _changes(before: dict, now: dict) -> str:
    def some(names) -> str:
        names = sorted(names)
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    added, removed = now.keys() - before.keys(), before.keys() - now.keys()
    changed = {n for n in now.keys() & before.keys() if now[n] != before[n]}
    parts = [
        f"{len(names)} slides {what}: {some(names)}"
        for what, names in (
            ("added", added),
            ("removed", removed),
            ("with a new label or case", changed),
        )
        if names
    ]
    return "; ".join(parts)

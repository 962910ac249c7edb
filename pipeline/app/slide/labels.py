"""The labels CSV: which slide has which target, and which patient (case) it comes from.

Columns: ``slide`` (a file name inside the slides directory, or a path; the file
extension may be left out), the target columns (``label``, the class name, unless the
task names others: ``tasks.Task.target_columns``) and, optionally, ``case`` (patient
or specimen: every slide of a case goes to the same side of a split). Extra columns
are ignored. The cells are read as text here; the task parses them.

Reading checks what a spreadsheet lets slip through and says so, row by row, instead
of training on it: rows whose target cells are all empty or whitespace, a slide
listed twice (once kept when the rows agree, left out when they conflict), a slide
named without its extension (resolved when exactly one file matches). Slides are identified by
``inputs.slide_name`` (file name without its suffix), the name ``predict`` writes
in ``predictions.csv``, so ``slide_003``, ``slide_003.tiff`` and ``dir/slide_003.tiff``
are the same slide.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.app.errors import UserError
from pipeline.app.files import read_table
from pipeline.app.slide.inputs import slide_name

DEFAULT_TARGETS = ("label",)


@dataclass(frozen=True)
class LabelRow:
    """One usable row of a labels CSV.

    Attributes:
        path: the slide file (inside the slides directory when given relative).
        name: ``slide_name(path)``, the key shared with ``predictions.csv``.
        label: the target cells, stripped of surrounding whitespace, joined by
            ``;`` (the class name for classification).
        values: the target cells one by one, in the order of the target columns.
        case: patient / case id; the slide's own name when the CSV has no ``case``
            column or the cell is empty (each slide is then its own case).
        line: line number in the CSV (the header is line 1).
    """

    path: Path
    name: str
    label: str
    case: str
    line: int
    values: tuple[str, ...] = ()


@dataclass
class LabelTable:
    """The usable rows of a labels CSV and what was wrong with the others.

    ``left_out``: one message per row dropped (empty label, conflicting duplicate,
    ambiguous name); ``notes``: corrections that kept the row (a duplicate that
    agrees, a name resolved to its file)."""

    source: Path
    rows: list[LabelRow]
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def classes(self) -> tuple[str, ...]:
        """The distinct labels, sorted."""
        return tuple(sorted({r.label for r in self.rows}))

    def key(self) -> list[tuple[str, str, str]]:
        """``(name, label, case)`` of every row, sorted: what a saved split depends on."""
        return sorted((r.name, r.label, r.case) for r in self.rows)


def read_labels(
    labels_csv: str | os.PathLike,
    slides_dir: str | os.PathLike | None = None,
    targets: Sequence[str] = DEFAULT_TARGETS,
    empty_is_error: bool = False,
) -> LabelTable:
    """Read and check a labels CSV.

    Args:
        labels_csv: the CSV (columns ``slide``, the ``targets``, optional ``case``).
        slides_dir: directory relative slide names are taken in; names without an
            extension are resolved there. ``None`` (e.g. for ``evaluate``, which
            matches slides by name only) leaves the names as they are.
        targets: the columns holding the target (``Task.target_columns``).
        empty_is_error: an empty target cell is a ``UserError`` naming the row
            (numeric targets) instead of the row being left out with a message.

    Raises:
        FileNotFoundError: no such CSV. UserError: the columns are missing; an empty
            target cell with ``empty_is_error``.
    """
    source = Path(labels_csv)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: labels CSV not found")
    targets = tuple(targets)
    records = read_table(source, required=("slide", *targets))
    table = LabelTable(source, [])
    by_name: dict[str, list[LabelRow]] = {}
    for line, record in enumerate(records, start=2):
        entry = (record["slide"] or "").strip()
        values = tuple((record[c] or "").strip() for c in targets)
        label = ";".join(values)
        if not entry:
            table.left_out.append(f"{source} line {line}: no slide name; row left out")
            continue
        if empty_is_error and not all(values):
            column = targets[values.index("")]
            raise UserError(f"{source} line {line}: {entry or 'row'}: no {column} given")
        if not any(values):
            empty = "empty label" if targets == DEFAULT_TARGETS else f"empty {', '.join(targets)}"
            table.left_out.append(f"{source} line {line}: {entry}: {empty}; row left out")
            continue
        path = _resolve(entry, slides_dir, table, f"{source} line {line}")
        if path is None:
            continue
        name = slide_name(path)
        case = (record.get("case") or "").strip() or name
        by_name.setdefault(name, []).append(LabelRow(path, name, label, case, line, values))

    for name, rows in by_name.items():
        lines = ", ".join(str(r.line) for r in rows)
        if len({(r.label, r.case) for r in rows}) > 1:
            given = "; ".join(f"line {r.line}: label {r.label!r}, case {r.case!r}" for r in rows)
            table.left_out.append(
                f"{source}: slide {name} listed on lines {lines} with conflicting labels "
                f"or cases ({given}); slide left out"
            )
            continue
        if len(rows) > 1:
            table.notes.append(
                f"{source}: slide {name} listed on lines {lines} with the same label; counted once"
            )
        table.rows.append(rows[0])
    return table


def _resolve(
    entry: str, slides_dir: str | os.PathLike | None, table: LabelTable, where: str
) -> Path | None:
    """The file ``entry`` names (in ``slides_dir`` when relative); a name without its
    extension is resolved to the one file whose slide name it is. ``None`` (and a
    message) when several files match."""
    path = Path(entry) if slides_dir is None else Path(slides_dir) / entry
    if slides_dir is None or path.exists():
        return path
    matches = sorted(
        p for p in path.parent.glob(glob.escape(path.name) + ".*") if slide_name(p) == path.name
    )
    if len(matches) == 1:
        table.notes.append(f"{where}: {entry} listed without its extension; using {matches[0]}")
        return matches[0]
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        table.left_out.append(f"{where}: {entry} matches several files ({names}); row left out")
        return None
    return path  # missing: reported with the other unreadable slides when read

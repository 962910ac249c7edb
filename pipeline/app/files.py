"""Files written atomically, and CSV tables.

Every writer renders into a temporary sibling of the destination and
``os.replace``s it over the destination, so a reader (or a crash) only ever sees
the old file or the complete new one. Temporary files are created like any other
output file, so they get the umask's permissions (not ``mkstemp``'s 0600).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from pipeline.app.errors import UserError


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces
    ``path`` in one ``os.replace``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.open("xb").close()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_target``)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict]) -> None:
    """Atomically write ``rows`` (dicts keyed by ``columns``; missing keys empty)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c, "") for c in columns})
    atomic_write_bytes(path, buf.getvalue().encode())


def read_table(path: str | os.PathLike, columns: Sequence[str], what: str) -> list[dict[str, str]]:
    """Rows of a user's CSV ``path`` (``what`` names it in errors) that must exist
    and have at least ``columns``: ``FileNotFoundError`` / ``UserError`` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    rows = read_csv(path)
    if not rows or not set(columns) <= set(rows[0]):
        found = sorted(rows[0]) if rows else "no rows"
        expected = " and ".join(repr(c) for c in columns)
        raise UserError(f"{path}: expected columns {expected}, found {found}")
    return rows


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """Rows of a CSV file with a header; ``[]`` if the file does not exist."""
    try:
        # utf-8-sig: spreadsheets often save CSV with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        return []

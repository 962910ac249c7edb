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
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None:  # a failed write (a full disk) names no file: name it
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_directory(path: str | os.PathLike) -> Path:
    """``path`` as a directory this process can write, created with its parents if
    missing; otherwise a ``UserError`` with the OS's reason (a file in the way,
    permission denied, a read-only file system)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
    except FileExistsError:
        raise UserError(f"{path}: is a file, not a directory") from None
    except OSError as e:
        where = e.filename if e.filename is not None else path
        raise UserError(f"{path}: cannot write there ({where}: {e.strerror or e})") from None
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_target``)."""
    with atomic_target(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
"""First characters that make a spreadsheet read a cell as a formula."""


def neutralise(cell: object) -> str:
    """``cell`` as text a spreadsheet shows as text: a value starting with a formula
    character (``=1+1``, ``@SUM(...)``) gets a leading ``'``; numbers (``-0.25``) and
    everything else are unchanged. ``restore`` undoes it."""
    text = "" if cell is None else str(cell)
    if text.startswith(FORMULA_STARTS) and not is_number(text):
        return "'" + text
    return text


def restore(cell: str) -> str:
    """The value ``neutralise`` was given."""
    if cell.startswith("'") and cell[1:].startswith(FORMULA_STARTS) and not is_number(cell[1:]):
        return cell[1:]
    return cell


def is_number(text: str) -> bool:
    """True when ``float(text)`` parses (``-0.25``, ``1e-5``, ``nan``)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_csv(path: str | os.PathLike, columns: Sequence[str], rows: Iterable[dict]) -> None:
    r"""Atomically write ``rows`` (dicts keyed by ``columns``; missing keys empty),
    every cell ``neutralise``\ d (a file name ``=1+1.tiff`` is not a formula)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: neutralise(row.get(c, "")) for c in columns})
    atomic_write_bytes(path, buf.getvalue().encode())


def read_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    r"""Rows of a CSV file with a header, cells ``restore``\ d (``write_csv``'s files
    read back as written); ``[]`` if the file does not exist."""
    try:
        # utf-8-sig: spreadsheets often save CSV with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            try:
                return [{k: v if v is None else restore(v) for k, v in r.items()} for r in reader]
            except csv.Error as e:
                raise UserError(
                    f"{path} near line {reader.line_num + 1}: malformed CSV ({e})"
                ) from None
    except FileNotFoundError:
        return []


def printable(text: object) -> str:
    """``text`` with control characters escaped (``\\x1b``, ``\\n``), for a terminal:
    a file name cannot move the cursor or forge a line."""
    return "".join(
        c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii")
        for c in str(text)
    )


MAX_TABLE_BYTES = 64 * 1024 * 1024
"""Largest CSV ``read_table`` reads (labels, slide lists, mpp tables): 64 MiB, some
hundred thousand rows; a larger file is refused before it is read."""

DELIMITERS = ",;\t|"
"""Column separators ``read_table`` recognises (spreadsheets in many locales save
CSV with ``;``)."""


def read_table(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file written by a person or a spreadsheet: the delimiter is
    detected with ``csv.Sniffer`` among ``DELIMITERS``. A missing or unreadable file,
    a file over ``MAX_TABLE_BYTES``, a malformed one (e.g. a field over the csv
    module's limit of 131,072 characters), or a header without the ``required``
    columns is a ``UserError`` naming the file (and line), the columns found and the
    delimiter used."""
    try:
        size = os.stat(path).st_size
        if size > MAX_TABLE_BYTES:
            raise UserError(f"{path}: {size} bytes, more than a table may hold ({MAX_TABLE_BYTES})")
        # utf-8-sig: spreadsheets often save CSV with a byte-order mark.
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read(MAX_TABLE_BYTES + 1)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    header = text.splitlines()[0] if text.strip() else ""
    try:
        dialect = csv.Sniffer().sniff(header, delimiters=DELIMITERS)
        delimiter = dialect.delimiter
    except csv.Error:  # one column: nothing to detect
        delimiter = ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    try:
        rows = list(reader)
    except csv.Error as e:
        raise UserError(f"{path} near line {reader.line_num + 1}: malformed CSV ({e})") from None
    columns = [c.strip() for c in next(csv.reader(io.StringIO(header), delimiter=delimiter), [])]
    missing = [c for c in required if c not in columns]
    if missing:
        raise UserError(
            f"{path}: expected columns {list(required)}, found {columns} "
            f"(read with delimiter {delimiter!r})"
        )
    return [{k.strip(): (v or "") for k, v in row.items() if k is not None} for row in rows]

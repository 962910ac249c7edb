"""The inputs of a batch: which slide files, under which output names.

``list_inputs`` expands files and directories (``recursive`` descends into
sub-directories) and the rows of a CSV naming the slides into one
``SlideInput`` per distinct file, in order, with a unique, safe output name. An input
that cannot be read (missing, permission denied, a symbolic link loop, an unsafe
``slide`` id) is not an exception: it is an ``SlideInput`` with ``error`` set, which
the batch reports as an ``error`` row while it does every other slide.

No torch here: ``ats-wsi info`` lists directories with it and must start fast.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.app.errors import UserError
from pipeline.app.files import read_table
from readers.registry import special_file_kind

SLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".bif",
    ".vms",
    ".vmu",
    ".svslide",
    ".dcm",
    ".zarr",
)
"""File (or directory, for Zarr) suffixes taken as slides when listing a directory."""

_RESERVED_NAMES = {
    "CON",
    "PRN",
    "AUX",
    "NUL",
    *(f"{port}{i}" for port in ("COM", "LPT") for i in range(1, 10)),
}
"""Device names Windows reserves whatever the extension (``NUL.png`` too)."""

MAX_NAME_BYTES = 200
"""Longest output name: leaves room for ``.geojson`` and a temporary-file prefix
within the usual 255-byte file-name limit."""


@dataclass(frozen=True)
class SlideInput:
    """One input of a batch.

    Attributes:
        path: the file (or Zarr directory) as listed.
        name: its output name (``predictions.csv``'s ``slide``, ``heatmaps/<name>.png``);
            unique among the inputs of one listing.
        error: ``"<OSError type>: <path>: <reason>"`` when the input cannot be used;
            ``""`` otherwise.
    """

    path: Path
    name: str
    error: str = ""


def slide_name(path: str | os.PathLike) -> str:
    """Output name of a slide: its file name without the suffix."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def unsafe_name_reason(name: str) -> str | None:
    """Why ``name`` cannot name output files (``None`` when it can): a path
    separator, ``.``/``..`` or another leading dot, control characters, a name Windows
    reserves, empty or longer than ``MAX_NAME_BYTES``."""
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "it is a path, not a file name"
    if name.startswith("."):
        return "it starts with '.' (a hidden file)"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "it contains control characters"
    if name.split(".")[0].upper() in _RESERVED_NAMES:
        return "it is a device name reserved on Windows"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"it is longer than {MAX_NAME_BYTES} bytes"
    return None


def list_inputs(
    items: Iterable[str | os.PathLike] = (),
    recursive: bool = False,
    slides_csv: str | os.PathLike | None = None,
) -> list[SlideInput]:
    """Expand ``items`` (slide files and/or directories) and the rows of
    ``slides_csv`` into ``SlideInput``\\ s, each file once.

    A directory contributes its entries whose suffix is in ``SLIDE_SUFFIXES``
    (sorted; hidden entries skipped) and, with ``recursive``, those of its
    sub-directories; a directory that cannot be listed, an entry that cannot be
    stat'ed (a symbolic link loop, a broken link with a slide suffix) and a
    directory reached twice through links are error inputs. A named file is taken
    whatever its suffix; a missing or unreadable one is an error input.

    ``slides_csv`` has a ``path`` column and an optional ``slide`` column (the output
    name; derived from the file name when absent or empty). Relative paths are taken
    from the CSV's directory; the delimiter is detected (``,`` ``;`` tab ``|``). A
    missing column or an id given twice is a ``UserError`` (nothing is done); an
    unsafe id is an error input.
    """
    seen_dirs: dict[tuple[int, int], Path] = {}
    found: list[tuple[Path, str | None, str]] = []
    for item in items:
        path = Path(item)
        if path.is_dir() and path.suffix.lower() != ".zarr":
            found.extend((p, None, error) for p, error in _walk(path, recursive, seen_dirs))
        else:
            found.append((path, None, ""))
    if slides_csv is not None:
        found.extend(_csv_entries(Path(slides_csv)))
    return _named(found)


def _csv_entries(csv_path: Path) -> list[tuple[Path, str | None, str]]:
    rows = read_table(csv_path, required=("path",))
    found: list[tuple[Path, str | None, str]] = []
    first_line: dict[str, int] = {}
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        slide = (row.get("slide") or "").strip() or None
        if slide is not None:
            other = first_line.setdefault(slide, line)
            if other != line:
                raise UserError(
                    f"{csv_path}: line {line}: slide id {slide!r} is also on line {other}"
                )
        found.append((csv_path.parent / row["path"].strip(), slide, ""))
    return found


def _walk(
    directory: Path, recursive: bool, seen: dict[tuple[int, int], Path]
) -> Iterator[tuple[Path, str]]:
    """``(path, error)`` of the slide entries of ``directory``, sorted by name."""
    try:
        st = directory.stat()
        key = (st.st_dev, st.st_ino)
        if key in seen:
            reason = f"symbolic link loop (the same directory as {seen[key]})"
            yield directory, f"OSError: {directory}: {reason}"
            return
        seen[key] = directory
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as e:
        yield directory, os_error(directory, e)
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        is_slide = path.suffix.lower() in SLIDE_SUFFIXES
        try:
            entry.stat()  # follows links: a loop or a dangling link fails here
        except OSError as e:
            if is_slide or e.errno == errno.ELOOP:
                yield path, os_error(path, e)
            continue
        if entry.is_dir() and path.suffix.lower() != ".zarr":
            if is_slide:  # named like a slide: a row saying why, not silence
                yield path, f"IsADirectoryError: {path}: a directory, not a slide file"
            if recursive:
                yield from _walk(path, recursive, seen)
        elif is_slide:
            yield path, ""


def os_error(path: Path, error: OSError) -> str:
    """``"PermissionError: <path>: Permission denied"``: the OS's own reason."""
    return f"{type(error).__name__}: {path}: {error.strerror or error}"


def readable_error(path: Path) -> str:
    """``""`` when ``path`` can be opened for reading (a Zarr directory: listed),
    else the OS's reason (``os_error``). FIFOs, sockets and devices are refused
    without being opened (opening a FIFO blocks until a writer comes)."""
    try:
        kind = special_file_kind(path)
        if kind is not None:
            return f"OSError: {path}: not a regular file ({kind})"
        if path.is_dir():
            os.listdir(path)
        else:
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as e:
        return os_error(path, e)
    return ""


def _named(found: list[tuple[Path, str | None, str]]) -> list[SlideInput]:
    """Drop files listed twice, check readability, give every input a unique name.

    ``found`` holds ``(path, slide id or None, error)``. A name derived from the file
    name that several inputs share (``a/x.svs``, ``b/x.svs``) or that an explicit id
    takes gets ``-<8 hex digits of the path's SHA-256>``, so each input keeps a
    stable name of its own whatever the order of the inputs.
    """
    unique: dict[str, tuple[Path, str | None, str]] = {}
    for path, slide, error in found:
        # realpath, not Path.resolve: it does not raise on a symbolic link loop.
        unique.setdefault(os.path.realpath(path), (path, slide, error))
    explicit = {slide for _, slide, _ in unique.values() if slide is not None}
    derived: dict[str, int] = {}
    for path, slide, _ in unique.values():
        if slide is None:
            derived[slide_name(path)] = derived.get(slide_name(path), 0) + 1
    inputs = []
    for real, (path, slide, error) in unique.items():
        name = slide
        if name is None:
            name = slide_name(path)
            if derived[name] > 1 or name in explicit:
                name = f"{name}-{hashlib.sha256(real.encode()).hexdigest()[:8]}"
        reason = unsafe_name_reason(name)
        if reason is not None and not error:
            error = f"UserError: {path}: slide id {name!r} cannot name output files: {reason}"
        inputs.append(SlideInput(path, name, error or readable_error(path)))
    return inputs


def slide_seed(seed: int, path: str | os.PathLike) -> int:
    """Seed of one slide: a stable hash (SHA-256, not Python's salted ``hash``) of
    the run seed and the slide's file name, so it is the same in every process."""
    digest = hashlib.sha256(f"{int(seed)}:{Path(path).name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
